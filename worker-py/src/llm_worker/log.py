"""Structured JSON logs on stderr, one object per line. Fields passed with ``extra={...}`` become keys.

Prompt and completion text are never logged unless LOG_PROMPTS=true (see transport/job_run.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created * 1000), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries log at their own levels; keep their chatter out of ours unless debugging.
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "bullmq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def now_ms() -> int:
    return int(time.time() * 1000)
