"""The FastAPI app: the server's state, its routes, the API key and the body-size limit.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming with `stream: true`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (503 while the model loads, 200 once it
serves) and `GET /stats` (the scheduler's counts and the pool's use). With an API key, every
`/v1/` route wants `Authorization: Bearer <key>`; /health and /stats stay open for monitoring.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from nanokv.serve.errors import ApiError, install_error_handlers
from nanokv.serve.generation import make_request, prompt_ids, respond, submit
from nanokv.serve.protocol import ChatBody, CompletionBody, Reply

if TYPE_CHECKING:
    from nanokv.llm import LLM
    from nanokv.scheduler import Scheduler

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long prompt fits, a runaway upload does not
DEFAULT_MAX_TOKENS = 256


@dataclass
class ServerState:
    """What the routes share: the model and scheduler once loaded, and the server's settings.
    `policy` / `budget` are the KV defaults of requests that set none (None: the LLM's)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    policy: str | None = None
    budget: float | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    llm: LLM | None = None
    scheduler: Scheduler | None = None
    serving: bool = False  # between the app's startup and its shutdown
    created: int = 0

    def attach(self, llm: LLM, scheduler: Scheduler) -> None:
        """The model has loaded: from now on the server answers requests."""
        self.llm, self.scheduler = llm, scheduler
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.serving and self.scheduler is not None

    def loaded(self) -> tuple[LLM, Scheduler]:
        """The model and scheduler; a 503 while the model loads or the server stops."""
        if not self.ready or self.llm is None or self.scheduler is None:
            headers = {"Retry-After": "5"}
            raise ApiError(503, "the model is loading: retry shortly", headers=headers)
        return self.llm, self.scheduler


def build_app(
    llm: LLM | None,
    scheduler: Scheduler | None,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    policy: str | None = None,
    budget: float | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """The app of a loaded model and its (started) scheduler. With `llm` None the app answers
    503 until `app.state.nanokv.attach(llm, scheduler)`: the port is open while a model loads."""
    state = ServerState(
        model_name, api_key, max_body_bytes, policy, budget, default_max_tokens
    )  # fmt: skip
    if llm is not None and scheduler is not None:
        state.attach(llm, scheduler)
    app = FastAPI(title="nanokv", lifespan=_lifespan(state), docs_url=None, redoc_url=None)
    app.state.nanokv = state
    install_error_handlers(app)
    app.include_router(_open_routes(state))
    app.include_router(_api_routes(state), dependencies=[Depends(_authorizer(state))])
    return app


def _lifespan(state: ServerState) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.serving = True
        try:
            yield
        finally:
            state.serving = False

    return lifespan


def _authorizer(state: ServerState) -> Callable[[Request], Awaitable[None]]:
    """A dependency that wants `Authorization: Bearer <key>` when the server has a key."""

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise ApiError(
                401, "missing or incorrect API key: send Authorization: Bearer <key>",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    return authorize


def _open_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok", "model": state.model_name})
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @router.get("/stats")
    async def stats() -> dict[str, int | float]:
        _, scheduler = state.loaded()
        return scheduler.stats().as_dict()

    return router


def _api_routes(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        body = CompletionBody.model_validate(await read_json(request, state.max_body_bytes))
        return await _generate(state, body, "completion", request)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = ChatBody.model_validate(await read_json(request, state.max_body_bytes))
        return await _generate(state, body, "chat", request)

    return router


async def _generate(
    state: ServerState,
    body: CompletionBody | ChatBody,
    kind: Literal["completion", "chat"],
    request: Request,
) -> Response:
    llm, scheduler = state.loaded()
    _check_model(state, body.model)
    ids = await prompt_ids(llm, body)
    job = make_request(
        llm, body, ids, policy=state.policy, budget=state.budget,
        default_max_tokens=state.default_max_tokens,
    )  # fmt: skip
    stream = submit(scheduler, job)
    reply = Reply(kind, state.model_name, include_usage=body.include_usage)
    return await respond(stream, reply, request, bool(body.stream))


def _check_model(state: ServerState, name: str | None) -> None:
    """404 model_not_found for a model this server does not serve (None: the one it does)."""
    if name is not None and name != state.model_name:
        raise ApiError(
            404, f"the model {name!r} does not exist: this server serves {state.model_name!r}",
            param="model", code="model_not_found",
        )  # fmt: skip


def _model_card(state: ServerState) -> dict[str, Any]:
    card = {"id": state.model_name, "object": "model", "created": state.created}
    return {**card, "owned_by": "nanokv"}


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 413 past `limit` bytes (by Content-Length, or by the bytes that
    actually arrive, for a chunked or lying upload), 400 for a body that is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before its request body arrived") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, f"the request body ({size} bytes or more) exceeds the server's {limit}-byte limit",
        code="request_too_large",
    )  # fmt: skip
