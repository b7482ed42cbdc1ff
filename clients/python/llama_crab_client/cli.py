"""`llama-crab-client complete "prompt" --server HOST:PORT` (and `llama-crab complete`);
`llama-crab-client chat` lives in `repl.py`.

Streams the text to stdout as it arrives; `--json` prints one JSON object per chunk and
then the final completion. Ctrl-C cancels the request and exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional, TextIO

from .client import Client
from .errors import LlamaCrabError
from .types import SAMPLER_NAMES, Chunk, Completion, CompletionOptions

# Options with a flag written by hand above (or none: maps and chains are API-only).
_HAND_WRITTEN = {
    "max_tokens", "stop_sequences", "logprobs", "seed", "grammar", "json_schema", "logit_bias",
    "samplers", "sampler_chain", "dry_sequence_breakers",
}  # fmt: skip
_FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(CompletionOptions) if f.name not in _HAND_WRITTEN)

__all__ = ["add_complete_parser", "add_connection_arguments", "client_from_args", "main", "run_complete"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def event_json(event: Chunk | Completion) -> str:
    kind = "chunk" if isinstance(event, Chunk) else "completion"
    return json.dumps({"type": kind, **_jsonable(event)}, ensure_ascii=False)


def add_connection_arguments(
    parser: argparse.ArgumentParser, *, local_alternative: bool = False, request_id: bool = True
) -> None:
    """The connection flags. `local_alternative`: --server is optional (default None, the
    caller then runs a model in process) and $LLAMA_CRAB_SERVER does not apply."""
    g = parser.add_argument_group("connection")
    target = "HOST:PORT or a gRPC target (dns:///host:port, ipv4:a:p,b:p)"
    if local_alternative:
        g.add_argument("--server", default=None, help=f"talk to this server instead of loading a model: {target}")
    else:
        g.add_argument(
            "--server",
            default=os.environ.get("LLAMA_CRAB_SERVER", "localhost:50051"),
            help=f"{target} [$LLAMA_CRAB_SERVER, localhost:50051]",
        )
    g.add_argument("--token", default=None, help="bearer token [$LLAMA_CRAB_TOKEN]")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) to verify the server with (implies --tls)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    g.add_argument("--tls-server-name", metavar="NAME", help="expected server name, if not the target's host")
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of the call")
    if request_id:
        g.add_argument("--request-id", default=None, help="x-request-id to send (shows in the server's logs)")


def client_from_args(args: argparse.Namespace) -> Client:
    token = args.token if args.token is not None else (os.environ.get("LLAMA_CRAB_TOKEN") or None)
    return Client(
        args.server,
        tls=bool(args.tls),
        root_certificates=args.tls_ca,
        certificate_chain=args.tls_cert,
        private_key=args.tls_key,
        server_name=args.tls_server_name,
        token=token,
        timeout=args.timeout,
    )


def _add_complete_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='the prompt ("-" reads it from stdin)')
    d = CompletionOptions()
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=d.max_tokens, help=f"[{d.max_tokens}]")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed [random]")
    g.add_argument("--grammar-file", metavar="GBNF", help="constrain the output with a GBNF grammar file")
    g.add_argument("--json-schema-file", metavar="JSON", help="constrain the output to a JSON schema file")
    g.add_argument("--samplers", metavar="A,B,...", help=f"sampler order by name: {', '.join(sorted(SAMPLER_NAMES))}")
    g.add_argument("--dry-sequence-breaker", action="append", default=[], metavar="TEXT", help="DRY breaker (repeatable)")
    # Every other scalar option gets a flag of its own name: --top-k, --mirostat, --ignore-eos ...
    for name in _FLAG_FIELDS:
        default = getattr(d, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"[{default}]")
        else:
            g.add_argument(flag, type=type(default), default=None, metavar="N", help=f"[{default}]")
    g.add_argument("--logprobs", type=int, default=None, metavar="N", help="logprobs with N alternatives (--json)")
    g.add_argument("--json", action="store_true", help="print JSON lines: each chunk, then the completion")
    add_connection_arguments(p)


def add_complete_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `complete` to an argparse subparsers object; its func(args) returns the exit status."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "complete",
        help="stream a completion from a llama-crab server",
        description="Stream a completion from a llama-crab server to stdout.",
    )
    _add_complete_arguments(p)
    p.set_defaults(func=run_complete)
    return p


def _options(args: argparse.Namespace) -> CompletionOptions:
    grammar = json_schema = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    if args.json_schema_file:
        with open(args.json_schema_file, encoding="utf-8") as f:
            json_schema = f.read()
    flags = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name) is not None}
    return CompletionOptions(
        max_tokens=args.max_tokens,
        stop_sequences=tuple(args.stop),
        logprobs=args.logprobs,
        seed=args.seed,
        grammar=grammar,
        json_schema=json_schema,
        samplers=tuple(n.strip() for n in args.samplers.split(",")) if args.samplers else None,
        dry_sequence_breakers=tuple(args.dry_sequence_breaker),
        **flags,
    )


def _error(message: str, stderr: TextIO) -> int:
    print(f"llama-crab complete: {message}", file=stderr)
    return EXIT_ERROR


def run_complete(
    args: argparse.Namespace,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
    make_client: Callable[[argparse.Namespace], Client] = client_from_args,
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        options = _options(args)
        client = make_client(args)
    except (OSError, ValueError) as e:  # unreadable file, bad TLS/target settings
        return _error(str(e), err)
    with client:
        stream = None
        try:
            stream = client.stream(prompt, options, request_id=args.request_id)
            for chunk in stream:
                _write_whole(out, event_json(chunk) + "\n" if args.json else chunk.text)
            completion = stream.completion
        except KeyboardInterrupt:
            completion = stream.close() if stream is not None else None
            if args.json and completion is not None:
                out.write(event_json(completion) + "\n")
            elif completion is not None:
                out.write("\n")
            out.flush()
            print("llama-crab complete: cancelled", file=err)
            return EXIT_INTERRUPTED
        except LlamaCrabError as e:
            where = f" (field {e.field})" if e.field else ""
            return _error(f"{e.status}{where}: {e.message}", err)
        except BrokenPipeError:  # e.g. piped into `head`: stop quietly
            if stream is not None:
                stream.close()
            _silence_stdout()
            return 0
        assert completion is not None
        if args.json:
            out.write(event_json(completion) + "\n")
        elif not completion.text.endswith("\n"):
            out.write("\n")
        out.flush()
    return 0


def _write_whole(out: TextIO, text: str) -> None:
    """Write and flush with Ctrl-C held off until done: an interrupted write would leave a
    half line, which a reader of --json lines cannot parse."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        out.write(text)
        out.flush()
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        out.write(text)
        out.flush()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _silence_stdout() -> None:
    # Python flushes stdout at exit; on a closed pipe that prints a second error.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def build_parser() -> argparse.ArgumentParser:
    from .repl import add_chat_parser  # it imports this module

    parser = argparse.ArgumentParser(prog="llama-crab-client", description="Talk to a llama-crab server.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_complete_parser(sub)
    add_chat_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before the stream started
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
