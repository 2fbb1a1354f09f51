"""The FastAPI app: routes of both APIs, API-key check, body-size limit, error shapes, /health and /metrics."""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import ollama_api, openai_api
from .server_config import ServerConfig
from .api_errors import ApiError, error_response
from .metrics import Metrics
from .request_log import MAX_ERROR_BODY, SCOPE_KEY, RequestRecord, error_message


class Gate:
    """ASGI middleware in front of every route: counts requests by endpoint and status, refuses a missing or
    wrong API key (401; /health is open) and bodies over the limit (413) before a handler reads them, and
    writes the request's log line once its response has ended."""

    def __init__(self, app, cfg: ServerConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        record = RequestRecord(scope["method"], scope["path"], client[0] if client else "-", self.metrics)
        scope[SCOPE_KEY] = record
        error_body = bytearray()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and record.status >= 400:
                if len(error_body) <= MAX_ERROR_BODY:
                    error_body.extend(message.get("body", b""))
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await error_response(scope["path"], refusal)(scope, receive, send_counted)
            else:
                await self.app(scope, self.limited(receive), send_counted)
        except Exception as e:  # answered 500 by the app's outermost handler
            record.error = f"internal error ({type(e).__name__})"
            raise
        finally:
            self.metrics.count_request(scope["path"], record.status)
            if error_body and record.error is None:
                record.error = error_message(bytes(error_body))
            if self.cfg.request_log:
                record.write()

    def refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.cfg.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not token:
                return ApiError(401, "missing API key (send Authorization: Bearer KEY)", code="missing_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(token.encode(), self.cfg.api_key.encode()):
                return ApiError(401, "wrong API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.cfg.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.cfg.max_body_bytes} bytes", code="body_too_large")

    def limited(self, receive):
        """The body as the handler reads it, cut off (413) at the limit when no Content-Length said so first."""
        seen = [0]

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.cfg.max_body_bytes:
                    raise self.too_large()
            return message

        return receive_limited


def create_app(engine, cfg: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for running in list(app.state.active):  # streams still open at shutdown end now
            running.close()

    app = FastAPI(title="llava-edge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.cfg, app.state.active = engine, cfg, set()
    app.state.created = int(time.time())
    manifest = Path(engine.bundle.path) / "manifest.json"
    app.state.modified_at = datetime.fromtimestamp(manifest.stat().st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    app.state.metrics = metrics = Metrics(engine)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "ok", "model": cfg.model_name, "slots": stats.get("slots"), "busy": stats.get("busy"),
                "queued": stats.get("queued")}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request.url.path, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, ApiError(422, str(exc.errors()[0].get("msg", exc)), code="invalid_schema"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, ApiError(500, f"internal error ({type(exc).__name__})"))

    app.add_middleware(Gate, cfg=cfg, metrics=metrics)
    return app
