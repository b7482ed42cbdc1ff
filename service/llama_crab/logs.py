"""llama.cpp's log goes through Python `logging` (logger `llama_crab.llama_cpp`), not stderr.

Quiet by default: llama.cpp is chatty (and warns about harmless context sizes), so only
ERROR lines are forwarded unless that logger is given a level before the model loads.
"""

from __future__ import annotations

import atexit
import logging

from . import _engine

LLAMA_CPP_LOGGER = logging.getLogger("llama_crab.llama_cpp")

# ggml_log_level -> logging level
if LLAMA_CPP_LOGGER.level == logging.NOTSET:
    LLAMA_CPP_LOGGER.setLevel(logging.ERROR)

_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_installed = False


def _ggml_level(python_level: int) -> int:
    if python_level <= logging.DEBUG:
        return 1
    if python_level <= logging.INFO:
        return 2
    if python_level <= logging.WARNING:
        return 3
    return 4


def _forward(level: int, line: str) -> None:
    LLAMA_CPP_LOGGER.log(_LEVELS.get(level, logging.INFO), "%s", line)


def install_llama_log_bridge() -> None:
    """Route llama.cpp logging to `logging`; safe to call many times (it re-reads the level)."""
    global _installed
    level = _ggml_level(LLAMA_CPP_LOGGER.getEffectiveLevel())
    if not _installed:
        _engine.install_log_bridge(_forward, level)
        # Stop calling into Python once the interpreter starts shutting down.
        atexit.register(_engine.remove_log_handler)
        _installed = True
    else:
        _engine.set_log_min_level(level)
