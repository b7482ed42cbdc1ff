"""The `llama-crab` command: `serve`, `models`, `complete`, `chat`.

Each subcommand lives with the code it drives; this module only wires them together.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .llama import Llama


def _open_chat_model(args: argparse.Namespace) -> Llama:
    """`llama-crab chat` without --server: load the model as `serve` would (catalogue name
    or path, fetched if needed), with one slot since one conversation uses it."""
    from .server.app import load_llama
    from .server.config import ConfigError, ServeConfig

    config = ServeConfig(
        model=args.model, n_ctx=args.n_ctx, parallel=1, threads=args.threads, n_gpu_layers=args.n_gpu_layers
    )
    problems = config.violations()
    if problems:
        raise ConfigError("; ".join(f"--{field.replace('_', '-')}: {why}" for field, why in problems))
    return load_llama(config)


def _add_chat_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from llama_crab_client.repl import add_chat_parser

    from .models import DEFAULT_MODEL
    from .server.config import ServeConfig

    p = add_chat_parser(sub, open_local=_open_chat_model)
    g = p.add_argument_group("model (without --server)")
    default_model = os.environ.get("LLAMA_CRAB_MODEL", DEFAULT_MODEL)
    g.add_argument(
        "--model",
        default=default_model,
        metavar="NAME|PATH",
        help=f"catalogue model name (see `llama-crab models`) or a .gguf file [$LLAMA_CRAB_MODEL; {DEFAULT_MODEL}]",
    )
    g.add_argument(
        "--n-ctx", type=int, default=ServeConfig.n_ctx, metavar="N", help="context size in tokens [%(default)s]"
    )
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads [every core]")
    g.add_argument(
        "--n-gpu-layers",
        type=int,
        default=ServeConfig.n_gpu_layers,
        metavar="N",
        help="layers offloaded to a GPU build's device [-1 = all]",
    )


def build_parser() -> argparse.ArgumentParser:
    from llama_crab_client.cli import add_complete_parser

    from . import models
    from .server import config

    parser = argparse.ArgumentParser(prog="llama-crab", description="Serve a GGUF model over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    config.add_serve_parser(sub)
    models.add_models_parser(sub)
    add_complete_parser(sub)
    _add_chat_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Each add_*_parser sets `func` via set_defaults; it returns the exit status.
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
