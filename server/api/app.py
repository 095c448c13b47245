"""The FastAPI application: thin routes, the engine's lifecycle, and the one place errors become OpenAI errors.

Contract:
- `create_app(config, engine=None)` builds the app around one engine (server/engines/factory.py builds it
  from the config when none is given); the engine starts in the lifespan (off the event loop) and stops
  with it. The app's objects live on `app.state` (config, engine, serving, metrics, in_flight); routes and
  error handlers are module-level functions that read them there (as vLLM's api_server does). Routes only
  parse, call `Serving` (server/api/serving.py), and wrap the result (JSON or SSE).
- Every error leaves as `{"error": {"message", "type", "param", "code", "request_id"}}`: validation errors
  and bad JSON as 400 naming the field, our ServerErrors with their status, unknown routes 404, and anything
  unexpected as a 500 from the backstop of RequestLog (server/api/observe.py: logged with its stack trace,
  never sent to the client). RequestLog, the outermost middleware, also gives each request its id and logs
  its one line.
- Guard (an ASGI middleware, before any parsing): the Host header must be allowed (`allowed_hosts`, when
  set); `/v1` and the API docs need `Authorization: Bearer <api_key>` when an API key is set; `/admin` exists only when an admin key is set and needs that key (both compared in constant
  time; a miss is an OpenAI-shaped 401); bodies over `max_body_bytes` are a 413. CORS wraps everything when
  origins are configured. `/health` and `/metrics` are open (probes and scrapers).
- On shutdown, once the graceful period is over (`app.state.shutdown`, server/api/shutdown.py), every open
  generation request ends in the OpenAI shape: a 503 `server_shutdown`, or an error event and [DONE].
- Generation routes let at most `max_concurrent_requests` in at once (`InFlightLimit`; beyond: 429 +
  Retry-After, as for a full scheduler queue), abort a request whose client disconnects (stream or not:
  its engine rows are freed at once), and abort one that runs past `request_timeout_s` (504, or an error
  event in a stream).
- Admin API: GET/POST /admin/experts, DELETE /admin/experts/{name}; POST loads `<name>.safetensors` from
  `admin_experts_dir` only (names like expert file stems; no path, no traversal, no symlink out).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import aclosing, asynccontextmanager, suppress
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.errors import ExpertError, ExpertNotFound
from experts.expert import NAME_RE
from experts.mix import BASE_NAME
from server.api import protocol as P
from server.api.serving import Serving
from server.config import ServerConfig
from server.engines.base import Engine
from server.engines.factory import EngineConfig, make_engine
from server.api.observe import RequestLog
from server.api.shutdown import Shutdown, shutting_down
from server.errors import (InvalidRequest, ModelNotFound, Overloaded, RequestTimeout, ServerError, error_body,
                           sse_error)
from server.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("t2.api")


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    bad = (e.get("ctx") or {}).get("error")
    if isinstance(bad, P.NotUnicode):               # a lone surrogate: name the string, not its model
        return str(bad), bad.param
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{param or 'body'}: {e.get('msg', 'invalid value')}{more}", param


# ---- guard: auth and body size, before anything parses the request ----
class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a body grows past the limit; FastAPI re-raises HTTPExceptions as they are."""


def _bearer_ok(scope: dict, key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())
    return False


def _is_docs(path: str) -> bool:
    """The interactive docs and the schema they read (they list every route, admin included)."""
    return path in ("/openapi.json", "/docs", "/redoc") or path.startswith("/docs/")


