"""Log configuration of `t2 serve`: plain text lines or one JSON object per line (`--log-format json`).

Contract: `configure(level, fmt)` sets up the root logger once (stderr); `uvicorn_log_config(level, fmt)`
is the matching `log_config` for uvicorn, so that its own lines have the same shape. In JSON mode every
line is an object with `ts` (ISO 8601, UTC), `level`, `logger` and `message`, plus the fields a record
carries in `extra={"fields": {...}}` (the per-request line of server/api/observe.py uses this), and
`exc_info` as text when there is a traceback. In text mode those fields are already in the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values that JSON cannot hold are written as their str()."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when it writes (not the one it was made with: a caller that
    swaps stderr for a while, as a test runner does, must not leave the root logger on a closed file)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str, fmt: LogFormat = "text") -> None:
    if fmt == "json":     # progress bars are not log lines (the SVD's shows on a terminal only anyway)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    handler = _Stderr()
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def uvicorn_log_config(level: str, fmt: LogFormat = "text") -> dict[str, Any]:
    """uvicorn's loggers through one handler of our format (its access log is off: observe logs requests)."""
    fmt_cfg = ({"()": "server.logs.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT})
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"t2": fmt_cfg},
        "handlers": {"t2": {"class": "logging.StreamHandler", "formatter": "t2", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["t2"], "level": level.upper(), "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
