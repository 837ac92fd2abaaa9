"""Net-by-net parity of a compiled bmodel with its ONNX pieces, on the BM1684X simulator.

Each net gets inputs a real run could feed it (token ids in range, positions, the contract's
additive masks, random states), runs in onnxruntime and on the simulator, and the outputs are
compared: relative max error for f32 builds, cosine similarity for quantized ones, equality for
token outputs. Used by the compile tests; also handy after compiling a new checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllama_tpu.contract import MASK_HIDDEN
from mllama_tpu.inputs import chunk_self_mask


def make_inputs(net: str, spec: dict, manifest: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values a real run could feed this net: ids in range, positions, masks of the contract."""
    dims = manifest["dims"]
    vocab = dims["vocab_size"]
    feed: dict[str, np.ndarray] = {}
    for t in spec["inputs"]:
        name, shape = t["name"], tuple(t["shape"])
        if name == "input_ids" or name == "recent_ids":
            v = rng.integers(0, vocab, shape)
        elif name == "position_ids":
            v = np.arange(int(np.prod(shape))).reshape(shape) + min(40, manifest["seq_length"] - shape[-1])
        elif name == "aspect_ratio_ids":
            v = np.full(shape, 6)  # 2x2 tiles
        elif name == "aspect_ratio_mask":
            v = np.ones(shape)
        elif name == "attention_mask":
            if "history_k" in [i["name"] for i in spec["inputs"]]:  # a self step of C rows
                rows, seq = shape[-2], manifest["seq_length"]
                v = chunk_self_mask(min(40, seq - rows), rows, rows, seq)  # 40 cached tokens + the step's
            else:  # cross attention: the first two tiles visible
                v = np.full(shape, MASK_HIDDEN)
                v[..., : shape[-1] // 2] = 0.0
        elif name == "text_row_mask":
            v = np.ones(shape)
            v.reshape(-1)[: max(1, v.size // 4)] = 0.0
        elif name == "top_p":
            v = np.full(shape, 0.8)
        elif name == "temperature":
            v = np.full(shape, 0.7)
        elif name == "repeat_penalty":
            v = np.full(shape, 1.1)
        elif name == "logits":
            v = rng.standard_normal(shape) * 3.0
        else:  # hidden states, KV, pixel values
            v = rng.standard_normal(shape)
        feed[name] = v.astype(np.int32 if t["dtype"] == "int32" else np.float32)
    return feed


def onnx_outputs(onnx_dir: Path, net: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(onnx_dir) / "pieces" / f"{net}.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def load_manifest(onnx_dir: Path) -> dict:
    return json.loads((Path(onnx_dir) / "manifest.json").read_text())


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-6))


def cosine(got: np.ndarray, ref: np.ndarray) -> float:
    a, b = got.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@dataclass(frozen=True)
class OutputCheck:
    net: str
    index: int
    is_int: bool
    rel_err: float  # max |sim - onnx| / max |onnx|
    cosine: float
    equal: bool  # exact equality (the meaningful test for token outputs)


def check_nets(onnx_dir: Path, bmodel: Path, nets: list[str] | None = None, seed: int = 0) -> list[OutputCheck]:
    """Every output of every net (or of `nets`): simulator vs onnxruntime on the same inputs."""
    from mllama_tpu.compile.simulate import run_nets

    manifest = load_manifest(onnx_dir)
    rng = np.random.default_rng(seed)
    names = nets or list(manifest["pieces"])
    feeds = {n: make_inputs(n, manifest["pieces"][n], manifest, rng) for n in names}
    sim = run_nets(bmodel, feeds)
    checks = []
    for net, feed in feeds.items():
        ref = onnx_outputs(onnx_dir, net, feed)
        if len(ref) != len(sim[net]):
            raise AssertionError(f"{net}: {len(sim[net])} outputs on the simulator, {len(ref)} in ONNX")
        for i, (got, want) in enumerate(zip(sim[net], ref)):
            got = got.reshape(want.shape)
            is_int = np.issubdtype(want.dtype, np.integer)
            checks.append(OutputCheck(net, i, is_int, rel_err(got, want), cosine(got, want),
                                      bool(np.array_equal(got.astype(want.dtype), want))))
    return checks


def text_hidden_states(onnx_dir: Path, prompts: list[list[int]]) -> np.ndarray:
    """Last-token hidden state of text-only prompts through the ONNX nets (the reference engine
    up to lm_head): text-only prompts skip the cross-attention layers, as transformers does.
    Returns [len(prompts), H] float32."""
    from mllama_tpu.engines.onnx import OnnxEngine
    from mllama_tpu.inputs import prefill_inputs

    engine = OnnxEngine(onnx_dir)
    rows = []
    for ids in prompts:
        p = prefill_inputs(ids, engine.seq_length, 0)
        for chunk in p.chunks(0, engine.prefill_lengths):
            h = engine.run_chunk(chunk)
        rows.append(h[0, chunk.rows - 1])
    engine.close()
    return np.stack(rows).astype(np.float32)