def _host_of(scope: dict) -> str:
    host = dict(scope.get("headers", ())).get(b"host", b"").decode("latin-1").lower()
    return host[1:host.index("]")] if host.startswith("[") and "]" in host else host.split(":")[0]


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`allowed` entries: a host name, `*.domain` (any subdomain of it) or `*` (any)."""
    return any(a == "*" or a == host or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed)


class Guard:
    """ASGI middleware: Host check, API key on /v1 and the docs, admin key on /admin, body size limit,
    error counts for /metrics."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.hosts = [h.strip().lower() for h in config.allowed_hosts.split(",") if h.strip()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cfg = scope["path"], self.config
        v1 = path == "/v1" or path.startswith("/v1/")
        denied: JSONResponse | None = None
        # 1. who may call: only through an allowed Host name (when a list is set: DNS rebinding);
        #    /admin only with the admin key (absent without one), /v1 and the docs with the API key
        if self.hosts and not host_allowed(_host_of(scope), self.hosts):
            denied = _error(400, "this Host header is not allowed on this server (--allowed-hosts)",
                            "invalid_request_error", None, "invalid_host")
        elif path == "/admin" or path.startswith("/admin/"):
            if not cfg.admin_key:
                denied = _error(404, "the admin API is off (no admin key is set)", "invalid_request_error",
                                None, "not_found")
            elif not _bearer_ok(scope, cfg.admin_key):
                denied = _unauthorized("admin")
        elif (v1 or _is_docs(path)) and cfg.api_key and not _bearer_ok(scope, cfg.api_key):
            denied = _unauthorized("API")
        # 2. how much it may send: a declared length at once, a chunked body while it is read
        if denied is None:
            length = dict(scope.get("headers", ())).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > cfg.max_body_bytes:
                denied = _error(413, f"the request body is larger than {cfg.max_body_bytes} bytes",
                                "invalid_request_error", None, "request_too_large")
        if v1:
            send = self._counting(send)
        if denied is not None:
            return await denied(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cfg.max_body_bytes:
                    raise _BodyTooLarge(413, f"the request body is larger than {cfg.max_body_bytes} bytes")
            return msg

        await self.app(scope, limited, send)

    def _counting(self, send):
        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)
        return counted


