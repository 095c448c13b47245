"""Server-side domain errors, each with the OpenAI error it becomes.

Contract: anything the user got wrong raises a subclass of `ServerError` that carries the HTTP status, the
OpenAI `type` and `code`, and the offending `param`. `server/api/app.py` turns each into the OpenAI shape
`{"error": {"message", "type", "param", "code", "request_id"}}` in one place (`error_body`); anything else
is a 500 from the backstop. Once a stream has started, an error is an SSE event of the same shape (`sse_error`).
"""

from __future__ import annotations

import json

from server.api.observe import note, request_id


class ServerError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code


class InvalidRequest(ServerError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class ModelNotFound(ServerError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Overloaded(ServerError):
    status, type, code = 429, "rate_limit_error", "overloaded"   # sent with a Retry-After header


class Conflict(ServerError):
    status, type, code = 409, "invalid_request_error", "conflict"


class RequestTimeout(ServerError):
    status, type, code = 504, "timeout_error", "request_timeout"


class EngineUnavailable(ServerError):
    status, type, code = 503, "server_error", "engine_unavailable"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object, with the request's id (server/api/observe.py) when there is one."""
    err = {"message": message, "type": type_, "param": param, "code": code}
    rid = request_id()
    if rid is not None:
        err["request_id"] = rid
    return {"error": err}


def sse_error(e: ServerError) -> str:
    """A stream's error event (the headers are gone, so the error is told in-band), noted in the log line."""
    note(error=e.code or e.type)
    return f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
