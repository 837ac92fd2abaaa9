"""The bmodel engine: base.Engine on the C++ `chat` module (libbmrt, BM1684X or its simulator).

The C++ side owns the device, the bmodel and the KV cache and reads every dim from the bmodel
itself (SEQ, hidden size, layers and which are cross-attention, tiles, patches, K and R of the
sampling head); it checks the bmodel against the contract it is handed here. This wrapper only
passes the shared inputs through.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from mllama_tpu import REPO_ROOT, contract
from mllama_tpu.bmodel_file import check_bmodel
from mllama_tpu.engines.base import Engine, Finish
from mllama_tpu.inputs import ChunkInputs, ImageInputs
from mllama_tpu.sampling import SampleHeadInputs

# Where scripts/build_engine.sh puts the module; MLLAMA_ENGINE_DIR points elsewhere (an install).
ENGINE_DIR = Path(os.environ.get("MLLAMA_ENGINE_DIR") or REPO_ROOT / "python_demo" / "build")


def load_chat_module(build_dir: Path = ENGINE_DIR) -> ModuleType:
    """Import the built pybind11 module `chat` (once per process)."""
    if "chat" in sys.modules and hasattr(sys.modules["chat"], "Mllama"):
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


class BmodelEngine(Engine):
    """A compiled NAME.bmodel on device `devid` (the simulator has exactly one: 0)."""

    def __init__(self, bmodel_path: str | Path, devid: int = 0):
        super().__init__()
        self.bmodel_path = Path(bmodel_path)
        self.model_dir = self.bmodel_path.parent
        check_bmodel(self.bmodel_path)  # libbmrt may abort the process on a damaged file
        self._e = load_chat_module().Mllama()
        self._e.init(int(devid), str(self.bmodel_path), contract.engine_spec())
        e = self._e
        self.seq_length = e.SEQLEN
        self.hidden_size = e.HIDDEN_SIZE
        self.vocab_size = e.VOCAB_SIZE
        self.max_tiles = e.MAX_TILES
        self.num_patches = e.NUM_PATCHES
        self.num_layers = e.NUM_LAYERS
        self.cross_layers = list(e.cross_layers)
        self.sample_k = e.SAMPLE_K
        self.recent_window = e.RECENT_IDS
        self.prefill_lengths = tuple(e.PREFILL_LENGTHS)

    @property
    def native(self) -> Any:
        """The C++ engine itself (module `chat`, class `Mllama`): what tests and benchmarks check
        below this wrapper (its masks, its net names and counters, its own input checks)."""
        return self._e

    def _encode_image(self, image: ImageInputs) -> None:
        self._e.encode_image(image.pixel_values, image.aspect_ratio_ids, image.aspect_ratio_mask)

    @property
    def position(self) -> int:
        return self._e.position

    def _prefill_chunk(self, chunk: ChunkInputs, finish: Finish | None):
        return self._e.prefill_chunk(chunk, finish)

    def _decode(self, token: int, head: SampleHeadInputs | None):
        return self._e.decode(token, head)

    @property
    def memory(self) -> dict[str, int]:
        return dict(self._e.memory_info())

    @property
    def timings_ms(self) -> dict[str, float]:
        """Device time of the last vit (+ cross K/V) / prefill chunk / decode call (ms), measured in C++."""
        return {"vit": self._e.last_vit_ms, "prefill": self._e.last_prefill_ms, "decode": self._e.last_decode_ms}

    def net_io(self, name: str) -> dict:
        """Inputs/outputs (name, shape, dtype) of one net of the bmodel."""
        return self._e.net_io(name)

    def close(self) -> None:
        self._e.deinit()
