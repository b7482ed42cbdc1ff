"""The session file: a token history and its KV state, tied to the model that made them.

Layout: the magic `LCRABSES`, a little-endian u32 header length, a JSON header (format
version, the model's identity, the session's tokens, the tokens the state covers), then
the state itself: llama.cpp's per-sequence state (`llama_state_seq_get_data`). llama.cpp's
own session file records no model identity, so a state from another model of the same
shape would load silently; the header is what makes that a clear error.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from llama_crab_client.errors import InvalidArgumentError
from llama_crab_client.types import ModelInfo

__all__ = ["SessionFile", "model_identity", "read_session_file", "write_session_file"]

MAGIC = b"LCRABSES"
VERSION = 1
_MAX_HEADER_BYTES = 64 << 20


@dataclass(frozen=True)
class SessionFile:
    tokens: list[int]
    state_tokens: list[int]
    state: bytes
    # llama.cpp's sequence state records the context's stream layout (one stream per slot):
    # it restores only into a context with as many slots.
    n_slots: int


def model_identity(info: ModelInfo) -> dict[str, Any]:
    """What must match for a saved state to mean the same thing to this model."""
    return {
        "name": info.name,
        "architecture": info.architecture,
        "description": info.description,
        "n_params": info.n_params,
        "n_vocab": info.n_vocab,
        "n_ctx_train": info.n_ctx_train,
    }


def write_session_file(path: str, identity: dict[str, Any], session: SessionFile) -> None:
    header = json.dumps(
        {
            "version": VERSION,
            "model": identity,
            "n_slots": session.n_slots,
            "tokens": session.tokens,
            "state_tokens": session.state_tokens,
        }
    ).encode("utf-8")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:  # written aside and renamed: a crash never leaves half a file
        f.write(MAGIC + struct.pack("<I", len(header)) + header + session.state)
    os.replace(tmp, path)


def _bad(why: str) -> InvalidArgumentError:
    return InvalidArgumentError.for_field("session", why)


def read_session_file(path: str, identity: dict[str, Any]) -> SessionFile:
    """Read and check a session file; InvalidArgumentError (field `session`) if it is not
    one, is damaged, or was saved with another model."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                raise _bad(f"{path!r} is not a llama-crab session file")
            (n,) = struct.unpack("<I", head[len(MAGIC) :])
            if n > _MAX_HEADER_BYTES:
                raise _bad(f"{path!r} has a damaged header")
            raw = f.read(n)
            state = f.read()
    except OSError as e:
        raise _bad(f"cannot read {path!r}: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        tokens = [int(t) for t in header["tokens"]]
        state_tokens = [int(t) for t in header["state_tokens"]]
        saved = header["model"]
        version = header["version"]
        n_slots = int(header["n_slots"])
    except (ValueError, KeyError, TypeError):
        raise _bad(f"{path!r} has a damaged header") from None
    if version != VERSION:
        raise _bad(f"{path!r} is format version {version}; this build reads {VERSION}")
    if saved != identity:
        raise _bad(
            f"{path!r} was saved with model {saved.get('name')!r} ({saved.get('description')}); "
            f"this is {identity['name']!r} ({identity['description']})"
        )
    return SessionFile(tokens, state_tokens, state, n_slots)
