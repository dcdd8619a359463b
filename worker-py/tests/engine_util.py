"""Run requests through an engine synchronously (tests and scripts)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from llm_worker.engine.base import ChoiceOutput, Engine, GenerationRequest


@dataclass
class Collected:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)


class Collector:
    def __init__(self, requests: list[GenerationRequest]):
        self.results = {r.request_id: Collected() for r in requests}
        self._open = {r.request_id: r.params.n for r in requests}
        self._lock = threading.Lock()
        self.done = threading.Event()
        if not requests:
            self.done.set()

    def emit(self, rid: str, outputs: list[ChoiceOutput]) -> None:
        with self._lock:
            res = self.results[rid]
            for o in outputs:
                res.tokens.setdefault(o.index, []).extend(o.token_ids)
                if o.logprobs:
                    res.logprobs.setdefault(o.index, []).extend(o.logprobs)
                if o.finish_reason:
                    res.finish[o.index] = o.finish_reason
                    self._open[rid] -= 1
            if all(v == 0 for v in self._open.values()):
                self.done.set()


def run_requests(engine: Engine, requests: list[GenerationRequest], timeout: Optional[float] = 600) -> dict[str, Collected]:
    c = Collector(requests)
    for r in requests:
        engine.submit(r, c.emit)
    assert c.done.wait(timeout), "engine did not finish in time"
    return c.results
