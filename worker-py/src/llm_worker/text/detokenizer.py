"""Incremental detokenization with prefix/read offsets (the scheme of TGI and vLLM).

Decoding one token at a time is wrong twice over: a multi-byte character split over tokens decodes to U+FFFD until
its last byte arrives, and SentencePiece-style tokenizers drop or merge leading spaces depending on what precedes a
token. So each step decodes a window that starts a few tokens back (``prefix_offset``), and emits only what that
window adds beyond the text already emitted (up to ``read_offset``), holding back while it ends in U+FFFD.
"""

from __future__ import annotations

# Prompt tokens used as left context for the first generated token (SentencePiece leading-space handling).
_CONTEXT_TOKENS = 5


class StreamDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list((prompt_ids or [])[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Feed new token ids; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end of a choice: whatever is still held back (an incomplete character comes out as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
