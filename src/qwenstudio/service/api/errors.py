"""One place that turns errors into HTTP bodies: the native shape ``{"error": {"code", "message"}}`` and, on /v1,
OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Nothing internal (paths, tracebacks) reaches a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import InvalidRequest, QwenStudioError
from ..errors import QueueFull, redact_paths

log = logging.getLogger("qwenstudio.service")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, status: int, code: str, message: str, param: str | None = None) -> dict:
    message = redact_paths(message)
    if is_openai_path(path):
        kind = ("authentication_error" if status == 401 else "rate_limit_error" if status == 429
                else "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": {"code": code, "message": message}}


def error_response(path: str, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, code, message), status_code=status, headers=headers)


def openai_status(err: QwenStudioError) -> int:
    """OpenAI answers bad parameters with 400 (the official client raises BadRequestError); keep other statuses."""
    return 400 if isinstance(err, InvalidRequest) else err.status


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QwenStudioError)
    async def _typed(request: Request, exc: QwenStudioError):
        path = request.url.path
        status = openai_status(exc) if is_openai_path(path) else exc.status
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
        return error_response(path, status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else "invalid request"
        status = 400 if is_openai_path(request.url.path) else 422
        return error_response(request.url.path, status, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return error_response(request.url.path, exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, "internal_error", "internal server error")
