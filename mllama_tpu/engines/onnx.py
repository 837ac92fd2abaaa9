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
from mllama_tpu.engines.base import Engine, Finish
from mllama_tpu.errors import UserError
from mllama_tpu.inputs import ChunkInputs, ImageInputs, decode_self_mask
from mllama_tpu.manifest import read_manifest
from mllama_tpu.sampling import SampleHeadInputs

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class OnnxEngine(Engine):
    """Runs the contract's nets (vit, cross_kv_i, embeddings, step blocks, lm_head, heads) with onnxruntime."""

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
        self.prefill_lengths = tuple(self.manifest["prefill_lengths"])
        self._embedding_rows = self.prefill_lengths[-1]
        self._sessions: dict[str, Any] = {}
        self._kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # self layer -> K, V [1,SEQ,KV,D], made on first use
        self._cross_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._decode_cross: tuple[np.ndarray, np.ndarray] | None = None
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

    def _encode_image(self, image: ImageInputs) -> None:
        (states,) = self.run("vit", pixel_values=image.pixel_values, aspect_ratio_ids=image.aspect_ratio_ids,
                             aspect_ratio_mask=image.aspect_ratio_mask)
        self._cross_kv = {i: tuple(self.run(contract.cross_kv_block(i), cross_attention_states=states))
                          for i, kind in enumerate(self.layers) if kind == "cross"}

    # -- prefill / decode ------------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    def run_chunk(self, chunk: ChunkInputs) -> np.ndarray:
        """A chunk's embedding and layers (its K/V cached): hidden states [1,C,H] before lm_head."""
        # The embedding net takes the largest chunk's ids; a shorter chunk uses its first rows.
        ids = np.full((1, self._embedding_rows), chunk.input_ids[0, -1], dtype=np.int32)
        ids[0, :chunk.size] = chunk.input_ids[0]
        (h,) = self.run("embedding", input_ids=ids)
        h = self._layers(h[:, :chunk.size], chunk)
        self._position = chunk.offset + chunk.rows
        return h

    def _prefill_chunk(self, chunk: ChunkInputs, finish: Finish | None):
        h = self.run_chunk(chunk)
        if finish is None:
            return None
        self._decode_cross = None
        if chunk.has_image:
            self._decode_cross = (finish.decode_cross_attention_mask, finish.decode_text_row_mask)
        return self._head(h[:, chunk.rows - 1, :], finish.head)

    def _decode(self, token: int, head: SampleHeadInputs | None):
        pos = self._position
        (h,) = self.run("embedding_cache", input_ids=np.array([[token]], dtype=np.int32))
        step = ChunkInputs(pos, 1, np.array([[token]], np.int32), np.array([[pos]], np.int32),
                           decode_self_mask(pos, self.seq_length))
        if self._decode_cross is not None:
            step.cross_attention_mask, step.text_row_mask = self._decode_cross
        h = self._layers(h, step)
        self._position = pos + 1
        return self._head(h[:, 0, :], head)

    def _layers(self, h: np.ndarray, step: ChunkInputs) -> np.ndarray:
        """Every layer's step net once over `step`'s tokens; their K/V become cache slots
        offset..offset+rows-1. A text-only step skips the cross-attention layers, as transformers."""
        lo, hi = step.offset, step.offset + step.rows
        for i, kind in enumerate(self.layers):
            net = contract.step_block(i, step.size)
            if kind == "self":
                if i not in self._kv:  # zeros, shaped as the net takes them
                    shape = next(a.shape for a in self._session(net).get_inputs() if a.name == "history_k")
                    self._kv[i] = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                hist_k, hist_v = self._kv[i]
                h, k, v = self.run(net, input_states=h, position_ids=step.position_ids,
                                   attention_mask=step.attention_mask, history_k=hist_k, history_v=hist_v)
                hist_k[:, lo:hi] = k[:, :step.rows]
                hist_v[:, lo:hi] = v[:, :step.rows]
            elif step.has_image:
                ck, cv = self._cross_kv[i]
                (h,) = self.run(net, input_states=h, text_row_mask=step.text_row_mask,
                                attention_mask=step.cross_attention_mask, cross_k=ck, cross_v=cv)
        return h

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
