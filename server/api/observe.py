"""Request ids and the one log line per request.

Contract:
- `RequestLog` (an ASGI middleware, the outermost one) gives every HTTP request an id: the client's
  `X-Request-Id` when it is a plain token (1-128 of letters, digits, `_ . : -`), else a fresh `req-<hex>`.
  The id is echoed in the `X-Request-Id` response header, put in every error body (`error.request_id`,
  see server/errors.py) and in the log line.
- While a request runs, `current()` is its `RequestRecord` (a context variable, so it follows the request
  into threads and tasks); serving fills in what it learns with `note(...)`: model, strategy, label,
  adaptation, tokens, first-pass / patch / queue ms, the error code of a stream that ended in an error event.
- When the response is over (a stream: after its last byte), one line is logged on `t2.request`:
  `request <id> <method> <path> status=<code> model=... total_ms=...` (fields that did not apply are left
  out); in JSON logging the same fields are keys of the object. /health and /metrics are not logged.
- The backstop: an exception that nothing below turned into a response becomes a 500 in the OpenAI shape
  here (logged with its traceback, never sent), counted in the error metric like every other error.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("t2.request")          # the per-request lines only
errlog = logging.getLogger("t2.api")

HEADER = b"x-request-id"
_CLIENT_ID = re.compile(r"\A[A-Za-z0-9_.:\-]{1,128}\Z")
QUIET_PATHS = frozenset({"/health", "/metrics"})
# the order of the fields in a text line
FIELDS = ("status", "model", "strategy", "label", "adaptation", "prompt_tokens", "completion_tokens",
          "first_pass_ms", "patch_ms", "queue_ms", "total_ms", "finish", "error")


@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    t0: float = field(default_factory=time.perf_counter)
    fields: dict[str, Any] = field(default_factory=dict)

    def line(self) -> tuple[str, dict[str, Any]]:
        """The text line and the fields of the JSON object."""
        out = {"request_id": self.id, "method": self.method, "path": self.path,
               **{k: self.fields[k] for k in FIELDS if self.fields.get(k) is not None}}
        text = " ".join(f"{k}={_text(out[k])}" for k in FIELDS if k in out)
        return f"request {self.id} {self.method} {self.path} {text}", out


def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("t2_request", default=None)


def current() -> RequestRecord | None:
    return _current.get()


def request_id() -> str | None:
    rec = _current.get()
    return rec.id if rec else None


def note(**fields: Any) -> None:
    """Add fields to the running request's log line (no-op outside a request, e.g. in unit tests)."""
    rec = _current.get()
    if rec is not None:
        rec.fields.update(fields)


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def _client_id(scope: dict) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            text = value.decode("latin-1")
            return text if _CLIENT_ID.match(text) else None
    return None


class RequestLog:
    """ASGI middleware: request id in and out, the backstop 500, one log line per request."""

    def __init__(self, app, on_error: Callable[[str, int], None] | None = None):
        self.app, self.on_error = app, on_error     # on_error(path, status): the error metric

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = RequestRecord(_client_id(scope) or new_id(), scope.get("method", ""), scope.get("path", ""))
        token = _current.set(rec)
        started = complete = False

        async def send_(message):
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
                rec.fields["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (HEADER, rec.id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception as e:   # noqa: BLE001 - the backstop: nothing below answered
            errlog.exception("unhandled error in request %s", rec.id)
            rec.fields["error"] = "internal_error"
            if not started:
                await self._internal_error(rec, type(e).__name__, send_)
                if self.on_error:
                    self.on_error(rec.path, 500)
        finally:
            _current.reset(token)
            if started and not complete:
                rec.fields.setdefault("error", "client_closed_request")   # the stream was cut
            rec.fields["total_ms"] = (time.perf_counter() - rec.t0) * 1e3
            if rec.path not in QUIET_PATHS:
                text, fields = rec.line()
                status = rec.fields.get("status", 500)
                log.log(logging.WARNING if status >= 500 else logging.INFO, text, extra={"fields": fields})

    @staticmethod
    async def _internal_error(rec: RequestRecord, kind: str, send) -> None:
        body = json.dumps({"error": {"message": f"internal server error ({kind})", "type": "server_error", "param": None,
                                     "code": "internal_error", "request_id": rec.id}}).encode()
        await send({"type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
