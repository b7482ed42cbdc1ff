"""`Session`: one token history continued across requests, in process or over gRPC.

Each request's prompt is the session's tokens so far (earlier prompts and what was
generated, exactly as delivered) followed by the new text. The engine's prefix cache then
finds that history in a slot (or its RAM cache) and prefills only the new tokens. The
session keeps token ids, not text, so what the engine sees is token-exact; over gRPC it
holds no server-side state, so any replica can serve the next turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Protocol, Union

from .types import Completion, CompletionCallback, CompletionOptions

__all__ = ["Session", "SessionBackend"]


class SessionBackend(Protocol):
    """What a session needs: `Llama` (in process) and `Client` (gRPC) both are one."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def create_completion(
        self, prompt: Union[str, Sequence[int]], options: Optional[CompletionOptions] = None
    ) -> Completion: ...

    def create_completion_stream(
        self, prompt: Union[str, Sequence[int]], options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion: ...


class Session:
    """Successive completions over one growing token history.

        session = llama.session()            # or client.session()
        session.create_completion("Q: 2+2?\\nA:", CompletionOptions(8))
        session.create_completion("\\nQ: and 3+3?\\nA:", CompletionOptions(8))

    `text` may also be token ids (appended as given). The history must fit a slot's
    context; past it a request fails with InvalidArgumentError naming `prompt`.
    """

    def __init__(self, backend: SessionBackend, tokens: Sequence[int] = ()) -> None:
        self._backend = backend
        self.tokens: list[int] = list(tokens)

    def _prompt(self, text: Union[str, Sequence[int]]) -> list[int]:
        if isinstance(text, str):
            # BOS (and other special tokens) only at the start of the history.
            new = self._backend.tokenize(text, add_special=not self.tokens, parse_special=True)
        else:
            new = list(text)
        return self.tokens + new

    def _extend(self, prompt: list[int], completion: Completion) -> Completion:
        # What was delivered, also after STOP: the history is what the caller saw.
        self.tokens = prompt + list(completion.token_ids)
        return completion

    def create_completion(
        self, text: Union[str, Sequence[int]], options: Optional[CompletionOptions] = None
    ) -> Completion:
        prompt = self._prompt(text)
        return self._extend(prompt, self._backend.create_completion(prompt, options))

    def create_completion_stream(
        self, text: Union[str, Sequence[int]], options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion:
        prompt = self._prompt(text)
        return self._extend(prompt, self._backend.create_completion_stream(prompt, options, callback))

    def reset(self) -> None:
        """Forget the history (the next request starts a new one)."""
        self.tokens = []
