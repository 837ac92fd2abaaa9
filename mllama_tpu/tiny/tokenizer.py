"""Our own small tokenizer for the tiny model: byte-level BPE + the Llama 3 special tokens.

Byte-level means every UTF-8 string tokenizes and decodes back exactly, even words never seen in
training. Ids are laid out like Llama 3's: ordinary tokens first, then the special tokens, and
`<|image|>` at id == vocab_size, one past what lm_head can produce (the model never generates it;
Mllama's embed_tokens has vocab_size + 8 rows for it).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mllama_tpu.tiny import task

BPE_SIZE = 376  # 256 byte tokens + 120 merges learnt from the corpus below
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
VOCAB_SIZE = BPE_SIZE + len(SPECIAL_TOKENS)  # rows of lm_head
IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_ID = VOCAB_SIZE
BOS, EOT, EOM, EOS_TEXT, PAD = (
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
)

# Llama 3.2 Vision's conversation format; content is a string or a list of image/text parts.
# Text is trimmed as Meta's template does; every turn ends with <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] | trim }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A little general text besides the task's sentences, so the merges are not all task words and
# other prompts do not fall back to single bytes everywhere.
_GENERAL_TEXT = [
    "Describe the image in one sentence.",
    "What is in this picture? Please answer briefly.",
    "Hello! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Is there anything else you would like to know about the colors and shapes?",
    "system user assistant ipython tool",
    "one two three four five six seven eight nine ten",
    "This is a small model for testing, trained on simple pictures.",
]


def special_id(token: str) -> int:
    """Fixed id of a special token (they follow the BPE tokens, in SPECIAL_TOKENS order)."""
    if token == IMAGE_TOKEN:
        return IMAGE_TOKEN_ID
    return BPE_SIZE + SPECIAL_TOKENS.index(token)


def _corpus() -> list[str]:
    lines = []
    for question in task.QUESTIONS:
        lines.append(question.text)
        lines.extend(question.answer_template.format(value=v) for v in question.values)
    lines.extend(["user", "assistant", "\n\n"])
    # Task sentences weigh more so their words become single tokens.
    return lines * 20 + _GENERAL_TEXT


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the BPE (deterministic: fixed corpus) and wrap it with Llama 3's special tokens."""
    core = Tokenizer(models.BPE())
    # Llama 3's split pattern: unlike GPT-2's, it keeps "\n\n" whole before a word, so a prompt
    # ending in "\n\n" tokenizes as a prefix of prompt+answer (train and generate see the same ids).
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    if core.get_vocab_size() != BPE_SIZE:
        raise RuntimeError(f"BPE has {core.get_vocab_size()} tokens, expected {BPE_SIZE}: enlarge the corpus")
    core.add_special_tokens(SPECIAL_TOKENS + [IMAGE_TOKEN])
    for token in SPECIAL_TOKENS + [IMAGE_TOKEN]:
        assert core.token_to_id(token) == special_id(token), token
    # Like Llama 3: encoding with add_special_tokens=True prepends <|begin_of_text|>.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, special_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
