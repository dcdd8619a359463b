"""Typed errors with the stable codes of docs/PROTOCOL.md ("Failures"); the TS side is gateway/src/protocol/job.ts.

A job fails with BullMQ failedReason "<code>: <message>". Every code here is final for the job: the worker raises
them as BullMQ's UnrecoverableError (recognised by name across Node and Python), so a retry only ever comes from a
worker's death (stalled-job check), never from a worker's own verdict.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal["context_length_exceeded", "invalid_request", "queue_timeout", "cancelled", "internal_error"]


class ConfigError(Exception):
    """A bad configuration value or an unusable model source: the worker exits with status 2."""


class JobError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message

    def to_event(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}
