"""Server-side domain errors, each with the OpenAI error it becomes.

Contract: anything the user got wrong raises a subclass of `ServerError` that carries the HTTP status, the
OpenAI `type` and `code`, and the offending `param`. `server/api/app.py` turns each into the OpenAI shape
`{"error": {"message", "type", "param", "code"}}` in one place; anything else is a 500 from the backstop.
"""

from __future__ import annotations


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
