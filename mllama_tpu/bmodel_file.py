"""A NAME.bmodel as a file: checked here before libbmrt is handed it.

TPU-MLIR writes a bmodel as a fixed header (magic, header size, flatbuffer size, binary size),
then the flatbuffer that describes the nets, then the binary (weights and command streams).
libbmrt refuses a file shorter than its header declares, but a flipped bit in the flatbuffer
can make it throw std::bad_alloc or abort the whole process from an assert
(tests/test_fuzz_bmodel.py keeps such files). So the engine checks two things first: the
header against the file's size, and, where compile left its stamp beside the bmodel, a sha256 of
header + flatbuffer (tens of KB to a few MB) against the one compile recorded. The binary is not
hashed at open: it is gigabytes on a real model.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from mllama_tpu.errors import UserError

MAGIC = 0xFF55AAEE
_HEADER = struct.Struct("<IIIQ")  # magic, header_size, flatbuffers_size, binary_size (little endian)
DIGEST_KEY = "bmodel_head_sha256"  # in NAME.bmodel.stamp.json, written by compile
RECOMPILE = "recompile it with compile/compile.sh"


def head_length(path: Path) -> int:
    """Bytes of header + flatbuffer; UserError unless the file is a whole bmodel by its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read bmodel {path} ({e.strerror or e})") from None
    if len(head) < _HEADER.size:
        raise UserError(f"{path}: not a complete bmodel ({size} bytes, shorter than a bmodel header); {RECOMPILE}")
    magic, header_size, flatbuffers_size, binary_size = _HEADER.unpack(head)
    if magic != MAGIC:
        raise UserError(f"{path}: not a bmodel (magic {magic:#010x}, a bmodel starts with {MAGIC:#010x}); {RECOMPILE}")
    if header_size < _HEADER.size or flatbuffers_size == 0:
        raise UserError(f"{path}: not a complete bmodel (its header is damaged: header size {header_size}, "
                        f"flatbuffer size {flatbuffers_size}); {RECOMPILE}")
    declared = header_size + flatbuffers_size + binary_size
    if declared > size:
        raise UserError(f"{path}: not a complete bmodel (its header declares {declared} bytes, the file has "
                        f"{size}: truncated or damaged); {RECOMPILE}")
    return header_size + flatbuffers_size


def head_sha256(path: Path) -> str:
    """The digest compile records and the engine compares: header + flatbuffer."""
    n = head_length(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def check_bmodel(path: str | Path) -> None:
    """Refuse (one-line UserError) a bmodel that is incomplete by its header or whose header +
    flatbuffer differ from what compile recorded beside it; a bmodel without a stamp (copied to a
    device alone) gets the header check only."""
    from mllama_tpu.compile.cache import read_stamp, stamp_path

    path = Path(path)
    digest = head_sha256(path)
    stamp = read_stamp(path)
    recorded = stamp.get(DIGEST_KEY) if isinstance(stamp, dict) else None
    if isinstance(recorded, str) and recorded != digest:
        raise UserError(f"{path}: damaged bmodel (its header and net descriptions differ from what compile "
                        f"recorded in {stamp_path(path).name}); {RECOMPILE}")
