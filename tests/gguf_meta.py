"""Read one string from a GGUF file's metadata, independently of llama.cpp (the tests
compare llama.cpp's use of the chat template with Python's jinja2 rendering of it)."""

from __future__ import annotations

import struct
from typing import BinaryIO, Optional

# GGUF value types and their fixed sizes (strings and arrays are read separately).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", f.read(4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", f.read(8))[0])


def _string(f: BinaryIO) -> str:
    return f.read(_u64(f)).decode("utf-8")


def _skip(f: BinaryIO, kind: int) -> None:
    if kind in _FIXED:
        f.seek(_FIXED[kind], 1)
    elif kind == _STRING:
        f.seek(_u64(f), 1)
    elif kind == _ARRAY:
        item, count = _u32(f), _u64(f)
        if item in _FIXED:
            f.seek(_FIXED[item] * count, 1)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_string(path: str, key: str) -> Optional[str]:
    """The string value of `key` in the GGUF header, or None if absent."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _u32(f)  # version
        _u64(f)  # tensor count
        for _ in range(_u64(f)):
            name, kind = _string(f), _u32(f)
            if name == key and kind == _STRING:
                return _string(f)
            _skip(f, kind)
    return None
