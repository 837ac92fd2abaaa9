"""The bmodel engine: base.Engine on the C++ `chat` module (libbmrt, BM1684X or its simulator).

The C++ side owns the device, the bmodel and the KV cache and reads every dim from the bmodel
itself (SEQ, hidden size, layers and which are cross-attention, tiles, patches, K of the
sampling head); this wrapper only adapts the shared input dataclasses and sampling settings.
The module is built by scripts/build_engine.sh into python_demo/build/.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from mllama_tpu import REPO_ROOT
from mllama_tpu.engines.base import Engine, SamplingParams
from mllama_tpu.inputs import ImageInputs, PrefillInputs

BUILD_DIR = REPO_ROOT / "python_demo" / "build"


def load_chat_module(build_dir: Path = BUILD_DIR) -> ModuleType:
    """Import the built pybind11 module `chat` (once per process)."""
    if "chat" in sys.modules and hasattr(sys.modules["chat"], "Engine"):
        return sys.modules["chat"]
    found = sorted(build_dir.glob("chat*.so"))
    if not found:
        raise ImportError(f"no chat module in {build_dir}: build it with scripts/build_engine.sh")
    # The simulator's libraries switch the CPU to flush-denormals-to-zero; numpy then warns on
    # its next finfo() that "the smallest subnormal is zero". Nothing here depends on subnormals,
    # and on a terminal the four-line warning reads like an error.
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
    spec = importlib.util.spec_from_file_location("chat", found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["chat"] = module
    return module


def _ids(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(t) for t in x] if isinstance(x, (list, tuple)) else [int(x)]


def _token_facts(bmodel: Path) -> tuple[list[int], int | None]:
    """(eos ids, image token id): not in the bmodel, so taken from what export/compile write
    beside it: a manifest.json, else token_config/ (config.json + generation_config.json)."""
    d = bmodel.parent
    try:
        m = json.loads((d / "manifest.json").read_text())
        return _ids(m.get("eos_token_ids")), m.get("image_token_id")
    except (OSError, ValueError):
        pass
    eos: list[int] = []
    image_token_id = None
    try:
        cfg = json.loads((d / "token_config" / "config.json").read_text())
        eos += _ids(cfg.get("text_config", {}).get("eos_token_id"))
        image_token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    except (OSError, ValueError):
        pass
    try:
        eos += _ids(json.loads((d / "token_config" / "generation_config.json").read_text()).get("eos_token_id"))
    except (OSError, ValueError):
        pass
    return list(dict.fromkeys(eos)), image_token_id


class BmodelEngine(Engine):
    """A compiled NAME.bmodel on device(s) `devids` (the simulator has exactly one: [0])."""

    def __init__(self, bmodel_path: str | Path, devids: Sequence[int] = (0,)):
        self.bmodel_path = Path(bmodel_path)
        chat = load_chat_module()
        self.SeqlenReached = chat.SeqlenReached
        self._e = chat.Engine()
        self._e.init([int(d) for d in devids], str(self.bmodel_path))
        e = self._e
        self.seq_length = e.SEQLEN
        self.hidden_size = e.HIDDEN_SIZE
        self.vocab_size = e.VOCAB_SIZE
        self.max_tiles = e.MAX_TILES
        self.num_patches = e.NUM_PATCHES
        self.num_layers = e.NUM_LAYERS
        self.cross_layers = list(e.cross_layers)
        self.sample_k = e.SAMPLE_K
        eos, itid = _token_facts(self.bmodel_path)
        self.eos_token_ids = eos
        self.image_token_id = int(itid) if itid is not None else None
        self.sampling = SamplingParams()
        self.memory = dict(e.memory_info())  # engine_bytes (+ device_used_mb where reported)

    # -- image -----------------------------------------------------------------------------------

    def encode_image(self, image: ImageInputs) -> None:
        if image.pixel_values.shape[0] != self.max_tiles:
            raise ValueError(f"image has {image.pixel_values.shape[0]} tile slots, the model takes {self.max_tiles}")
        self._e.encode_image(image.pixel_values, image.aspect_ratio_ids, image.aspect_ratio_mask)

    def clear_image(self) -> None:
        self._e.clear_image()

    # -- prefill / decode ------------------------------------------------------------------------

    def prefill(self, p: PrefillInputs) -> int:
        if p.seq_length != self.seq_length:
            raise ValueError(f"prefill inputs have SEQ {p.seq_length}, the model {self.seq_length}")
        row = 1.0 if p.decode_text_row_mask is None else float(np.asarray(p.decode_text_row_mask).reshape(-1)[0])
        return self._e.prefill(
            p.input_ids, p.position_ids, p.attention_mask, p.num_tokens,
            p.cross_attention_mask, p.text_row_mask, p.decode_cross_attention_mask, row,
        )

    def decode(self, token: int) -> int:
        """Raises chat.SeqlenReached (a RuntimeError) when the cache holds SEQ tokens already."""
        return self._e.decode(int(token))

    @property
    def position(self) -> int:
        """Cache slot the next fed token occupies (= tokens seen so far)."""
        return self._e.position

    # -- token heads -----------------------------------------------------------------------------

    def _apply_sampling(self, params: SamplingParams) -> None:
        # The head returns K candidates; asking for more than K means "all of them", as in the
        # ONNX engine's draw.
        k = min(params.top_k, self.sample_k)
        draw_seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(32)
        self._e.set_sampling(params.effective_mode, float(params.temperature), float(params.top_p), k,
                             float(params.repeat_penalty), int(params.repeat_last_n),
                             int(draw_seed) & 0xFFFFFFFF)

    # -- timings, memory, lifetime ---------------------------------------------------------------

    @property
    def timings_ms(self) -> dict[str, float]:
        """Device time of the last vit / prefill / decode call (ms), measured in C++."""
        return {"vit": self._e.last_vit_ms, "prefill": self._e.last_prefill_ms, "decode": self._e.last_decode_ms}

    def net_io(self, name: str) -> dict:
        """Inputs/outputs (name, shape, dtype) of one net of the bmodel."""
        return self._e.net_io(name)

    def close(self) -> None:
        self._e.deinit()
