"""Resume stamps: a piece is rebuilt only when something that shapes its bmodel changed.

A stamp is written (atomically: temp file + rename) only after the piece's bmodel is in place,
so a compile killed at any moment leaves either no stamp (the piece is redone) or a stamp that
matches a finished bmodel. The stamp holds the bmodel's own checksum too, so a bmodel replaced
or truncated by hand is noticed.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllama_tpu.compile.pieces import sha256_file


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StampKey:
    """Everything that decides a piece's bmodel."""

    onnx_sha256: str
    mode: str
    group_size: int
    chip: str
    policy: dict[str, Any]  # flags actually passed (PiecePolicy.to_dict + model_transform args)
    tpu_mlir_version: str

    def to_dict(self) -> dict[str, Any]:
        return {"onnx_sha256": self.onnx_sha256, "mode": self.mode, "group_size": self.group_size,
                "chip": self.chip, "policy": self.policy, "tpu_mlir_version": self.tpu_mlir_version}


def stamp_path(bmodel: Path) -> Path:
    return bmodel.with_name(bmodel.name + ".stamp.json")


def read_stamp(bmodel: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads(stamp_path(bmodel).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 (a damaged stamp is no stamp)
        return None
    return stamp if isinstance(stamp, dict) else None


def is_fresh(bmodel: Path, key: StampKey) -> bool:
    stamp = read_stamp(bmodel)
    if stamp is None or stamp.get("key") != key.to_dict() or not bmodel.is_file():
        return False
    return bmodel.stat().st_size == stamp.get("bmodel_size") and sha256_file(bmodel) == stamp.get("bmodel_sha256")


def write_stamp(bmodel: Path, key: StampKey, extra: dict[str, Any]) -> None:
    write_json_atomic(stamp_path(bmodel), {"key": key.to_dict(), "bmodel_size": bmodel.stat().st_size,
                                           "bmodel_sha256": sha256_file(bmodel), **extra})