def _unauthorized(which: str) -> JSONResponse:
    return _error(401, f"Incorrect or missing {which} key: send 'Authorization: Bearer <key>'.",
                  "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


class ClientGone(ServerError):
    status, type, code = 499, "invalid_request_error", "client_closed_request"


async def _disconnected(receive) -> None:
    """Return when the client has gone (the body is already read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so freeing its engine rows) the moment the client disconnects."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone("the client closed the connection")
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with suppress(BaseException):
                    await t


class InFlightLimit:
    """At most `limit` generation requests in flight; the count is exact even for aborted streams."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def enter(self) -> Callable[[], None]:
        """Take a slot (Overloaded: a 429 when none is free); returns the function that gives it back once."""
        if self.count >= self.limit:
            raise Overloaded(f"too many requests in flight ({self.limit}); retry later")
        self.count += 1
        done = False

        def leave() -> None:
            nonlocal done
            if not done:
                done, self.count = True, self.count - 1
        return leave


async def _bounded(body: AsyncIterator[str], deadline: float, leave: Callable[[], None],
                   shutdown: Shutdown) -> AsyncIterator[str]:
    """A stream that ends with an error event at the deadline or at the end of a shutdown's graceful period,
    and gives its in-flight slot back at its end."""
    try:
        async with aclosing(body):
            while True:
                try:
                    async with asyncio.timeout_at(deadline) as timeout:
                        with shutdown.cut(timeout):
                            piece = await body.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    yield sse_error(shutting_down() if shutdown.stopping else
                                    RequestTimeout("the request ran past the server's request timeout"))
                    yield "data: [DONE]\n\n"
                    return
                yield piece
    finally:
        leave()


class LoadExpert(BaseModel):
    name: str = Field(description="The expert's name: loads <admin_experts_dir>/<name>.safetensors.",
                      min_length=1, max_length=64)


class ExpertCard(BaseModel):
    name: str
    label: str
    description: str
    params: int
    path: str | None = None


def _card(e) -> ExpertCard:
    return ExpertCard(name=e.name, label=e.label, description=e.description, params=e.num_params,
                      path=str(e.path) if e.path else None)


def _expert_file(root: Path | None, name: str) -> Path:
    """`<root>/<name>.safetensors`, refusing anything that is not a plain name inside root."""
    if root is None:
        raise InvalidRequest("no admin experts folder is configured (--admin-experts-dir)", "name")
    if not NAME_RE.match(name) or name == BASE_NAME or ".." in name:
        raise InvalidRequest("name must be an expert name (1-64 letters, digits, '_', '-', '.'), not a path",
                             "name")
    base = Path(root).resolve()
    link = base / f"{name}.safetensors"
    target = link.resolve()                              # follows symlinks: one pointing out is refused
    if target.parent != base:
        raise InvalidRequest("the expert file must be inside the admin experts folder", "name")
    if not target.is_file():
        raise ModelNotFound(f"no file {name}.safetensors in the admin experts folder", "name")
    return link      # a symlink inside the folder loads under its own name (the name asked for), as at start


_ERRORS = {s: {"model": P.ErrorResponse} for s in (400, 401, 404, 413, 429, 503, 504)}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_STREAM_DOC = {"description": "JSON, or with stream=true a text/event-stream of chunks ending in [DONE]",
               "content": {"text/event-stream": {"schema": {"type": "string"}}}}

router = APIRouter()                                        # /v1, /health, /metrics
admin_router = APIRouter(prefix="/admin", tags=["admin"])   # the Guard answers 404 here without an admin key


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """1. the engine (from the config unless given, not started); 2. the app's objects on `app.state`;
    3. middleware; 4. error handlers and routes; 5. the OpenAPI security schemes."""
    # 1. engine
    engine = engine or make_engine(EngineConfig.from_server_config(config))
    app = FastAPI(title="Transformer² server", version="0.1.0", lifespan=_lifespan)
    # 2. state: what the handlers below read from `request.app.state`
    st = app.state
    st.config, st.engine, st.metrics = config, engine, Metrics(engine)
    st.serving = Serving(engine, config, st.metrics)
    st.in_flight = InFlightLimit(config.max_concurrent_requests)
    st.shutdown = Shutdown()                # stopped by `t2 serve` when the graceful period ends
    st.admin_experts_dir = config.admin_experts_dir or engine.experts_dir
    # 3. middleware
    app.add_middleware(Guard, config=config, metrics=st.metrics)
    if config.cors_origins.strip():         # added last = outermost: preflights never meet the guard
        origins = [o.strip() for o in config.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Retry-After", "X-Request-Id"])
    # outermost: every response (CORS preflights and the Guard's refusals too) has the request id
    app.add_middleware(RequestLog, on_error=lambda path, status: path.startswith("/v1") and st.metrics.error(status))
    # 4. errors (one place) and routes
    for exc_type, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    app.include_router(router)
    app.include_router(admin_router)
    # 5. OpenAPI
    app.openapi_schema = None
    _document_security(app, config)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    await app.state.engine.start()          # off the event loop inside (the engine's contract)
    try:
        yield
    finally:
        await app.state.engine.stop()


# ---- errors: one place ----
async def on_validation(_: Request, exc: RequestValidationError):
    msg, param = _validation_message(exc)
    return _error(400, msg, "invalid_request_error", param, "invalid_value")


async def on_server_error(request: Request, exc: ServerError):
    headers = {"Retry-After": str(request.app.state.config.retry_after_s)} if exc.status == 429 else None
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)


async def on_expert_error(_: Request, exc: ExpertError):
    status = 404 if isinstance(exc, ExpertNotFound) else 400
    return _error(status, str(exc), "invalid_request_error", "model", "expert_error")


async def on_http(_: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), "invalid_request_error", None,
                  _HTTP_CODES.get(exc.status_code, "http_error"))


