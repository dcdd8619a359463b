"""Streaming detokenizer and stop strings on the bundled model's real tokenizer."""

from __future__ import annotations

import pytest

from llm_worker.text.detokenizer import StreamDetokenizer
from llm_worker.text.logprobs import LogprobFormatter
from llm_worker.engine.base import TokenLogprob
from llm_worker.text.stops import StopMatcher

SAMPLES = [
    "Hello, world! Ça va? naïve café — déjà vu.",
    "日本語のテキストと emoji 🎉🚀 mixed: ok?",
    "Ünïcödé ąčęėįšųūž 中文 한국어 Ελληνικά",
    "  leading spaces and\ttabs\nnew lines\n\n  done",
]


def stream(tokenizer, ids, chunk=1, prompt=None):
    d = StreamDetokenizer(tokenizer, prompt)
    pieces = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(d.flush())
    return pieces


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids, chunk)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # no half characters ever leave the worker


def test_multibyte_char_split_over_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should need several byte-level tokens"
    d = StreamDetokenizer(tokenizer)
    assert [d.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1:]) == "🎉"


def test_prompt_context_does_not_leak(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)["input_ids"]
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, 1, prompt)) == "Hello there"


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_stop_string_spanning_token_boundary(tokenizer):
    text = "The capital of France is Paris. It is lovely."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    # Pick a stop string that starts inside one token's text and ends inside a later one.
    stop = "ital of Fr"
    assert not any(stop in p for p in pieces)
    out, hit = feed_all([stop], pieces)
    assert hit and out == "The cap"


def test_stop_never_emitted_in_any_piece():
    m = StopMatcher(["</end>"])
    emitted = []
    for piece in ["abc <", "/e", "nd", ">tail"]:
        text, hit = m.feed(piece)
        emitted.append(text)
        if hit:
            break
    assert hit and "".join(emitted) == "abc " and all("<" not in e for e in emitted)


def test_held_text_released_when_it_cannot_match():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ar") == ("STar", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_earliest_of_several_stops_wins():
    out, hit = feed_all(["world", "lo"], ["hello", " world"])
    assert hit and out == "hel"


def test_logprob_bytes_of_partial_character(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    f = LogprobFormatter(tokenizer)
    raw = b"".join(bytes(f.token(i)[1]) for i in ids)
    assert raw.decode("utf-8") == "🎉"
    obj = f.format(TokenLogprob(ids[0], -0.5, [(ids[0], -0.5)]))
    assert set(obj) == {"token", "logprob", "bytes", "top_logprobs"} and obj["top_logprobs"][0]["logprob"] == -0.5
