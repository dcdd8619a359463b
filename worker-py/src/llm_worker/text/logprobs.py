"""OpenAI ``ChatCompletionTokenLogprob`` objects: token text and its UTF-8 bytes.

Byte-level BPE vocabularies (GPT-2 family, incl. the bundled SmolLM2) spell bytes as printable characters; mapping
them back gives the token's exact bytes, even for half a multi-byte character. Other vocabularies fall back to
decoding the single token.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Any, Optional

from ..engine.base import TokenLogprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table, inverted.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class LogprobFormatter:
    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        piece = self._tok.convert_ids_to_tokens(token_id)
        table = _byte_decoder()
        if piece is not None and piece not in self._tok.all_special_tokens and all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
        else:
            raw = self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
        hit = (raw.decode("utf-8", errors="replace"), list(raw))
        self._cache[token_id] = hit
        return hit

    def format(self, info: TokenLogprob) -> dict[str, Any]:
        text, raw = self.token(info.token_id)
        top = []
        for tid, lp in info.top:
            t, b = self.token(tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": info.logprob, "bytes": raw, "top_logprobs": top}


class AlignedLogprobs:
    """A choice's logprob entries, let out in step with its text: a token's entry goes out once its text has.

    The stop matcher holds back text that may begin a stop string and drops a stop string it completes; an entry
    sent as soon as its token was sampled would describe text the client never receives. OpenAI's ``logprobs.content``
    spells exactly the returned ``content``, token by token. So each entry waits with the character offset where its
    token's text begins, and goes out once the emitted text reaches past that offset (a token straddling the cut of a
    stop string keeps its entry: part of its text was returned). At a stop string, entries still held are dropped.
    """

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []  # every entry let out so far: the choice's ``logprobs`` in its result
        self._held: deque[tuple[int, dict[str, Any]]] = deque()
        self._produced = 0  # characters the detokenizer has produced, before stop matching

    def token(self, entry: Optional[dict[str, Any]], text: str) -> None:
        """One sampled token: its entry (None: the engine gave none), and the text the detokenizer produced for it
        ("" while it holds bytes of an unfinished character back)."""
        if entry is not None:
            self._held.append((self._produced, entry))
        self._produced += len(text)

    def release(self, emitted_chars: int) -> list[dict[str, Any]]:
        """The entries whose text begins before `emitted_chars` (the choice's text returned so far), in order."""
        out = []
        while self._held and self._held[0][0] < emitted_chars:
            out.append(self._held.popleft()[1])
        self.sent.extend(out)
        return out

    def release_all(self) -> list[dict[str, Any]]:
        """The choice ended without a stop string: every entry's text was (or is now) returned."""
        out = [entry for _, entry in self._held]
        self._held.clear()
        self.sent.extend(out)
        return out
