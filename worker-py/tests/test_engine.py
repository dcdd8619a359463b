"""CpuBatchEngine on the bundled model: batching must not change results; the sampling contract holds."""

from __future__ import annotations

import threading
import time

from conftest import chat_ids, wait_until
from engine_util import Collector, run_requests

from llm_worker.engine.base import GenerationRequest, SamplingParams

TOPICS = ["cats", "the sea", "robots", "bread", "winter", "trains", "music", "mountains",
          "coffee", "bees", "chess", "rain", "libraries", "volcanoes", "owls", "bridges"]


def req(tokenizer, rid, text, **params):
    return GenerationRequest(rid, chat_ids(tokenizer, text), SamplingParams(**params))


def test_greedy_alone_equals_greedy_in_full_batch(engine, tokenizer):
    prompts = [f"Write two sentences about {t}." for t in TOPICS]
    alone = {}
    for i in (0, 7):  # two alone runs keep the test short; scripts/greedy_equivalence.py measures all 16
        alone.update(run_requests(engine, [req(tokenizer, f"a{i}", prompts[i], max_tokens=24, temperature=0.0)]))
    batch = run_requests(engine, [req(tokenizer, f"b{i}", p, max_tokens=24, temperature=0.0)
                                  for i, p in enumerate(prompts)])
    for i in (0, 7):
        assert alone[f"a{i}"].tokens[0] == batch[f"b{i}"].tokens[0]


def test_late_joiner_matches_alone(engine, tokenizer):
    """A request that joins a batch already running (different context lengths, left padding) still matches."""
    alone = run_requests(engine, [req(tokenizer, "solo", "Name three colours.", max_tokens=16, temperature=0.0)])
    long = req(tokenizer, "long", "Tell me a long story about dragons and knights. " * 4, max_tokens=40,
               temperature=0.0, ignore_eos=True)
    late = req(tokenizer, "late", "Name three colours.", max_tokens=16, temperature=0.0)
    c = Collector([long, late])
    long_when_late_began = []  # what "long" had generated when "late" first emitted

    def emit(rid, outputs):
        if rid == "late" and not long_when_late_began:
            long_when_late_began.append(len(c.results["long"].tokens.get(0, [])))
        c.emit(rid, outputs)

    engine.submit(long, emit)
    # "long" is past its prefill and decoding (it emitted a token): "late" joins a running batch.
    wait_until(lambda: c.results["long"].tokens.get(0), 300, "the long request's first token")
    engine.submit(late, emit)
    assert c.done.wait(300)
    assert 0 < long_when_late_began[0] < 40, "late must join while long is running"
    assert c.results["late"].tokens[0] == alone["solo"].tokens[0]


def test_same_seed_same_text_different_seed_different_text(engine, tokenizer):
    mk = lambda rid, seed: req(tokenizer, rid, "Invent a name for a pet.", max_tokens=20, temperature=1.0,
                               seed=seed, ignore_eos=True)
    out = run_requests(engine, [mk("s1", 7), mk("s2", 7), mk("s3", 8)])
    assert out["s1"].tokens[0] == out["s2"].tokens[0]
    assert out["s1"].tokens[0] != out["s3"].tokens[0]


def test_n_choices_share_prompt_and_differ(engine, tokenizer):
    out = run_requests(engine, [req(tokenizer, "n", "Say a random word.", max_tokens=8, temperature=1.0, seed=1,
                                    n=4, ignore_eos=True)])["n"]
    assert sorted(out.tokens) == [0, 1, 2, 3] and all(len(t) == 8 for t in out.tokens.values())
    assert len({tuple(t) for t in out.tokens.values()}) > 1
    assert set(out.finish.values()) == {"length"}


def test_logit_bias_forces_and_bans(engine, tokenizer):
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = run_requests(engine, [req(tokenizer, "force", "Hello", max_tokens=5, temperature=0.0,
                                    logit_bias={forced: 100.0}, ignore_eos=True)])
    assert out["force"].tokens[0] == [forced] * 5
    base = run_requests(engine, [req(tokenizer, "base", "What is 2+2?", max_tokens=6, temperature=0.0)])
    first = base["base"].tokens[0][0]
    banned = run_requests(engine, [req(tokenizer, "ban", "What is 2+2?", max_tokens=6, temperature=0.0,
                                       logit_bias={first: -100.0})])
    assert first not in banned["ban"].tokens[0]


def test_max_tokens_and_logprobs(engine, tokenizer):
    out = run_requests(engine, [req(tokenizer, "lp", "Hi", max_tokens=5, temperature=0.0, logprobs=True,
                                    top_logprobs=3, ignore_eos=True)])["lp"]
    assert len(out.tokens[0]) == 5 and out.finish[0] == "length"
    for tok, lp in zip(out.tokens[0], out.logprobs[0]):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token


def test_eos_ends_with_stop(engine, tokenizer):
    out = run_requests(engine, [req(tokenizer, "eos", "Reply with just the word: yes", max_tokens=64,
                                    temperature=0.0)])["eos"]
    assert out.finish[0] == "stop" and len(out.tokens[0]) < 64


