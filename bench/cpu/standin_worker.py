"""`python -m llm_worker` with the benchmark stand-in engine (llm_worker/engine/standin.py), for bench/cpu only.

Used by bench/cpu/stack_up.mjs (BENCH_STANDIN_SHIM=1) when the worker's own factory does not yet accept ENGINE=standin:
it replaces ``llm_worker.engine.create_engine`` for this process only, then runs the worker's real ``main()`` — transport,
BullMQ, pub/sub, detokenizer, registration: all the worker's own code. The worker still loads the model (unused).
"""

from __future__ import annotations

import llm_worker.engine as engines
from llm_worker.__main__ import main
from llm_worker.engine.standin import StandInEngine


def _create_standin(name, model, **kwargs):
    return StandInEngine(model, **kwargs)


engines.create_engine = _create_standin

if __name__ == "__main__":
    main()
