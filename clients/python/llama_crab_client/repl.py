"""`llama-crab chat` / `llama-crab-client chat`: a terminal chat over a `ChatSession`.

Each line typed at the `> ` prompt is a user message; the reply streams to stdout as it
arrives. Lines starting with `/` are commands (`/help` lists them). Ctrl-C while a reply
streams stops that reply (what was delivered stays in the history) and returns to the
prompt; Ctrl-C at the prompt gives a fresh prompt; Ctrl-D (end of input) exits with 0.

The REPL is the same for both backends: `llama-crab chat` loads a model in process (the
`open_local` hook of `add_chat_parser`), `--server HOST:PORT` talks to a llama-crab server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, Callable, ContextManager, Optional, Protocol, TextIO

from .chat import ChatChunk, ChatCompletion, ChatMessage
from .chat_session import ChatBackend, ChatSession, load_history
from .cli import add_connection_arguments, client_from_args
from .errors import LlamaCrabError
from .types import CompletionOptions, ModelInfo, StreamControl

__all__ = ["ChatModel", "ChatRepl", "add_chat_parser", "run_chat"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
PROMPT = "> "

HELP = """\
Type a message and press Enter; the reply streams as it is generated.
  /reset        forget the conversation (the system prompt stays)
  /system TEXT  set the system prompt (/system alone shows it)
  /save FILE    write the history as JSON
  /load FILE    replace the history with one written by /save
  /help         this text
  /quit         leave (so does Ctrl-D)
Ctrl-C stops a reply as it streams (twice: abandon it at once). //text sends "/text"."""


class ChatModel(ChatBackend, Protocol):
    """A chat backend that can describe its model: `Llama` and `Client` both are one."""

    def model_info(self) -> ModelInfo: ...


# Opens the in-process backend from the parsed arguments (a context manager that frees it).
LocalOpener = Callable[[argparse.Namespace], ContextManager[ChatModel]]


