"""The OpenAI API's shapes: request bodies of /v1/completions and /v1/chat/completions (pydantic,
validated once), and the JSON of their responses and streamed chunks.

Fields nanokv does not use (logprobs, penalties, user...) are accepted and ignored, as other
OpenAI-compatible servers do; `n` other than 1 is refused. nanokv's own per-request fields,
what the openai client sends as `extra_body`: `kv_policy` (an eviction policy name) and
`kv_budget` (a fraction of the prompt in (0, 1] or a token count > 1), plus `top_k` and
`ignore_eos` (as vLLM takes them).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: pass temperature=0 for greedy


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class GenerationBody(BaseModel):
    """What both endpoints share: the model, sampling, streaming and nanokv's KV settings."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    kv_policy: str | None = None
    kv_budget: float | None = Field(None, gt=0)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per choice")
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def new_tokens(self) -> int | None:
        """The asked-for completion length (None: the server's default)."""
        return self.max_tokens


class CompletionBody(GenerationBody):
    """/v1/completions: one raw prompt (no chat template), as text or token ids."""

    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("the prompt is empty")
            if isinstance(prompt[0], str) and len(prompt) != 1:
                raise ValueError("give one prompt a request (a list of prompts is not batched)")
        return prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"content parts of type {kind!r} are not supported: send text")
        return kind


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatBody(GenerationBody):
    """/v1/chat/completions: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Reply:
    """The JSON of one response, a text completion or a chat completion: the whole response,
    or its streamed chunks (OpenAI's `text_completion` / `chat.completion.chunk`)."""

    kind: Literal["completion", "chat"]
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")

    def complete(self, text: str, finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
        """The non-streamed response."""
        if self.kind == "chat":
            choice = {"message": {"role": "assistant", "content": text}}
            return self._envelope("chat.completion", choice, finish_reason, counts)
        return self._envelope("text_completion", {"text": text}, finish_reason, counts)

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """A streamed chunk: new text and, on the last one, why generation stopped. A chat's
        first chunk (`text` None) carries the assistant's role."""
        if self.kind == "chat":
            delta: dict[str, str] = {}
            if text is None:
                delta = {"role": "assistant", "content": ""}
            elif text:
                delta = {"content": text}
            body = self._envelope("chat.completion.chunk", {"delta": delta}, finish_reason)
        else:
            body = self._envelope("text_completion", {"text": text or ""}, finish_reason)
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage`: no choices, the token counts."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(kind), "choices": [], "usage": counts}

    def _envelope(
        self,
        kind: str,
        choice: dict[str, Any],
        finish_reason: str | None,
        counts: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._head(kind), "choices": [choice]}
        if counts is not None:
            body["usage"] = counts
        return body

    def _head(self, kind: str) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.kind == "chat":
            head["system_fingerprint"] = None
        return head