def test_cancel_frees_the_sequence(engine, tokenizer):
    r = req(tokenizer, "cancel-me", "Write a very long essay about history.", max_tokens=2000, temperature=0.0,
            ignore_eos=True)
    c = Collector([r])
    engine.submit(r, c.emit)
    # Its first token (so the previous test's rows are gone), then its row in the batch (added just after that emit).
    wait_until(lambda: c.results["cancel-me"].tokens.get(0) and engine.stats().running_sequences == 1
               and engine.stats().kv_cache_bytes > 0, 300, "the sequence to be in the batch")
    engine.cancel("cancel-me")
    generated_at_cancel = len(c.results["cancel-me"].tokens[0])
    assert c.done.wait(300)
    assert c.results["cancel-me"].finish[0] == "cancelled"
    # It leaves the batch at the next token boundary: at most the step already running when cancel() returned emits a
    # token after it (counted in steps, not seconds, so that a slow or loaded machine does not matter).
    assert len(c.results["cancel-me"].tokens[0]) - generated_at_cancel <= 1
    # The engine frees the rows and their cache just after that last emit.
    wait_until(lambda: engine.stats().running_sequences == 0 and engine.stats().kv_cache_bytes == 0, 60,
               "the engine to free the cancelled sequence")


def test_stop_choice_ends_one_choice_only(engine, tokenizer):
    r = req(tokenizer, "two", "Count from one to fifty.", max_tokens=30, temperature=0.0, n=2, ignore_eos=True)
    c = Collector([r])
    stopped = threading.Event()

    def emit(rid, outputs):
        c.emit(rid, outputs)
        if not stopped.is_set() and len(c.results[rid].tokens.get(1, [])) >= 3:
            stopped.set()
            engine.stop_choice(rid, 1)

    engine.submit(r, emit)
    assert c.done.wait(120)
    res = c.results["two"]
    assert len(res.tokens[0]) == 30 and res.finish[0] == "length"
    assert res.finish[1] == "cancelled" and len(res.tokens[1]) < 30


def test_deadline_cuts_generation(engine, tokenizer):
    r = GenerationRequest("late", chat_ids(tokenizer, "Write a poem."),
                          SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True), deadline=time.time() + 1.0)
    out = run_requests(engine, [r])["late"]
    assert out.finish[0] == "length" and len(out.tokens[0]) < 500


def test_a_request_with_no_room_before_its_start_deadline_ends_not_started(engine, tokenizer):
    """The gateway's queue timeout also covers waiting inside the worker: a request that cannot join the batch (every
    row held by a request at its fair share: one row each) by its start deadline leaves the waiting line with
    "not_started" (the transport fails it queue_timeout), instead of waiting up to the whole request's deadline."""
    fill = [req(tokenizer, f"fill-{i}", f"Write a very long essay about {TOPICS[i % len(TOPICS)]}.", max_tokens=2000,
                temperature=1.0, ignore_eos=True) for i in range(engine.max_batch)]
    c = Collector(fill)
    for r in fill:
        engine.submit(r, c.emit)
    wait_until(lambda: engine.stats().running_sequences == engine.max_batch, 300, "every row to be taken")
    start_by = time.time() + 0.5
    late = GenerationRequest("no-room", chat_ids(tokenizer, "Hi"), SamplingParams(max_tokens=5), start_deadline=start_by)
    lc = Collector([late])
    engine.submit(late, lc.emit)
    assert lc.done.wait(120), "the waiting request was never ended"
    assert lc.results["no-room"].finish == {0: "not_started"} and lc.results["no-room"].tokens[0] == []
    assert time.time() >= start_by
    assert engine.stats().running_sequences == engine.max_batch  # nobody was over its share: no room was made
    for r in fill:
        engine.cancel(r.request_id)
    assert c.done.wait(300)
    wait_until(lambda: engine.stats().running_sequences == 0, 60, "the engine to free the rows")


class Timeline(Collector):
    """A Collector that also records when each request got its first token and when it finished."""

    def __init__(self, requests):
        super().__init__(requests)
        self.first: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def emit(self, rid, outputs):
        now = time.monotonic()
        if any(o.token_ids for o in outputs):
            self.first.setdefault(rid, now)
        super().emit(rid, outputs)
        if len(self.results[rid].finish) == self._requests[rid].params.n:
            self.ended.setdefault(rid, now)

    def watch(self, requests):
        self._requests = {r.request_id: r for r in requests}
        return self


