"""`llama-crab serve` options: the `ServeConfig` dataclass and its command line.

Every option is a flag with an environment-variable twin (`--max-queue` <->
`LLAMA_CRAB_MAX_QUEUE`); a flag given on the command line wins over the variable,
the variable over the built-in default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["ENV_PREFIX", "OPTIONS", "ServeConfig", "add_serve_parser", "config_from_args"]

ENV_PREFIX = "LLAMA_CRAB_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
EVENT_LOOPS = ("uvloop", "asyncio")


@dataclass(frozen=True)
class ServeConfig:
    """How to run the gRPC service. Defaults serve smollm2-135m on 127.0.0.1:50051."""

    # model and engine
    model: str = "smollm2-135m"
    n_ctx: int = 4096
    parallel: int = 4
    max_queue: int = 64
    n_batch: int = 512
    prefill_step: int = 128
    threads: Optional[int] = None
    adaptive_threads: bool = True
    n_gpu_layers: int = -1
    deterministic: bool = False
    # what one request may cost the others (see LlamaParams)
    max_grammar_bytes: int = 32 * 1024
    max_sample_ms: float = 100.0
    stream_buffer_kib: int = 256
    slow_reader_timeout: float = 120.0  # < 0: never
    # prefix cache (see LlamaParams)
    cache_prompt: bool = True
    cache_ram: int = 512
    # chat: a Jinja template file used instead of the model's own
    chat_template: Optional[str] = None
    # embeddings (see LlamaParams): tokens per input (0 = the model's, at most 512), and per call
    embed_ctx: int = 0
    max_embed_inputs: int = 256
    max_embed_tokens: int = 16384
    # speculative decoding (see llama_crab.Speculative): llama.cpp's type names, comma-separated
    spec_type: Optional[str] = None
    spec_draft_model: Optional[str] = None
    spec_draft_n_max: int = 16
    spec_draft_n_min: int = 0
    spec_draft_p_min: float = 0.75
    spec_ngram_size_n: int = 12
    spec_ngram_size_m: int = 48
    spec_ngram_min_hits: int = 1
    spec_ngram_mod_n_match: int = 24
    spec_ngram_mod_n_min: int = 48
    spec_ngram_mod_n_max: int = 64
    # network
    host: str = "127.0.0.1"
    port: int = 50051
    # The OpenAI-compatible HTTP API on the same host (HTTP_OFF: none).
    http_port: int = 8080
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int = 0
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    keepalive_min_ping_interval: float = 10.0
    # security
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    auth_token: Optional[str] = None
    auth_token_file: Optional[str] = None
    # operations
    grace: float = 30.0
    metrics_port: int = 0
    metrics_host: Optional[str] = None
    reflection: bool = True
    # uvloop when installed (the default install has it on Linux and macOS): the event loop
    # wakes once per streamed token, and uvloop's wakeup costs ~16% less CPU than asyncio's,
    # CPU that otherwise comes out of decoding on a small host (docs/performance.md, #14).
    event_loop: str = "uvloop"
    log_level: str = "info"
    log_format: str = "text"

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def spec_types(self) -> tuple[str, ...]:
        """--spec-type as a tuple of names; empty (or "none") when not speculating."""
        names = tuple(n.strip() for n in (self.spec_type or "").split(",") if n.strip())
        return () if names == ("none",) else names

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def violations(self) -> list[tuple[str, str]]:
        """(field, problem) for every invalid setting; empty when the config can run."""
        out: list[tuple[str, str]] = []

        def at_least(name: str, low: float) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                out.append((name, f"must be >= {low}"))

        for name in ("n_ctx", "parallel", "n_batch"):
            at_least(name, 1)
        for name in (
            "max_queue",
            "max_concurrent_rpcs",
            "grace",
            "keepalive_min_ping_interval",
            "max_grammar_bytes",
            "max_sample_ms",
            "stream_buffer_kib",
            "cache_ram",
            "prefill_step",
            "embed_ctx",
        ):
            at_least(name, 0)
        for name in ("max_embed_inputs", "max_embed_tokens"):
            at_least(name, 1)

        for name in ("keepalive_time", "keepalive_timeout"):
            at_least(name, 0.001)
        at_least("max_message_bytes", 1024)
        if self.threads is not None:
            at_least("threads", 1)
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 65535:
                out.append((name, "must be a port number in [0, 65535]"))
        if not isinstance(self.http_port, int) or not (self.http_port == HTTP_OFF or 0 <= self.http_port <= 65535):
            out.append(("http_port", "must be a port number in [0, 65535] or off"))
        if not self.model:
            out.append(("model", "must name a catalogue model or a .gguf file"))
        if (self.tls_cert is None) != (self.tls_key is None):
            out.append(("tls_cert", "--tls-cert and --tls-key go together"))
        if self.tls_client_ca is not None and self.tls_cert is None:
            out.append(("tls_client_ca", "needs --tls-cert and --tls-key (mutual TLS is TLS first)"))
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "chat_template"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                out.append((name, f"no such file: {path!r}"))
        if self.auth_token is not None and self.auth_token_file is not None:
            out.append(("auth_token", "give --auth-token or --auth-token-file, not both"))
        if self.auth_token is not None and not self.auth_token.strip():
            out.append(("auth_token", "must not be empty"))
        if self.spec_draft_model is not None and "draft-simple" not in self.spec_types:
            out.append(("spec_draft_model", "needs --spec-type draft-simple"))
        if "draft-simple" in self.spec_types and not self.spec_draft_model:
            out.append(("spec_type", "draft-simple needs --spec-draft-model"))
        if self.log_level not in LOG_LEVELS:
            out.append(("log_level", f"must be one of {', '.join(LOG_LEVELS)}"))
        if self.log_format not in LOG_FORMATS:
            out.append(("log_format", f"must be one of {', '.join(LOG_FORMATS)}"))
        return out

    def resolved_auth_token(self) -> Optional[str]:
        """The bearer token clients must send, read from --auth-token-file if given."""
        if self.auth_token_file is not None:
            with open(self.auth_token_file, encoding="utf-8") as f:
                token = f.read().strip()
            if not token:
                raise ValueError(f"--auth-token-file {self.auth_token_file!r} is empty")
            return token
        return self.auth_token


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _optional_int(text: str) -> Optional[int]:
    return None if text.strip().lower() in ("", "auto") else int(text)


HTTP_OFF = -1


def _port_or_off(text: str) -> int:
    return HTTP_OFF if text.strip().lower() == "off" else int(text)


def _seconds_or_never(text: str) -> float:
    return -1.0 if text.strip().lower() == "never" else float(text)


@dataclass(frozen=True)
class Option:
    """One `serve` option: its flag, its env twin and how to parse a string into it."""

    dest: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    choices: Optional[tuple[str, ...]] = None
    unset: str = "unset"  # what leaving it unset means, for --help
    alone: Any = None  # the value of the flag given without one (`--deterministic`); None: it needs one

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("model", str, "NAME|PATH", "catalogue model name (see `llama-crab models`) or a .gguf file path"),
    Option("host", str, "HOST", "address to listen on (0.0.0.0 or :: for every interface)"),
    Option("port", int, "PORT", "gRPC port (0 = pick a free one; the chosen port is logged)"),
    Option(
        "http_port",
        _port_or_off,
        "PORT|off",
        "OpenAI-compatible HTTP port on the same host (0 = pick a free one and log it; off = no HTTP)",
    ),
    Option("n_ctx", int, "N", "context size in tokens, shared by all slots (each gets n_ctx / parallel)"),
    Option("parallel", int, "N", "sequences generated at once (slots sharing one context)"),
    Option(
        "max_queue", int, "N", "requests that may wait for a free slot; more get RESOURCE_EXHAUSTED (0 = unbounded)"
    ),
    Option("n_batch", int, "N", "prompt tokens decoded per step"),
    Option(
        "prefill_step",
        int,
        "N",
        "prompt tokens one step may prefill beside decoding streams (0 = --n-batch; a prompt alone gets "
        "whole batches): lower keeps their inter-token latency down while a long prompt arrives",
    ),
    Option(
        "embed_ctx",
        int,
        "N",
        "Embed: tokens one input may have (0 = the model's training context, at most 512); a generative "
        "model's embedding context holds a vocabulary of logits per token",
    ),
    Option("max_embed_inputs", int, "N", "Embed: inputs one call may have; more get INVALID_ARGUMENT"),
    Option("max_embed_tokens", int, "N", "Embed: tokens of all of one call's inputs; more get INVALID_ARGUMENT"),
    Option("threads", _optional_int, "N", "CPU threads for decoding and prompt processing", unset="every core"),
    Option(
        "adaptive_threads",
        _bool,
        "BOOL",
        "use a thread fewer while another process takes CPU cores, all again once one is idle (true/false)",
    ),
    Option("n_gpu_layers", int, "N", "layers offloaded to a GPU build's device (-1 = all)"),
    Option(
        "deterministic",
        _bool,
        "BOOL",
        "a request's tokens and logprobs do not depend on the batch, the load, the prefix cache or speculation "
        "(CPU; slower prefill: docs/determinism.md); the flag alone means true",
        alone=True,
    ),
    Option(
        "cache_prompt",
        _bool,
        "BOOL",
        "prefix cache: a request reuses the KV of the longest prompt prefix a slot holds (true/false)",
    ),
    Option(
        "cache_ram",
        int,
        "MIB",
        "host-RAM cache of evicted prompt prefixes (KV), restored when a later prompt shares them (0 = off)",
    ),
    Option(
        "chat_template",
        str,
        "FILE",
        "a Jinja chat template file used by Chat instead of the model's own (e.g. for a GGUF without one)",
        unset="the model's (ChatML if it has none)",
    ),
    Option(
        "spec_type",
        str,
        "TYPES",
        "speculative decoding with llama.cpp's drafters, comma-separated as llama-server takes them: "
        "ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache (drafts from the stream's own "
        "text: edits, rewrites, code), draft-simple (with --spec-draft-model); requests may opt out",
        unset="off",
    ),
    Option(
        "spec_draft_model",
        str,
        "NAME|PATH",
        "draft model for draft-simple: a catalogue name or .gguf path sharing the model's vocabulary",
        unset="none",
    ),
    Option("spec_draft_n_max", int, "N", "most tokens the draft model proposes per step"),
    Option("spec_draft_n_min", int, "N", "draft-model proposals shorter than this are dropped"),
    Option("spec_draft_p_min", float, "P", "the draft model stops at a token it gives less probability than this"),
    Option("spec_ngram_size_n", int, "N", "ngram-simple/-map-k/-map-k4v: length of the n-gram looked up"),
    Option("spec_ngram_size_m", int, "N", "ngram-simple/-map-k/-map-k4v: length of the continuation proposed"),
    Option("spec_ngram_min_hits", int, "N", "ngram-map-k/-map-k4v: times an n-gram must have been seen"),
    Option("spec_ngram_mod_n_match", int, "N", "ngram-mod: length of the n-gram looked up"),
    Option("spec_ngram_mod_n_min", int, "N", "ngram-mod: shortest draft proposed"),
    Option("spec_ngram_mod_n_max", int, "N", "ngram-mod: longest draft proposed"),
    Option("max_grammar_bytes", int, "BYTES", "largest GBNF grammar a request may carry (0 = no limit)"),
    Option(
        "max_sample_ms",
        float,
        "MS",
        "CPU time one stream's sampling (grammar, sampler chain) may take per step; a stream over it ends "
        "with INVALID_ARGUMENT, so no request stalls the others longer (0 = no limit)",
    ),
    Option(
        "stream_buffer_kib",
        int,
        "KIB",
        "output a stream may buffer for a client that does not read; past it generation pauses (0 = no limit)",
    ),
    Option(
        "slow_reader_timeout",
        _seconds_or_never,
        "SECONDS",
        "a stream paused this long for its reader is cancelled (0 = cancel instead of pausing; never or -1 = wait)",
    ),
    Option(
        "grace", float, "SECONDS", "on SIGTERM/SIGINT, time in-flight streams get to finish before they are cancelled"
    ),
    Option("metrics_port", int, "PORT", "Prometheus /metrics HTTP port (0 = off)"),
    Option("metrics_host", str, "HOST", "address of the metrics endpoint", unset="same as --host"),
    Option("tls_cert", str, "FILE", "PEM server certificate (chain); enables TLS, needs --tls-key"),
    Option("tls_key", str, "FILE", "PEM private key of --tls-cert"),
    Option(
        "tls_client_ca", str, "FILE", "PEM CA bundle; when given, clients must present a certificate it signed (mTLS)"
    ),
    Option("auth_token", str, "TOKEN", "require `authorization: Bearer TOKEN` metadata (health checks exempt)"),
    Option("auth_token_file", str, "FILE", "like --auth-token, read from a file (keeps the token out of `ps`)"),
    Option("keepalive_time", float, "SECONDS", "ping idle connections this often to notice dead peers"),
    Option("keepalive_timeout", float, "SECONDS", "drop a connection whose ping is not answered in time"),
    Option(
        "keepalive_min_ping_interval",
        float,
        "SECONDS",
        "shortest client ping interval tolerated (faster pings get GOAWAY)",
    ),
    Option("max_message_bytes", int, "BYTES", "largest request or response message"),
    Option(
        "max_concurrent_rpcs",
        int,
        "N",
        "RPCs handled at once, beyond which new ones fail RESOURCE_EXHAUSTED; HTTP requests in flight get 503 "
        "beyond it (0 = no limit)",
    ),
    Option("reflection", _bool, "BOOL", "serve gRPC server reflection (true/false)"),
    Option(
        "event_loop",
        str,
        "LOOP",
        "asyncio event loop: uvloop (falls back to asyncio where uvloop is not installed) or asyncio",
        EVENT_LOOPS,
    ),
    Option("log_level", str, "LEVEL", "log level", LOG_LEVELS),
    Option("log_format", str, "FORMAT", "log line format: text, or json (one object per line)", LOG_FORMATS),
)


class ConfigError(ValueError):
    """A bad option; the message names the flag and its environment variable."""


def _describe(option: Option) -> str:
    return f"{option.flag} ({option.env})"


def config_from_args(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> ServeConfig:
    """Flag value, else the environment twin, else the dataclass default. Raises ConfigError."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    by_dest = {o.dest: o for o in OPTIONS}
    for option in OPTIONS:
        given = getattr(args, option.dest, None)
        if given is not None:
            values[option.dest] = given
        elif option.env in env:
            raw = env[option.env]
            if option.choices is not None and raw not in option.choices:
                raise ConfigError(f"{option.env}={raw!r}: must be one of {', '.join(option.choices)}")
            try:
                values[option.dest] = option.parse(raw)
            except ValueError as e:
                raise ConfigError(f"{option.env}={raw!r}: {e}") from None
    config = ServeConfig(**values)
    problems = config.violations()
    if problems:
        raise ConfigError("; ".join(f"{_describe(by_dest[f])}: {why}" for f, why in problems))
    return config


