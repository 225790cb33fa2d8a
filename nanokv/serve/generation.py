"""From a validated request body to a scheduler `Request`, and from its events to the HTTP
response: one JSON body, or server-sent events (`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`).

Everything a client can get wrong is refused here with a 400 before the request is queued (bad
policy, budget or sampling values, a prompt the template or the context cannot take); a full
queue is a 503 with Retry-After. A request whose client goes away is cancelled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from nanokv.budget import Budget
from nanokv.policies import parse_policy, policy_for_budget
from nanokv.sampling import SamplingParams
from nanokv.scheduler import QueueFullError, Scheduler
from nanokv.sequence import Request
from nanokv.serve.bridge import RequestStream
from nanokv.serve.errors import ApiError, error_body, one_line
from nanokv.serve.protocol import DEFAULT_TEMPERATURE, ChatBody, CompletionBody, Reply, usage

if TYPE_CHECKING:
    from nanokv.llm import LLM

RETRY_AFTER_SECONDS = 1


async def prompt_ids(llm: LLM, body: CompletionBody | ChatBody) -> list[int]:
    """The prompt's token ids: the chat template's rendering of the messages, or the raw
    completion prompt (text, or token ids checked against the vocabulary). Tokenizing runs on a
    worker thread: a long prompt must not hold up the event loop and the other streams."""
    if isinstance(body, ChatBody):
        messages, param = body.conversation(), "messages"
        encode: Callable[[], list[int]] = lambda: llm.tokenizer.encode_chat(messages)
    elif isinstance(body.prompt, list) and isinstance(body.prompt[0], int):
        return _checked_ids(list(body.prompt), llm.config.vocab_size)
    else:
        text, param = body.prompt if isinstance(body.prompt, str) else body.prompt[0], "prompt"
        encode = lambda: llm.tokenizer.encode(text)
    try:
        return await asyncio.to_thread(encode)
    except ValueError as exc:  # TokenizerError: no chat template, or the template refused
        raise ApiError(400, one_line(exc), param=param) from None


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        raise ApiError(
            400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt"
        )
    return ids


def make_request(
    llm: LLM,
    body: CompletionBody | ChatBody,
    ids: list[int],
    *,
    policy: str | None = None,
    budget: float | None = None,
    default_max_tokens: int = 256,
) -> Request:
    """The scheduler's request. `policy` / `budget` are the server's defaults for requests that
    do not set kv_policy / kv_budget (None: the LLM's own). A kv_budget below 1 without a
    kv_policy, sent to a full-cache server, runs the default eviction policy (as
    `nanokv generate --budget` does)."""
    _check_kv(body.kv_policy, body.kv_budget)
    server_policy = policy or llm.policy.name
    if body.kv_policy is not None:
        policy = body.kv_policy
    elif body.kv_budget is not None and parse_policy(server_policy)[0] == "full":
        policy = policy_for_budget(None, body.kv_budget)
    budget = body.kv_budget if body.kv_budget is not None else budget
    params = _sampling(llm, body, len(ids), default_max_tokens)
    return Request(ids, params, policy=policy, budget=budget)


def _check_kv(policy: str | None, budget: float | None) -> None:
    """A 400 naming kv_policy or kv_budget when the scheduler could not build their engine,
    or when a budget is asked of kv_policy 'full' (which keeps every token)."""
    if policy is not None:
        try:
            name, uses_quest = parse_policy(policy)
        except ValueError as exc:
            raise ApiError(400, f"kv_policy: {one_line(exc)}", param="kv_policy") from None
        if uses_quest:
            message = "kv_policy: Quest is not served; choose an eviction policy"
            raise ApiError(400, message, param="kv_policy")
    if budget is None:
        return
    try:
        Budget(budget)
    except ValueError as exc:
        raise ApiError(400, f"kv_budget: {one_line(exc)}", param="kv_budget") from None
    if policy is not None and parse_policy(policy)[0] == "full" and budget != 1.0:
        message = "kv_budget needs an eviction policy (kv_policy): 'full' keeps every token"
        raise ApiError(400, message, param="kv_budget")


def _sampling(
    llm: LLM, body: CompletionBody | ChatBody, prompt_length: int, default_max_tokens: int
) -> SamplingParams:
    """Sampling and stopping. Without max_tokens, the completion may run to `default_max_tokens`
    or the end of the context, whichever comes first; a given max_tokens is taken as asked (the
    scheduler refuses one that does not fit the context)."""
    room = llm.config.max_position_embeddings - prompt_length
    max_tokens = body.new_tokens or max(1, min(default_max_tokens, room))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop,
            ignore_eos=bool(body.ignore_eos),
        )  # fmt: skip
    except ValueError as exc:
        raise ApiError(400, one_line(exc)) from None


def submit(scheduler: Scheduler, request: Request) -> RequestStream:
    """Queues the request: 400 for one that is invalid or can never fit the pool, 503 with
    Retry-After when the waiting queue is full."""
    try:
        return RequestStream(scheduler, request)
    except QueueFullError as exc:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        raise ApiError(503, one_line(exc), code="queue_full", headers=headers) from None
    except ValueError as exc:  # InputError (context, pool), or an engine it cannot build
        raise ApiError(400, one_line(exc)) from None


async def respond(
    stream: RequestStream, reply: Reply, http: HttpRequest, streaming: bool
) -> Response:
    """The response: server-sent events, or one JSON body once the request has finished."""
    if streaming:
        return EventStreamResponse(_events(stream, reply), on_close=stream.cancel)
    return JSONResponse(await _whole(stream, reply, http))


async def _whole(stream: RequestStream, reply: Reply, http: HttpRequest) -> dict[str, Any]:
    """Waits for the whole text; a client that disconnects (or a handler cancelled) cancels
    the request, so that it does not run to its end for nobody."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(http, stream))
    try:
        text, last = await stream.collect()
    finally:
        watcher.cancel()
        stream.cancel()
    if last.finish_reason == "error":
        raise ApiError(500, f"generation failed: {last.error}")
    if last.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled (the server is shutting down)")
    counts = usage(last.prompt_tokens, last.completion_tokens)
    return reply.complete(text, last.finish_reason, counts)


async def _cancel_on_disconnect(http: HttpRequest, stream: RequestStream) -> None:
    """Once the body has been read, the next ASGI message is the client's disconnect."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


async def _events(stream: RequestStream, reply: Reply) -> AsyncIterator[str]:
    """The chunks of a streamed response: a chat's role first, then each new piece of text, the
    finish reason on the last one, the usage chunk when asked for, and `[DONE]`."""
    try:
        if reply.kind == "chat":
            yield _sse(reply.chunk(None))
        async for event in stream.events():
            if event.finish_reason == "error":
                message = f"generation failed: {event.error}"
                yield _sse(error_body(message, "server_error"))
            elif event.finished:
                yield _sse(reply.chunk(event.text, event.finish_reason))
                if reply.include_usage:
                    counts = usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(reply.usage_chunk(counts))
            elif event.text:
                yield _sse(reply.chunk(event.text))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that calls `on_close` however it ends: finished, the
    client gone (Starlette cancels the stream), or never started at all."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
