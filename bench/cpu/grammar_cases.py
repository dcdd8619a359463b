"""The schemas, valid documents and keyword probes of bench/cpu/grammar_libs.py.

PERSON and ORDER are read from the tests that use them (worker-py/tests/test_grammar.py,
tests/e2e_py/test_structured_outputs.py) by parsing their source, so the benchmark follows the tests without importing
them (they import pytest, the openai SDK, the test fixtures).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _literal(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not found in {path}")


PERSON = _literal(ROOT / "worker-py/tests/test_grammar.py", "PERSON")
ORDER = _literal(ROOT / "tests/e2e_py/test_structured_outputs.py", "ORDER")


def _wide() -> tuple[dict, dict]:
    """50 properties of five kinds, nested arrays among them, all required; and a document for it."""
    kinds = [
        ({"type": "string", "maxLength": 20}, lambda i: f"value {i}"),
        ({"type": "integer", "minimum": 0}, lambda i: i * 37),
        ({"type": "array", "maxItems": 3, "items": {"type": "array", "maxItems": 4, "items": {"type": "integer"}}},
         lambda i: [[i, i + 1], [], [7]]),
        ({"type": "array", "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "tags"],
            "properties": {"id": {"type": "integer"},
                           "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 10}}}}},
         lambda i: [{"id": i, "tags": ["a", "bé"]}]),
        ({"type": "number"}, lambda i: i + 0.25),
    ]
    props, doc = {}, {}
    for i in range(50):
        schema, value = kinds[i % len(kinds)]
        props[f"p{i:02d}"], doc[f"p{i:02d}"] = schema, value(i)
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}, doc


WIDE, _WIDE_DOC = _wide()

SCHEMAS = {
    "json_object": {"type": "object"},
    "PERSON": PERSON,
    "ORDER": ORDER,
    "wide-50": WIDE,
}

_PERSON_DOC = {"name": "Ada Lovelace", "age": 36, "role": "engineer", "address": {"city": "Zürich", "zip": "10115"},
               "skills": ["math", "poetry"], "active": True}
_ORDER_DOC = {"customer": {"name": "Ann Smith", "vip": False},
              "items": [{"product": "apple", "quantity": 2}, {"product": "pear", "quantity": 10}],
              "status": "shipped", "total": 12.5}


def _compact(value) -> str:
    # Compact and in the schema's property order: what every library is asked to produce here.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


DOCS = {"json_object": _compact(_PERSON_DOC), "PERSON": _compact(_PERSON_DOC), "ORDER": _compact(_ORDER_DOC),
        "wide-50": _compact(_WIDE_DOC)}

# keyword → (schema, a document valid under it, a document valid without the keyword but not with it (or None), the
# word a refusal's message must hold to name the keyword).
# Outcomes: refused at compile (loud, what we need: the worker turns it into a 400 naming the keyword), enforced,
# IGNORED (the violating document is accepted: a silent defect), or over-strict (the valid document is refused).
KEYWORD_CASES = {
    "not": ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"],
             "additionalProperties": False}, '{"a":1}', '{"a":"x"}', "not"),
    "if/then/else": ({"type": "object", "additionalProperties": False, "required": ["a"],
                      "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}},
                      "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]},
                      "else": {"required": ["c"]}}, '{"a":1,"b":2}', '{"a":1}', "if"),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1,5]", "[1,2]",
                 "contains"),
    # No additionalProperties: outlines-core refuses {"additionalProperties": false} without properties, which would
    # hide what it does with patternProperties.
    "patternProperties": ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}}}, '{"x_a":1}',
                          '{"x_a":"s"}', "patternProperties"),
    "format: email": ({"type": "string", "format": "email"}, '"ada@example.com"', '"not an email"', "format"),
    "unknown keyword": ({"type": "string", "frobnicate": True}, '"s"', None, "frobnicate"),
}