# anything unexpected: the 500 backstop of RequestLog (server/api/observe.py), inside the error metric
_ERROR_HANDLERS: dict[type[Exception], Callable] = {
    RequestValidationError: on_validation, ServerError: on_server_error, ExpertError: on_expert_error,
    StarletteHTTPException: on_http}


# ---- generation routes ----
async def generate(request: Request, work: Callable[[], Awaitable[Any]]):
    """In-flight limit, timeout and disconnect around one generation request; JSON or a bounded SSE stream."""
    config: ServerConfig = request.app.state.config
    leave, shutdown = request.app.state.in_flight.enter(), request.app.state.shutdown
    deadline = asyncio.get_running_loop().time() + config.request_timeout_s
    try:
        async with asyncio.timeout_at(deadline) as timeout:
            with shutdown.cut(timeout):
                result = await _unless_disconnected(request.receive, work())
    except TimeoutError:
        leave()
        if shutdown.stopping:
            raise shutting_down() from None
        raise RequestTimeout("the request ran past the server's request timeout "
                             f"({config.request_timeout_s:g} s)") from None
    except BaseException:
        leave()
        raise
    if isinstance(result, P.BaseModel):
        leave()
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(_bounded(result, deadline, leave, shutdown), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _serving(request: Request) -> Serving:
    return request.app.state.serving


@router.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
             responses={200: _STREAM_DOC, **_ERRORS})
async def chat_completions(body: P.ChatCompletionRequest, request: Request):
    return await generate(request, lambda: _serving(request).chat(body))


@router.post("/v1/completions", response_model=P.CompletionResponse, responses={200: _STREAM_DOC, **_ERRORS})
async def completions(body: P.CompletionRequest, request: Request):
    return await generate(request, lambda: _serving(request).completions(body))


# ---- catalogue and probes ----
@router.get("/v1/models", response_model=P.ModelList)
async def models(request: Request):
    return _serving(request).models()


@router.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses={404: {"model": P.ErrorResponse}})
async def model(model_id: str, request: Request):
    for card in _serving(request).models().data:
        if card.id == model_id:
            return card
    return _error(404, f"The model {model_id!r} does not exist.", "invalid_request_error", "model",
                  "model_not_found")


@router.get("/health")
async def health(request: Request):
    h = request.app.state.engine.health()
    return JSONResponse({**h.to_json(), "in_flight": request.app.state.in_flight.count},
                        status_code=200 if h.ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    try:   # current step counters (an RPC between two engine steps); a slow or failed one keeps the last ones
        await asyncio.wait_for(request.app.state.engine.refresh_health(), timeout=1.0)
    except Exception:  # noqa: BLE001 - metrics are best-effort; engine faults show in t2_engine_healthy
        pass
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


# ---- admin API ----
@admin_router.get("/experts", response_model=list[ExpertCard], responses=_ERRORS)
async def admin_list(request: Request):
    return [_card(e) for _, e in sorted(request.app.state.engine.experts.items())]


@admin_router.post("/experts", response_model=ExpertCard, status_code=201,
                   responses={**_ERRORS, 409: {"model": P.ErrorResponse}})
async def admin_load(body: LoadExpert, request: Request):
    path = await asyncio.to_thread(_expert_file, request.app.state.admin_experts_dir, body.name)
    return _card(await request.app.state.engine.load_expert(path))


@admin_router.delete("/experts/{name}", responses=_ERRORS)
async def admin_unload(name: str, request: Request):
    engine: Engine = request.app.state.engine
    if name not in engine.experts:
        raise ModelNotFound(f"expert {name!r} is not loaded", "name")
    await engine.unload_expert(name)
    return {"deleted": name}


def _document_security(app: FastAPI, config: ServerConfig) -> None:
    """Declare the Bearer keys in the OpenAPI schema (the Guard enforces them)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema.get("paths", {}).items():
                if (path.startswith("/v1") and config.api_key) or path.startswith("/admin"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
