"""The ONNX reference engine: an export dir's nets run with onnxruntime behind base.Engine.

It does on the CPU what the C++ engine does on the device, with the same inputs and the same
nets, so that transformers -> ONNX -> bmodel can be compared piece by piece. Everything it needs
(dims, layer kinds, SEQ, net files) comes from the export's manifest.json.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mllama_tpu import contract
from mllama_tpu.config import ModelDims
from mllama_tpu.engines.base import Engine
from mllama_tpu.errors import UserError
from mllama_tpu.inputs import ImageInputs, PrefillInputs, decode_self_mask
from mllama_tpu.manifest import read_manifest
from mllama_tpu.sampling import SampleHeadInputs

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class OnnxEngine(Engine):
    """Runs the contract's nets (vit, embeddings, block_i / block_cache_i, lm_head, heads) with onnxruntime."""

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        super().__init__()
        self.export_dir = self.model_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.dims = ModelDims.from_manifest(self.manifest)
        self.seq_length = int(self.manifest["seq_length"])
        self.hidden_size = self.dims.hidden_size
        self.vocab_size = self.dims.vocab_size
        self.max_tiles = self.dims.max_num_tiles
        self.num_patches = self.dims.num_patches
        self.layers: list[str] = list(self.manifest["layers"])
        self.recent_window = int(self.manifest.get("sampling", {}).get("recent_ids", contract.RECENT_IDS))
        self._threads = threads or min(4, os.cpu_count() or 1)
        for name, piece in self.manifest["pieces"].items():
            if not (self.export_dir / piece["file"]).is_file():
                raise UserError(
                    f"{self.export_dir / piece['file']} is missing (net {name}): the export is incomplete, re-run it"
                )
        self._sessions: dict[str, Any] = {}
        self.clear_image()
        self._kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._position = 0

    # -- onnxruntime -----------------------------------------------------------------------------

    def _session(self, net: str) -> Any:
        """Sessions are created on first use: a text-only chat never loads the vision encoder."""
        if net not in self._sessions:
            import onnxruntime as ort

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
        (states,) = self.run("vit", pixel_values=pv, aspect_ratio_ids=image.aspect_ratio_ids,
                             aspect_ratio_mask=image.aspect_ratio_mask)
        self._cross_states = states

    def clear_image(self) -> None:
        self._cross_states: np.ndarray | None = None
        self._cross_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._decode_cross: tuple[np.ndarray, np.ndarray] | None = None

    # -- prefill / decode ------------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    def _prefill(self, p: PrefillInputs, head: SampleHeadInputs | None):
        if p.has_image and self._cross_states is None:
            raise RuntimeError("an image prompt needs encode_image() first")
        self._kv, self._cross_kv, self._decode_cross = {}, {}, None
        (h,) = self.run("embedding", input_ids=p.input_ids)
        for i, kind in enumerate(self.layers):
            if kind == "self":
                h, k, v = self.run(contract.prefill_block(i), input_states=h, position_ids=p.position_ids,
                                   attention_mask=p.attention_mask)
                self._kv[i] = (k.copy(), v.copy())
            elif p.has_image:
                h, ck, cv = self.run(contract.prefill_block(i), input_states=h,
                                     cross_attention_states=self._cross_states, text_row_mask=p.text_row_mask,
                                     attention_mask=p.cross_attention_mask)
                self._cross_kv[i] = (ck, cv)
            # A text-only prompt skips the cross-attention layers, as transformers does.
        if p.has_image:
            self._decode_cross = (p.decode_cross_attention_mask, p.decode_text_row_mask)
        self._position = p.num_tokens
        return self._head(h[:, p.num_tokens - 1, :], head)

    def _decode(self, token: int, head: SampleHeadInputs | None):
        pos = self._position
        (h,) = self.run("embedding_cache", input_ids=np.array([[token]], dtype=np.int32))
        mask = decode_self_mask(pos, self.seq_length)
        position_ids = np.array([[pos]], dtype=np.int32)
        for i, kind in enumerate(self.layers):
            if kind == "self":
                hist_k, hist_v = self._kv[i]
                h, k, v = self.run(contract.decode_block(i), input_states=h, position_ids=position_ids,
                                   attention_mask=mask, history_k=hist_k, history_v=hist_v)
                hist_k[:, pos] = k[:, 0]
                hist_v[:, pos] = v[:, 0]
            elif self._decode_cross is not None:
                cross_mask, row_mask = self._decode_cross
                ck, cv = self._cross_kv[i]
                (h,) = self.run(contract.decode_block(i), input_states=h, text_row_mask=row_mask,
                                attention_mask=cross_mask, cross_k=ck, cross_v=cv)
        self._position = pos + 1
        return self._head(h[:, 0, :], head)

    # -- token heads -----------------------------------------------------------------------------

    def _head(self, hidden: np.ndarray, head: SampleHeadInputs | None):
        (logits,) = self.run("lm_head", hidden_states=hidden)
        if head is None:
            (token,) = self.run("greedy_head", logits=logits)
            return int(np.asarray(token).reshape(-1)[0])
        probs, tokens = self.run("penalty_sample_head", logits=logits, recent_ids=head.recent_ids,
                                 top_p=head.top_p, temperature=head.temperature,
                                 repeat_penalty=head.repeat_penalty)
        return probs.reshape(-1), tokens.reshape(-1)

    def close(self) -> None:
        self._sessions.clear()