class ChatRepl:
    """The read-send-print loop around one `ChatSession`; `run()` returns the exit status."""

    def __init__(
        self,
        session: ChatSession,
        options: CompletionOptions,
        *,
        stdin: Optional[TextIO] = None,
        stdout: Optional[TextIO] = None,
        stderr: Optional[TextIO] = None,
        verbose: bool = False,
    ) -> None:
        self.session = session
        self.options = options
        self.verbose = verbose
        self._stdin = stdin  # None: the terminal, through input() (readline editing)
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self._stop_requested = False
        self._abandoned = False
        self._show_reasoning = _isatty(self.out)
        self._in_reasoning = False
        self._at_line_start = True

    # ---- input ------------------------------------------------------------------------
    def _read_line(self) -> str:
        if self._stdin is None:
            return input(PROMPT)  # EOFError at end of input, KeyboardInterrupt on Ctrl-C
        self.out.write(PROMPT)
        self.out.flush()
        line = self._stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def run(self) -> int:
        """Prompt, read, answer, until /quit or end of input. Never lets Ctrl-C escape."""
        if self._stdin is None:
            _enable_line_editing()
        while True:
            try:
                try:
                    line = self._read_line()
                except EOFError:
                    self.out.write("\n")
                    self.out.flush()
                    return 0
                if not self.handle(line):
                    return 0
            except KeyboardInterrupt:  # at the prompt, or between a reply and the prompt
                self.out.write("\n")
                self.out.flush()

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the REPL should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        self.send(text[1:] if text.startswith("//") else line)
        return True

    # ---- commands ---------------------------------------------------------------------
    def _say(self, message: str) -> None:
        self.out.write(message + "\n")
        self.out.flush()

    def _complain(self, message: str) -> None:
        self.out.flush()
        self.err.write(message + "\n")
        self.err.flush()

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name in ("/help", "/?"):
            self._say(HELP)
        elif name == "/reset":
            self.session.reset()
            kept = " (system prompt kept)" if self.session.system else ""
            self._say(f"conversation reset{kept}")
        elif name == "/system":
            if arg:
                self.session.system = arg
                self._say("system prompt set")
            else:
                self._say(f"system prompt: {self.session.system}" if self.session.system else "no system prompt")
        elif name in ("/save", "/load"):
            if not arg:
                self._complain(f"usage: {name} FILE")
            elif name == "/save":
                self._save(os.path.expanduser(arg))
            else:
                self._load(os.path.expanduser(arg))
        else:
            self._complain(f"unknown command {name}; /help lists them")
        return True

    def _save(self, path: str) -> None:
        try:
            self.session.save(path)
        except (OSError, ValueError, TypeError) as e:
            self._complain(f"cannot save to {path}: {_reason(e)}")
            return
        self._say(f"saved {_count(self.session.messages)} to {path}")

    def _load(self, path: str) -> None:
        try:
            messages = load_history(path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            self._complain(f"cannot load {path}: {_reason(e)}")
            return
        self.session.messages = messages
        self._say(f"loaded {_count(messages)} from {path}")

    # ---- a turn -----------------------------------------------------------------------
    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._at_line_start = text.endswith("\n")

    def _on_chunk(self, chunk: ChatChunk) -> Optional[StreamControl]:
        # The chunk STOP is returned for counts as delivered (it is in the reply the
        # session records), so it is printed too: the screen and the history agree.
        delta = chunk.delta
        if delta.reasoning_content and self._show_reasoning:
            if not self._in_reasoning:
                self._in_reasoning = True
                self.out.write("\x1b[2m")  # dim, until the answer starts
            self._write(delta.reasoning_content)
        if delta.content:
            self._end_reasoning()
            self._write(delta.content)
        return StreamControl.STOP if self._stop_requested else StreamControl.CONTINUE

    def _end_reasoning(self) -> None:
        if self._in_reasoning:
            self._in_reasoning = False
            self.out.write("\x1b[0m")
            self._write("\n" if not self._at_line_start else "")
            self.out.flush()

    def _on_sigint(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._abandoned:  # already unwinding: let the stream close in peace
            return
        if self._stop_requested:
            # A second Ctrl-C: the stream may be stuck before its next chunk (a busy
            # server's queue), so abandon the call now.
            self._abandoned = True
            raise KeyboardInterrupt
        self._stop_requested = True

    @contextlib.contextmanager
    def _sigint_stops_reply(self) -> Iterator[None]:
        """While a reply streams, Ctrl-C sets a flag the stream callback turns into STOP:
        the engine (C++ or the RPC) is never interrupted mid-call, and the reply delivered
        so far is kept. Only the main thread may set signal handlers; elsewhere no SIGINT
        reaches this code anyway."""
        self._stop_requested = False
        self._abandoned = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def send(self, text: str) -> Optional[ChatCompletion]:
        """Send `text` as a user message, stream the reply; None if it failed or was abandoned."""
        session = self.session
        before = len(session.messages)
        delivered: list[str] = []

        def callback(chunk: ChatChunk) -> Optional[StreamControl]:
            if chunk.delta.content:
                delivered.append(chunk.delta.content)
            return self._on_chunk(chunk)

        self._at_line_start = True
        self._in_reasoning = False
        reply: Optional[ChatCompletion] = None
        try:
            with self._sigint_stops_reply():
                reply = session.send(text, self.options, callback)
        except KeyboardInterrupt:  # a second Ctrl-C abandoned the call
            self._keep_delivered(before, delivered)
            self._finish_line()
            self._complain("(reply abandoned)")
            return None
        except LlamaCrabError as e:
            self._keep_delivered(before, delivered)
            self._finish_line()
            where = f" (field {e.field})" if e.field else ""
            self._complain(f"error: {e.status}{where}: {e.message}")
            return None
        except Exception as e:  # a fault in the stream machinery: report it, keep the REPL
            self._keep_delivered(before, delivered)
            self._finish_line()
            self._complain(f"error: {type(e).__name__}{f': {e}' if str(e) else ''}")
            return None
        self._finish_line()
        if not reply.message.content and not reply.message.tool_calls and not delivered:
            self._complain("(empty reply)")
        if self.verbose:
            u = reply.usage
            self._complain(
                f"[prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached), "
                f"completion {u.completion_tokens} tokens, finish: {reply.finish_reason}]"
            )
        return reply

    def _keep_delivered(self, before: int, delivered: list[str]) -> None:
        """After a turn that raised: the history as the user saw it. A reply cut short keeps
        what was delivered (as STOP would); a message with no reply at all is taken back."""
        messages = self.session.messages
        if len(messages) == before + 1 and messages[-1].role == "user":
            if delivered:
                messages.append(ChatMessage.assistant("".join(delivered)))
            else:
                messages.pop()

    def _finish_line(self) -> None:
        self._end_reasoning()
        if not self._at_line_start:
            self._write("\n")


def _count(messages: list[ChatMessage]) -> str:
    n = sum(1 for m in messages if m.role != "system")
    system = " and the system prompt" if any(m.role == "system" for m in messages) else ""
    return f"{n} message{'' if n == 1 else 's'}{system}"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _enable_line_editing() -> None:
    """Line editing and in-session history for input(), where readline exists."""
    if not _isatty(sys.stdin):
        return
    try:
        import readline  # noqa: F401  (importing it is what turns it on)
    except ImportError:
        pass


# ---- command line -------------------------------------------------------------------
def _add_chat_arguments(p: argparse.ArgumentParser, local: bool) -> None:
    g = p.add_argument_group("chat")
    g.add_argument("--system", metavar="TEXT", help="system prompt")
    g.add_argument("--load", metavar="FILE", help="start from a history written by /save")
    g.add_argument("-v", "--verbose", action="store_true", help="print token usage after each reply (stderr)")
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens per reply [256]")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy [0]")
    g.add_argument("--seed", type=int, default=None, help="sampling seed [random]")
    add_connection_arguments(p, local_alternative=local, request_id=False)


def add_chat_parser(subparsers: Any, open_local: Optional[LocalOpener] = None) -> argparse.ArgumentParser:
    """Add `chat` to an argparse subparsers object; its func(args) returns the exit status.

    Without `open_local` it only talks to a server (`--server`, default $LLAMA_CRAB_SERVER);
    with it, `--server` is optional and without it `open_local(args)` gives the backend
    (the caller adds the arguments that hook reads)."""
    local = open_local is not None
    where = "a model in process, or a llama-crab server with --server" if local else "a llama-crab server"
    p: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description=f"Chat in the terminal with {where}. Type /help at the prompt for the commands.",
    )
    _add_chat_arguments(p, local)
    p.set_defaults(func=lambda args: run_chat(args, open_local), chat_parser=p)
    return p


