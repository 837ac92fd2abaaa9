"""The ONNX reference engine: an export dir's pieces run with onnxruntime behind base.Engine.

It does on the CPU what the C++ engine does on the device, with the same inputs and the same
nets, so that transformers -> ONNX -> bmodel can be compared piece by piece. Everything it needs
(dims, layer kinds, SEQ, net files and their input names) comes from the export's manifest.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mllama_tpu.config import ModelDims
from mllama_tpu.engines.base import Engine, SamplingParams, draw_token
from mllama_tpu.errors import UserError
from mllama_tpu.inputs import ImageInputs, PrefillInputs, decode_self_mask

_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def read_manifest(export_dir: Path) -> dict:
    """manifest.json of an export dir, with a one-line UserError when it is not one."""
    path = export_dir / "manifest.json"
    if not export_dir.is_dir():
        raise UserError(f"export dir {export_dir} not found: pass the directory written by compile/export_onnx.py")
    if not path.is_file():
        raise UserError(f"{export_dir} has no manifest.json: it is not an export dir (run compile/export_onnx.py)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}; re-run the export") from None
    if manifest.get("format") != 1:
        raise UserError(f"{path} has format {manifest.get('format')!r}, this engine reads format 1; re-run the export")
    return manifest


class OnnxEngine(Engine):
    """Runs vit / embedding / block_i / block_cache_i / lm_head / heads with onnxruntime."""

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.dims = ModelDims.from_manifest(self.manifest)
        self.seq_length = int(self.manifest["seq_length"])
        self.hidden_size = self.dims.hidden_size
        self.vocab_size = self.dims.vocab_size
        self.max_tiles = self.dims.max_num_tiles
        self.num_patches = self.dims.num_patches
        self.layers: list[str] = list(self.manifest.get("layers") or self.dims.layer_kinds)
        self.eos_token_ids = [int(t) for t in self.manifest.get("eos_token_ids", self.dims.eos_token_ids)]
        self.image_token_id = int(self.manifest.get("image_token_id", self.dims.image_token_id))
        self.recent_window = int(self.manifest.get("sampling", {}).get("recent_ids", 0))
        self._threads = threads or min(4, os.cpu_count() or 1)
        needed = ["embedding", "embedding_cache", "lm_head", "greedy_head", "penalty_sample_head", "vit"]
        needed += [f"{kind}_{i}" for i in range(len(self.layers)) for kind in ("block", "block_cache")]
        missing = [n for n in needed if n not in self.manifest["pieces"]]
        if missing:
            raise UserError(
                f"{self.export_dir} lacks net(s) {', '.join(missing)}: the export is incomplete, re-run it"
            )
        for name, piece in self.manifest["pieces"].items():
            if not (self.export_dir / piece["file"]).is_file():
                raise UserError(
                    f"{self.export_dir / piece['file']} is missing (net {name}): the export is incomplete, re-run it"
                )
        self._sessions: dict[str, Any] = {}
        self.sampling = SamplingParams()
        self._rng = np.random.default_rng()
        self.clear_image()
        self._reset_kv()

    # -- onnxruntime -----------------------------------------------------------------------------

    def _session(self, net: str) -> Any:
        """Sessions are created on first use: a text-only chat never loads the vision encoder."""
        if net not in self._sessions:
            import onnxruntime as ort

            if net not in self.manifest["pieces"]:
                raise RuntimeError(f"net {net} is not in {self.export_dir / 'manifest.json'}")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            path = self.export_dir / self.manifest["pieces"][net]["file"]
            self._sessions[net] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return self._sessions[net]

    def run(self, net: str, **feeds: np.ndarray) -> list[np.ndarray]:
        """Run one net by the contract's input names, cast to the dtypes the net declares."""
        sess = self._session(net)
        inputs = {}
        for arg in sess.get_inputs():
            if arg.name not in feeds:
                raise RuntimeError(f"net {net} wants input {arg.name!r}, the engine passed {sorted(feeds)}")
            inputs[arg.name] = np.ascontiguousarray(feeds[arg.name], dtype=_NP_DTYPES[arg.type])
        return sess.run(None, inputs)

    # -- image -----------------------------------------------------------------------------------

    def encode_image(self, image: ImageInputs) -> None:
        pv = image.pixel_values
        if pv.shape[0] != self.max_tiles:
            raise ValueError(f"image has {pv.shape[0]} tile slots, the model takes {self.max_tiles}")
        (states,) = self.run(
            "vit",
            pixel_values=pv,
            aspect_ratio_ids=image.aspect_ratio_ids,
            aspect_ratio_mask=image.aspect_ratio_mask,
        )
        self._cross_states = states

    def clear_image(self) -> None:
        self._cross_states: np.ndarray | None = None
        self._cross_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._decode_cross: tuple[np.ndarray, np.ndarray] | None = None

    # -- prefill / decode ------------------------------------------------------------------------

    def _reset_kv(self) -> None:
        self._kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.position = 0
        self._history: list[int] = []

    def prefill(self, p: PrefillInputs) -> int:
        if p.seq_length != self.seq_length:
            raise ValueError(f"prefill inputs have SEQ {p.seq_length}, the model {self.seq_length}")
        if p.has_image and self._cross_states is None:
            raise RuntimeError("an image prompt needs encode_image() first")
        self._reset_kv()
        self._cross_kv = {}
        self._decode_cross = None
        (h,) = self.run("embedding", input_ids=p.input_ids)
        for i, kind in enumerate(self.layers):
            if kind == "self":
                h, k, v = self.run(
                    f"block_{i}", input_states=h, position_ids=p.position_ids, attention_mask=p.attention_mask
                )
                self._kv[i] = (k.copy(), v.copy())
            elif p.has_image:
                h, ck, cv = self.run(
                    f"block_{i}",
                    input_states=h,
                    cross_attention_states=self._cross_states,
                    text_row_mask=p.text_row_mask,
                    attention_mask=p.cross_attention_mask,
                )
                self._cross_kv[i] = (ck, cv)
            # A text-only prompt skips the cross-attention layers, as transformers does.
        if p.has_image:
            self._decode_cross = (p.decode_cross_attention_mask, p.decode_text_row_mask)
        self.position = p.num_tokens
        self._history = p.token_ids
        return self._next_token(h[:, p.num_tokens - 1, :])

    def decode(self, token: int) -> int:
        if self.position >= self.seq_length:
            raise RuntimeError(f"the KV cache is full ({self.seq_length} tokens)")
        pos = self.position
        (h,) = self.run("embedding_cache", input_ids=np.array([[token]], dtype=np.int32))
        mask = decode_self_mask(pos, self.seq_length)
        position_ids = np.array([[pos]], dtype=np.int32)
        for i, kind in enumerate(self.layers):
            if kind == "self":
                hist_k, hist_v = self._kv[i]
                h, k, v = self.run(
                    f"block_cache_{i}",
                    input_states=h,
                    position_ids=position_ids,
                    attention_mask=mask,
                    history_k=hist_k,
                    history_v=hist_v,
                )
                hist_k[:, pos] = k[:, 0]
                hist_v[:, pos] = v[:, 0]
            elif self._decode_cross is not None:
                cross_mask, row_mask = self._decode_cross
                ck, cv = self._cross_kv[i]
                (h,) = self.run(
                    f"block_cache_{i}",
                    input_states=h,
                    text_row_mask=row_mask,
                    attention_mask=cross_mask,
                    cross_k=ck,
                    cross_v=cv,
                )
        self.position = pos + 1
        self._history.append(int(token))
        return self._next_token(h[:, 0, :])

    # -- token heads -----------------------------------------------------------------------------

    def _apply_sampling(self, params: SamplingParams) -> None:
        self._rng = np.random.default_rng(params.seed)

    def _next_token(self, hidden: np.ndarray) -> int:
        (logits,) = self.run("lm_head", hidden_states=hidden)
        s = self.sampling
        if s.effective_mode == "greedy":
            (token,) = self.run("greedy_head", logits=logits)
            return int(np.asarray(token).reshape(-1)[0])
        probs, tokens = self.run(
            "penalty_sample_head",
            logits=logits,
            recent_ids=self._recent_ids(),
            top_p=np.array([s.top_p], dtype=np.float32),
            temperature=np.array([s.temperature], dtype=np.float32),
            repeat_penalty=np.array([s.repeat_penalty], dtype=np.float32),
        )
        return draw_token(probs.reshape(-1), tokens.reshape(-1), s.top_k, self._rng)

    def _recent_ids(self) -> np.ndarray:
        """The last repeat_last_n ids seen (prompt + answer), padded to the head's fixed window
        by repeating the oldest one: a repeated id is penalised once, so padding changes nothing."""
        window = self.recent_window or self.sampling.repeat_last_n
        n = min(self.sampling.repeat_last_n, window)
        recent = self._history[-n:] or [0]
        padded = [recent[0]] * (window - len(recent)) + recent
        return np.array([padded], dtype=np.int32)

    def close(self) -> None:
        self._sessions.clear()

