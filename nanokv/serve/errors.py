"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, whatever raised
them (our own checks, pydantic, FastAPI, Starlette's 404 and 405, or a bug), so that every
client of the OpenAI API can read why a request was refused."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger("nanokv.serve")

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = kind or _default_type(status)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    """OpenAI's error JSON; `kind` is its `type` (invalid_request_error, server_error...)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the engine's messages may wrap)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _default_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """A 400 naming the first invalid field, as `param` (dotted: `messages.0.content`)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "the request body is invalid")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None and first.get("type") == "model_type":
        message = "the request body must be a JSON object"
    text = f"{param}: {message}" if param else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(400, text, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Routes every error a request can meet to an OpenAI-shaped JSON response."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        error = ApiError(exc.status_code, message, headers=exc.headers)
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()
