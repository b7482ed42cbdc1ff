"""The `llama-crab` command: `serve`, `models`, `complete`.

Each subcommand lives with the code it drives; this module only wires them together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_crab_client.cli import add_complete_parser

    from . import models
    from .server import config

    parser = argparse.ArgumentParser(prog="llama-crab", description="Serve a GGUF model over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    config.add_serve_parser(sub)
    models.add_models_parser(sub)
    add_complete_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Each add_*_parser sets `func` via set_defaults; it returns the exit status.
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
