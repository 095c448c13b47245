"""The FastAPI application: thin routes, the engine's lifecycle, and the one place errors become OpenAI errors.

Contract:
- `create_app(config, engine=None)` builds the app; the engine starts in the lifespan (off the event loop)
  and stops with it. Routes only parse, call `Serving`, and wrap the result (JSON or SSE).
- Every error leaves as `{"error": {"message", "type", "param", "code"}}`: validation errors and bad JSON
  as 400 naming the field, our ServerErrors with their status, unknown routes 404, and anything unexpected
  as a 500 from the backstop handler (logged with its stack trace, never sent to the client).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.errors import ExpertError, ExpertNotFound
from server.api import protocol as P
from server.config import ServerConfig
from server.engines.base import Engine
from server.errors import ServerError
from server.serving import Serving

log = logging.getLogger("t2.api")


def make_engine(config: ServerConfig) -> Engine:
    """The engine the config asks for, on the config's model (the embedded default when none is given)."""
    from server.default_model import DEFAULT_MODEL_NAME, default_experts_dir, ensure_default_model
    from experts.svd import ATTENTION_TARGETS, MLP_TARGETS

    cache = config.resolved_cache_dir()
    if config.model is None:
        model_dir, experts_dir = ensure_default_model(cache), config.experts or default_experts_dir()
        name = config.served_model_name or DEFAULT_MODEL_NAME
    else:
        model_dir, experts_dir = Path(config.model), config.experts
        name = config.served_model_name or model_dir.name
    targets = MLP_TARGETS + (ATTENTION_TARGETS if config.attention else ())
    kwargs: dict[str, Any] = dict(name=name, experts_dir=experts_dir, device=config.device, dtype=config.dtype,
                                  targets=targets, cache_dir=cache, max_batch=config.max_batch,
                                  max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
                                  patch_cache_mb=config.patch_cache_mb)
    if config.engine == "vllm":
        from server.engines.vllm import VLLMEngine  # the only path that imports vllm
        return VLLMEngine(model_dir, **kwargs)
    from server.engines.hf import HFEngine
    return HFEngine(model_dir, **kwargs)


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{param or 'body'}: {e.get('msg', 'invalid value')}{more}", param


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    engine = engine or make_engine(config)
    serving = Serving(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="Transformer² server", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.serving = engine, serving

    # ---- errors: one place ----
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return _error(400, msg, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(ServerError)
    async def on_server_error(_: Request, exc: ServerError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(ExpertError)
    async def on_expert_error(_: Request, exc: ExpertError):
        status = 404 if isinstance(exc, ExpertNotFound) else 400
        return _error(status, str(exc), "invalid_request_error", "model", "expert_error")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", None, None)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal server error ({type(exc).__name__})", "server_error")

    # ---- routes ----
    def respond(result: Any):
        if isinstance(result, P.BaseModel):
            return JSONResponse(result.model_dump(mode="json"))
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}})
    async def chat_completions(body: P.ChatCompletionRequest):
        return respond(await serving.chat(body))

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}})
    async def completions(body: P.CompletionRequest):
        return respond(await serving.completions(body))

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        return serving.models()

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard,
             responses={404: {"model": P.ErrorResponse}})
    async def model(model_id: str):
        for card in serving.models().data:
            if card.id == model_id:
                return card
        return _error(404, f"The model {model_id!r} does not exist.", "invalid_request_error", "model",
                      "model_not_found")

    @app.get("/health")
    async def health():
        h = engine.health()
        return JSONResponse(h, status_code=200 if h.get("status") == "ok" else 503)

    return app
