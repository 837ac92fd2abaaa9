"""What the token heads cost on the simulator with Llama 3.2's real 128256-id vocabulary.

Builds mllama_tpu.real_vocab's model (random weights, the published tokenizer), exports and
compiles it, and makes a second bmodel that differs only in its two heads: the TopK heads as
they were before issue 12 (`TopKGreedyHead`, `TopKPenaltySampleHead` below, kept here as the
reference). Both go through the C++ engine on one text prompt, greedy and then penalty sampling,
and the engine's per-net counters give each net's launches and time. Printed side by side:
ms per launch of greedy_head, penalty_sample_head and lm_head, and decode tokens/s.

These are simulator numbers (host CPU, with the yield preload), not chip numbers: see
bench/chip_speed for the chip's cost model.

    .venv/bin/python -m bench.real_vocab_heads                # int4, 4 tokens per turn
    .venv/bin/python -m bench.real_vocab_heads --mode f32 --tokens 6
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mllama_tpu import REPO_ROOT
from mllama_tpu.cmodel_yield import exec_with_preload

WORK = REPO_ROOT / "build" / "real_vocab_heads"
SEQ_LENGTH = 128
QUESTION = "Tell me about the sea."


class TopKGreedyHead(nn.Module):
    """greedy_head before issue 12: TopK, which TPU-MLIR runs on the sort unit (a dynamic net)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        _, token = torch.topk(logits, 1, dim=-1)
        return token.reshape(1).to(torch.int32)