def _remote(args: argparse.Namespace) -> ContextManager[ChatModel]:
    return client_from_args(args)


_CONNECTION_FLAGS = ("token", "tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "timeout")


def run_chat(
    args: argparse.Namespace,
    open_local: Optional[LocalOpener] = None,
    stdin: Optional[TextIO] = None,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
) -> int:
    err = stderr or sys.stderr
    parser = getattr(args, "chat_parser", None)
    prog = parser.prog if isinstance(parser, argparse.ArgumentParser) else "chat"
    options = CompletionOptions(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    problems = options.violations()
    if problems:
        for v in problems:
            print(f"{prog}: --{v.field.replace('_', '-')}: {v.description}", file=err)
        return EXIT_ERROR
    remote = args.server is not None or open_local is None
    if open_local is not None and not remote:
        given = [f"--{name.replace('_', '-')}" for name in _CONNECTION_FLAGS if getattr(args, name, None)]
        if given:
            print(f"{prog}: {', '.join(given)}: only with --server (without it the model runs here)", file=err)
            return 2
    history: list[ChatMessage] = []
    if args.load:
        try:
            history = load_history(os.path.expanduser(args.load))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            print(f"{prog}: cannot load {args.load}: {_reason(e)}", file=err)
            return EXIT_ERROR
    try:
        opened = open_local(args) if open_local is not None and not remote else _remote(args)
        with opened as backend:
            try:
                info = backend.model_info()  # over gRPC: fails now if the server is not there
            except LlamaCrabError as e:
                what = f"cannot reach {args.server}" if remote else "the model does not answer"
                print(f"{prog}: {what}: {e.status}: {e.message}", file=err)
                return EXIT_ERROR
            session = ChatSession(backend, messages=history)
            if args.system is not None:
                session.system = args.system
            interactive = stdin is None and _isatty(sys.stdin)
            if interactive:
                where = f" at {args.server}" if remote else ""
                print(f"chatting with {info.name or 'the model'}{where}; /help for commands, Ctrl-D to quit", file=err)
            repl = ChatRepl(session, options, stdin=stdin, stdout=stdout, stderr=err, verbose=args.verbose)
            return repl.run()
    except KeyboardInterrupt:  # while loading the model or connecting
        return EXIT_INTERRUPTED
    except (LlamaCrabError, OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        message = f"{e.status}: {e.message}" if isinstance(e, LlamaCrabError) else _reason(e)
        print(f"{prog}: {message}", file=err)
        return EXIT_ERROR
