"""Typed errors with the stable codes of docs/PROTOCOL.md ("Failures"); the TS side is gateway/src/protocol/job.ts.

A job fails with BullMQ failedReason "<code>: <message>". Every code here is final for the job: the worker raises
them as BullMQ's UnrecoverableError (recognised by name across Node and Python), so a retry only ever comes from a
worker's death (stalled-job check), never from a worker's own verdict.
"""

from __future__ import annotations

from typing import Literal, Optional

ErrorCode = Literal["context_length_exceeded", "invalid_request", "queue_timeout", "cancelled", "internal_error"]


class ConfigError(Exception):
    """A bad configuration value or an unusable model source: the worker exits with status 2."""


class JobError(Exception):
    """``param``: the request field at fault, when known; it travels in the error event and in the failedReason as
    "<code>[<param>]: <message>" (docs/PROTOCOL.md, Failures) so that the client's 400 names it."""

    def __init__(self, code: ErrorCode, message: str, param: Optional[str] = None):
        super().__init__(f"{code}[{param}]: {message}" if param else f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message
        self.param = param

    def to_event(self) -> dict[str, str]:
        event = {"code": self.code, "message": self.message}
        if self.param:
            event["param"] = self.param
        return event
