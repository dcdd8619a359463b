"""The benchmark's prompt, shared by the HTTP load generator (loadgen.py) and cpu/engine_alone.py."""

from __future__ import annotations

import itertools
import random

# About 64 prompt tokens with SmolLM2's chat template (the template adds its default system prompt). The output is
# forced to max_tokens by each server's own knob, so the prompt's content only has to be stable.
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a mysterious map inside a bottle. "
          "Describe the journey, the places and the people in many paragraphs.")

# Request numbers never repeat within a process and start at a random point, so two runs against one server (the
# stand-in levels share a stack; a CLI run may follow another) do not meet the same prompt twice.
_numbers = itertools.count(random.randrange(10**6))


def numbered(prompt: str) -> str:
    """A unique prompt of the same token count (SmolLM2's tokenizer splits digits: 6 digits = 6 tokens)."""
    return f"Request {next(_numbers) % 10**6:06d}. {prompt}"
