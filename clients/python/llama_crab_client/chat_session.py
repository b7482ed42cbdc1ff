"""`ChatSession`: a conversation kept across turns, in process or over gRPC.

Each turn sends the whole history plus the new message; the template renders the same
prefix again, so the engine's prefix cache computes only the new tokens (see
`usage.cached_tokens`). The history is plain messages: `save(path)` writes it as
OpenAI-shaped JSON, `ChatSession.load(backend, path)` reads it back. No server-side
state: over gRPC any replica can serve the next turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Sequence
from typing import Any, Callable, Optional, Protocol, Union

from .chat import ChatChunk, ChatCompletion, ChatCompletionCallback, ChatMessage, Tool
from .types import CompletionOptions, StreamControl

__all__ = ["AsyncChatSession", "ChatSession", "load_history", "save_history"]

Message = Union[str, ChatMessage]


class ChatBackend(Protocol):
    """What a chat session needs: `Llama` (in process) and `Client` (gRPC) both are one."""

    def create_chat_completion(
        self, messages: Sequence[ChatMessage], options: Optional[CompletionOptions] = None, tools: Any = None
    ) -> ChatCompletion: ...

    def create_chat_completion_stream(
        self,
        messages: Sequence[ChatMessage],
        options: Optional[CompletionOptions],
        callback: ChatCompletionCallback,
        tools: Any = None,
    ) -> ChatCompletion: ...


def save_history(messages: Sequence[ChatMessage], path: Union[str, "os.PathLike[str]"]) -> None:
    """Write the messages as a JSON list of OpenAI-shaped messages (aside, then renamed)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([m.to_openai() for m in messages], f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def load_history(path: Union[str, "os.PathLike[str]"]) -> list[ChatMessage]:
    """Read a history written by `save_history`. ValueError if it is not one."""
    with open(os.fspath(path), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m for m in data):
        raise ValueError(f"{os.fspath(path)!r} is not a chat history (a JSON list of messages)")
    return [ChatMessage.from_openai(m) for m in data]


class _History:
    def __init__(self, system: Optional[str], tools: Sequence[Tool], messages: Sequence[ChatMessage]) -> None:
        self.tools: tuple[Tool, ...] = tuple(tools)
        self.messages: list[ChatMessage] = list(messages)
        if system is not None:
            self.system = system

    @property
    def system(self) -> Optional[str]:
        """The system prompt (the first message, when it is a system message)."""
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].content
        return None

    @system.setter
    def system(self, text: Optional[str]) -> None:
        if self.messages and self.messages[0].role == "system":
            self.messages.pop(0)
        if text:
            self.messages.insert(0, ChatMessage.system(text))

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        system = self.system
        self.messages = []
        self.system = system

    def add(self, message: ChatMessage) -> None:
        """Append a message without generating (e.g. a tool result, before the next turn)."""
        self.messages.append(message)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        save_history(self.messages, path)

    def _turn(self, message: Optional[Message]) -> list[ChatMessage]:
        if message is not None:
            self.messages.append(ChatMessage.user(message) if isinstance(message, str) else message)
        return list(self.messages)

    def _record(self, reply: ChatCompletion) -> ChatCompletion:
        # The reply as delivered (also after STOP) joins the history, unless empty.
        if reply.message.content or reply.message.tool_calls:
            self.messages.append(reply.message)
        return reply


class ChatSession(_History):
    """A conversation with a model:

        chat = llama.chat_session(system="Be brief.")     # or client.chat_session(...)
        chat.send("Hi!").message.content
        chat.send("And again?", callback=lambda c: print(c.delta.content or "", end=""))
    """

    def __init__(
        self,
        backend: ChatBackend,
        system: Optional[str] = None,
        tools: Sequence[Tool] = (),
        messages: Sequence[ChatMessage] = (),
    ) -> None:
        super().__init__(system, tools, messages)
        self._backend = backend

    @classmethod
    def load(cls, backend: ChatBackend, path: Union[str, "os.PathLike[str]"], tools: Sequence[Tool] = ()) -> ChatSession:
        return cls(backend, tools=tools, messages=load_history(path))

    def send(
        self,
        message: Optional[Message] = None,
        options: Optional[CompletionOptions] = None,
        callback: Optional[ChatCompletionCallback] = None,
    ) -> ChatCompletion:
        """Add `message` (text is a user message; None: reply to the history as it is, e.g.
        after a tool result) and generate the assistant's reply, streamed to `callback`."""
        messages = self._turn(message)
        tools = self.tools or None
        if callback is None:
            return self._record(self._backend.create_chat_completion(messages, options, tools))
        return self._record(self._backend.create_chat_completion_stream(messages, options, callback, tools))


AsyncChatCallback = Callable[[ChatChunk], Union[Optional[StreamControl], Awaitable[Optional[StreamControl]]]]


class AsyncChatBackend(Protocol):
    """What an asyncio chat session needs: `AsyncClient` is one."""

    async def create_chat_completion(
        self, messages: Sequence[ChatMessage], options: Optional[CompletionOptions] = None, tools: Any = None
    ) -> ChatCompletion: ...

    async def create_chat_completion_stream(
        self,
        messages: Sequence[ChatMessage],
        options: Optional[CompletionOptions],
        callback: AsyncChatCallback,
        tools: Any = None,
    ) -> ChatCompletion: ...


class AsyncChatSession(_History):
    """`ChatSession` for asyncio (`AsyncClient.chat_session()`)."""

    def __init__(
        self,
        backend: AsyncChatBackend,
        system: Optional[str] = None,
        tools: Sequence[Tool] = (),
        messages: Sequence[ChatMessage] = (),
    ) -> None:
        super().__init__(system, tools, messages)
        self._backend = backend

    async def send(
        self,
        message: Optional[Message] = None,
        options: Optional[CompletionOptions] = None,
        callback: Optional[AsyncChatCallback] = None,
    ) -> ChatCompletion:
        messages = self._turn(message)
        tools = self.tools or None
        if callback is None:
            return self._record(await self._backend.create_chat_completion(messages, options, tools))
        return self._record(await self._backend.create_chat_completion_stream(messages, options, callback, tools))