def _argparse_type(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = option.metavar.lower()
    return parse


def _default_text(option: Option) -> str:
    default = getattr(ServeConfig(), option.dest)
    if default is None:
        return option.unset
    return str(default).lower() if isinstance(default, bool) else str(default)


def _run(args: argparse.Namespace) -> int:
    from .app import run_serve

    try:
        config = config_from_args(args)
    except ConfigError as e:
        args.serve_parser.error(str(e))  # exits 2
    return run_serve(config)


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to an argparse subparsers object."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve a GGUF model over gRPC",
        description=(
            "Serve a GGUF model over gRPC (service llama_crab.v1.LlamaCrabService, plus grpc.health.v1 health "
            "and server reflection). Every flag has an environment variable twin, shown in brackets; "
            "a flag wins over its variable. With no flags: smollm2-135m on 127.0.0.1:50051."
        ),
    )
    for option in OPTIONS:
        alone: dict[str, Any] = {} if option.alone is None else {"nargs": "?", "const": option.alone}
        parser.add_argument(
            option.flag,
            dest=option.dest,
            type=_argparse_type(option),
            metavar=option.metavar,
            choices=option.choices,
            default=None,  # None = not given: fall back to the env twin, then the default
            help=f"{option.help} [{option.env}; default: {_default_text(option)}]",
            **alone,
        )
    parser.set_defaults(func=_run, serve_parser=parser)
    return parser
