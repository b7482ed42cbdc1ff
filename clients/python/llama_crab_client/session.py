"""`Session`: one token history continued across requests, in process or over gRPC.

Each request's prompt is the session's tokens so far (earlier prompts and what was
generated, exactly as delivered) followed by the new text. The engine's prefix cache then
finds that history in a slot (or its RAM cache) and prefills only the new tokens. The
session keeps token ids, not text, so what the engine sees is token-exact; over gRPC it
holds no server-side state, so any replica can serve the next turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Callable, Optional, Protocol, Union

from .types import Chunk, Completion, CompletionCallback, CompletionOptions, StreamControl

__all__ = ["AsyncSession", "AsyncSessionBackend", "Session", "SessionBackend"]

Text = Union[str, Sequence[int]]


class SessionBackend(Protocol):
    """What a session needs: `Llama` (in process) and `Client` (gRPC) both are one."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def create_completion(
        self, prompt: Union[str, Sequence[int]], options: Optional[CompletionOptions] = None
    ) -> Completion: ...

    def create_completion_stream(
        self, prompt: Union[str, Sequence[int]], options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion: ...


class _History:
    """The token history both session kinds keep, and how a turn extends it."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = list(tokens)

    def _prompt_from(self, new: Sequence[int]) -> list[int]:
        return self.tokens + list(new)

    def _extend(self, prompt: list[int], completion: Completion) -> Completion:
        # What was delivered, also after STOP: the history is what the caller saw.
        self.tokens = prompt + list(completion.token_ids)
        return completion

    def reset(self) -> None:
        """Forget the history (the next request starts a new one)."""
        self.tokens = []


class Session(_History):
    """Successive completions over one growing token history.

        session = llama.session()            # or client.session()
        session.create_completion("Q: 2+2?\\nA:", CompletionOptions(8))
        session.create_completion("\\nQ: and 3+3?\\nA:", CompletionOptions(8))

    `text` may also be token ids (appended as given). The history must fit a slot's
    context; past it a request fails with InvalidArgumentError naming `prompt`.
    """

    def __init__(self, backend: SessionBackend, tokens: Sequence[int] = ()) -> None:
        super().__init__(tokens)
        self._backend = backend

    def _prompt(self, text: Text) -> list[int]:
        if isinstance(text, str):
            # BOS (and other special tokens) only at the start of the history.
            return self._prompt_from(self._backend.tokenize(text, add_special=not self.tokens, parse_special=True))
        return self._prompt_from(text)

    def create_completion(self, text: Text, options: Optional[CompletionOptions] = None) -> Completion:
        prompt = self._prompt(text)
        return self._extend(prompt, self._backend.create_completion(prompt, options))

    def create_completion_stream(
        self, text: Text, options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion:
        prompt = self._prompt(text)
        return self._extend(prompt, self._backend.create_completion_stream(prompt, options, callback))

    def save(self, path: str) -> None:
        """Save the history and its KV state to a file (in process only: `Llama`); load it
        with `Llama.load_session(path)`. A gRPC session has no server state to save:
        keep `session.tokens` and pass them to `client.session(tokens)`."""
        save = getattr(self._backend, "save_session", None)
        if save is None:
            raise TypeError("only an in-process session (Llama.session()) can be saved with its KV state")
        save(self.tokens, path)


AsyncCallback = Callable[[Chunk], Union[Optional[StreamControl], Awaitable[Optional[StreamControl]]]]


class AsyncSessionBackend(Protocol):
    """What an asyncio session needs: `AsyncClient` is one."""

    async def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    async def create_completion(
        self, prompt: Union[str, Sequence[int]], options: Optional[CompletionOptions] = None
    ) -> Completion: ...

    async def create_completion_stream(
        self, prompt: Union[str, Sequence[int]], options: Optional[CompletionOptions], callback: AsyncCallback
    ) -> Completion: ...


class AsyncSession(_History):
    """`Session` for asyncio (`AsyncClient.session()`): the same history, awaited calls."""

    def __init__(self, backend: AsyncSessionBackend, tokens: Sequence[int] = ()) -> None:
        super().__init__(tokens)
        self._backend = backend

    async def _prompt(self, text: Text) -> list[int]:
        if isinstance(text, str):
            return self._prompt_from(await self._backend.tokenize(text, add_special=not self.tokens, parse_special=True))
        return self._prompt_from(text)

    async def create_completion(self, text: Text, options: Optional[CompletionOptions] = None) -> Completion:
        prompt = await self._prompt(text)
        return self._extend(prompt, await self._backend.create_completion(prompt, options))

    async def create_completion_stream(
        self, text: Text, options: Optional[CompletionOptions], callback: AsyncCallback
    ) -> Completion:
        prompt = await self._prompt(text)
        return self._extend(prompt, await self._backend.create_completion_stream(prompt, options, callback))