def test_one_wide_request_does_not_starve_another(engine, tokenizer):
    """Fair admission (issue 11: one n=16 stream held all 16 rows and another client's first token waited 58 s):
    a single-choice request arriving while an n=max_batch request holds every row gets its first token at once, by
    parking rows of the wide one, and the wide one still delivers every choice in full."""
    wide = req(tokenizer, "wide", "Write a very long essay about history.", max_tokens=120, temperature=1.0, seed=7,
               n=engine.max_batch, ignore_eos=True)
    small = req(tokenizer, "small", "Say hello.", max_tokens=8, temperature=0.0, ignore_eos=True)
    t = Timeline([wide, small]).watch([wide, small])
    before = engine.preempted_total
    engine.submit(wide, t.emit)
    wait_until(lambda: engine.stats().running_sequences == engine.max_batch, 300, "the wide request to take every row")
    engine.submit(small, t.emit)
    assert t.done.wait(600)
    assert engine.preempted_total > before, "no row of the wide request was parked"
    assert t.ended["small"] < t.ended["wide"], "the small request waited for the wide one to finish"
    out = t.results["wide"]
    assert sorted(out.finish) == list(range(engine.max_batch))
    assert all(out.finish[i] == "length" and len(out.tokens[i]) == 120 for i in range(engine.max_batch))
    assert t.results["small"].finish == {0: "length"} and len(t.results["small"].tokens[0]) == 8


def test_a_parked_row_goes_on_where_it_stopped(engine, tokenizer):
    """A parked (preempted) row is prefilled again from prompt + its tokens and continues as if it had never left:
    greedy choices of the wide request, parked or not, all equal the same request's greedy text run alone."""
    prompt = "List the planets of the solar system."
    alone = run_requests(engine, [req(tokenizer, "alone", prompt, max_tokens=40, temperature=0.0, ignore_eos=True)])
    wide = req(tokenizer, "wide-greedy", prompt, max_tokens=40, temperature=0.0, n=engine.max_batch, ignore_eos=True)
    others = [req(tokenizer, f"other-{i}", f"Tell me about {TOPICS[i]}.", max_tokens=6) for i in range(3)]
    t = Timeline([wide] + others).watch([wide] + others)
    before = engine.preempted_total
    engine.submit(wide, t.emit)
    wait_until(lambda: len(t.results["wide-greedy"].tokens.get(0, [])) >= 10, 300, "the wide request to be under way")
    for r in others:
        engine.submit(r, t.emit)
    assert t.done.wait(600)
    assert engine.preempted_total >= before + 3
    expected = alone["alone"].tokens[0]
    for i in range(engine.max_batch):
        assert t.results["wide-greedy"].tokens[i] == expected, f"choice {i} changed after it was parked"


def test_cancel_reaches_parked_rows(engine, tokenizer):
    wide = req(tokenizer, "wide-c", "Write a long story.", max_tokens=400, temperature=1.0, n=engine.max_batch,
               ignore_eos=True)
    hold = req(tokenizer, "hold", "Write a long poem.", max_tokens=400, temperature=1.0, ignore_eos=True)
    t = Timeline([wide, hold]).watch([wide, hold])
    engine.submit(wide, t.emit)
    wait_until(lambda: engine.stats().running_sequences == engine.max_batch, 300, "the wide request to take every row")
    engine.submit(hold, t.emit)
    wait_until(lambda: "hold" in t.first, 120, "the second request to start")
    engine.cancel("wide-c")
    engine.cancel("hold")
    assert t.done.wait(120), "a parked row never ended"
    assert set(t.results["wide-c"].finish.values()) == {"cancelled"}
    wait_until(lambda: engine.stats().running_sequences == 0 and engine.stats().waiting_requests == 0, 60, "idle")


def test_kv_budget_bounds_rows_times_longest_context(engine, tokenizer):
    """With a KV budget of two rows' worth of context, a third request starts only once one of the first two ended;
    a request that could never fit ends with an error naming the budget instead of growing the cache."""
    rs = [req(tokenizer, f"kv-{i}", f"Tell me about {TOPICS[i]}.", max_tokens=30, temperature=0.0, ignore_eos=True)
          for i in range(3)]
    final = max(len(r.prompt_ids) for r in rs) + 30
    saved = engine.kv_token_budget
    engine.kv_token_budget = 2 * final + 1
    try:
        t = Timeline(rs).watch(rs)
        for r in rs:
            engine.submit(r, t.emit)
        assert t.done.wait(300)
        assert t.first["kv-2"] >= min(t.ended["kv-0"], t.ended["kv-1"]), "three rows ran at once over the budget"
        too_big = req(tokenizer, "too-big", "Hi", max_tokens=engine.kv_token_budget)
        out = run_requests(engine, [too_big])["too-big"]
        assert out.finish == {0: "error"}
    finally:
        engine.kv_token_budget = saved


def test_call_runs_on_the_engine_thread_between_steps_and_fails_once_stopped():
    """ThreadedEngine.call (prompt scoring uses it): the work runs on the engine's own thread, its result or its
    exception comes back through the future, and a call made or pending at stop fails instead of waiting forever."""
    from llm_worker.engine.standin import StandInEngine

    eng = StandInEngine(step_ms=1)
    eng.start()
    try:
        assert eng.call(lambda: threading.current_thread().name).result(timeout=10) == eng.thread_name

        def boom():
            raise ValueError("the caller's fault")

        err = eng.call(boom).exception(timeout=10)
        assert isinstance(err, ValueError) and "caller" in str(err)
        assert eng.call(lambda: 7).result(timeout=10) == 7  # the engine thread survived it
    finally:
        eng.stop()
    late = eng.call(lambda: 1)
    assert isinstance(late.exception(timeout=1), RuntimeError)