class TopKPenaltySampleHead(nn.Module):
    """penalty_sample_head before issue 12: one-hot penalty over the vocabulary, then TopK (3 subnets)."""

    def __init__(self, vocab_size: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.vocab = nn.Parameter(torch.arange(vocab_size, dtype=torch.float32).view(1, 1, vocab_size),
                                  requires_grad=False)

    def forward(self, logits, recent_ids, top_p, temperature, repeat_penalty):
        seen = (recent_ids.to(torch.float32).unsqueeze(-1) == self.vocab).to(torch.float32).amax(dim=1)
        penalised = torch.where(logits < 0, logits * repeat_penalty, logits / repeat_penalty)
        logits = seen * penalised + (1 - seen) * logits
        values, tokens = torch.topk(logits, self.top_k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        kept = probs * ((torch.cumsum(probs, dim=-1) - probs) < top_p).to(torch.float32)
        return kept / kept.sum(dim=-1, keepdim=True), tokens.to(torch.int32)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(mode: str) -> tuple[Path, Path]:
    """(bmodel with today's heads, bmodel with the TopK heads); everything cached under WORK.

    Each bmodel's compile dir gets the export's manifest beside it (onnx_manifest.json), whose
    piece checksums say what the bmodel was built from (see measure_cached)."""
    from mllama_tpu import real_vocab
    from mllama_tpu.compile import compile_model
    from mllama_tpu.export import export_model
    from mllama_tpu.export.onnx_io import export_piece
    from mllama_tpu.export.pieces import Piece

    model_dir = WORK / "model"
    if not (model_dir / "config.json").is_file():
        _log(f"writing the real-vocabulary model to {model_dir}")
        real_vocab.write_model(model_dir)
    after_onnx = WORK / "onnx"
    _log("export (cached)")
    export_model(model_dir, after_onnx, SEQ_LENGTH, progress=False)
    _log(f"compile {mode} (cached)")
    after = compile_model(after_onnx, mode, "realvocab", SEQ_LENGTH, WORK / f"bmodel-{mode}", progress=False)

    # The same export with the TopK heads; compile rebuilds only the pieces whose files differ.
    before_onnx = WORK / "onnx-topk-heads"
    shutil.rmtree(before_onnx, ignore_errors=True)
    shutil.copytree(after_onnx, before_onnx)
    manifest = json.loads((before_onnx / "manifest.json").read_text())
    for net in ("greedy_head", "penalty_sample_head"):
        v, k = manifest["dims"]["vocab_size"], manifest["sampling"]["top_k"]
        example = {"logits": torch.randn(1, v)}
        if net == "greedy_head":
            piece = Piece(net, TopKGreedyHead(), example, ["token"])
        else:
            r = manifest["sampling"]["recent_ids"]
            example |= {"recent_ids": torch.zeros(1, r, dtype=torch.int32), "top_p": torch.tensor([0.8]),
                        "temperature": torch.tensor([0.7]), "repeat_penalty": torch.tensor([1.1])}
            piece = Piece(net, TopKPenaltySampleHead(v, k), example, ["probs", "tokens"])
        manifest["pieces"][net].update(export_piece(piece, before_onnx / "pieces"))
    (before_onnx / "manifest.json").write_text(json.dumps(manifest, indent=1))
    before_out = WORK / f"bmodel-{mode}-topk-heads"
    if not before_out.exists():
        shutil.copytree(after.parent, before_out)  # its per-piece cache: only the heads recompile
    _log(f"compile {mode} with the TopK heads (only the heads rebuild)")
    before = compile_model(before_onnx, mode, "realvocab", SEQ_LENGTH, before_out, progress=False)
    for bmodel, onnx_dir in ((after, after_onnx), (before, before_onnx)):
        shutil.copy(onnx_dir / "manifest.json", bmodel.parent / "onnx_manifest.json")
    return after, before


def measure_cached(bmodel: Path, tokens: int) -> dict:
    """measure(), reused while the bmodel is built from the same pieces: the TopK bmodel takes
    ~20 min to measure on a busy 2-core machine and does not change when our heads do."""
    import hashlib

    pieces = json.loads((bmodel.parent / "onnx_manifest.json").read_text())["pieces"]
    key = hashlib.sha256(json.dumps([bmodel.name, tokens, QUESTION, sorted((n, e["sha256"]) for n, e in pieces.items())]
                                    ).encode()).hexdigest()
    cache = bmodel.parent / "measured.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        _log(f"  (measured before from the same pieces: {cache})")
        return json.loads(cache.read_text())["result"]
    result = measure(bmodel, tokens)
    cache.write_text(json.dumps({"key": key, "result": result}))
    return result


def measure(bmodel: Path, tokens: int) -> dict:
    from mllama_tpu.engines.bmodel import BmodelEngine
    from mllama_tpu.sampling import SamplingParams
    from mllama_tpu.inputs import load_processor, pad_token_id, prefill_inputs, process, user_message

    processor = load_processor(bmodel.parent / "token_config")
    engine = BmodelEngine(bmodel)
    try:
        f = process(processor, [user_message(QUESTION, False)], None)
        p = prefill_inputs(f["input_ids"][0], engine.seq_length, pad_token_id(processor))
        out: dict = {}
        for mode in ("greedy", "penalty_sample"):
            if mode == "greedy":
                engine.set_sampling(SamplingParams())
            else:
                engine.set_sampling(SamplingParams("penalty_sample", temperature=0.8, top_p=0.9, top_k=40, repeat_penalty=1.2,
                                    repeat_last_n=32, seed=1))
            engine.native.net_stats(True)
            token = engine.prefill(p)
            t0 = time.perf_counter()
            for _ in range(tokens - 1):
                token = engine.decode(token)
            decode_s = time.perf_counter() - t0
            stats = {n: (int(runs), float(ms)) for n, (runs, ms) in engine.native.net_stats(True).items()}
            out[mode] = {"decode_tokens_per_s": (tokens - 1) / decode_s, "nets": stats}
        return out
    finally:
        engine.close()


def per_launch(stats: dict, net: str) -> float | None:
    runs, ms = stats.get(net, (0, 0.0))
    return ms / runs if runs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real_vocab_heads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="int4", choices=("int4", "f32"))
    ap.add_argument("--tokens", type=int, default=4, help="tokens per turn (the TopK heads take ~18 s each)")
    args = ap.parse_args(argv)
    after, before = build(args.mode)
    res = {}
    for label, bmodel in (("TopK heads (before)", before), ("static heads (now)", after)):
        _log(f"measure {label}: {bmodel.name}")
        res[label] = measure_cached(bmodel, args.tokens)
    labels = list(res)
    print(f"\nsimulator, real vocabulary (128256), {args.mode}, seq {SEQ_LENGTH}, {args.tokens} tokens per turn")
    print(f"| | {' | '.join(labels)} | ratio |")
    print("|---|" + "---|" * (len(labels) + 1))
    rows = [("greedy_head ms / launch", "greedy", "greedy_head"),
            ("penalty_sample_head ms / launch", "penalty_sample", "penalty_sample_head"),
            ("lm_head ms / launch", "greedy", "lm_head")]
    for name, mode, net in rows:
        a, b = (per_launch(res[lab][mode]["nets"], net) for lab in labels)
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    for mode in ("greedy", "penalty_sample"):
        a, b = (res[lab][mode]["decode_tokens_per_s"] for lab in labels)
        print(f"| decode tokens / s, {mode} | {a:.3f} | {b:.2f} | {b / a:.1f}x |")
    (WORK / f"real_vocab_heads_{args.mode}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    exec_with_preload(["-m", "bench.real_vocab_heads", *sys.argv[1:]])
    sys.exit(main())
