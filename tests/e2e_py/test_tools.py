"""A two-step tool loop through the official openai Python SDK: a forced call (its arguments validate against the
function's parameters), our function runs, its result goes back as a ``tool`` message, the model answers in text; the
streamed call reassembles to the non-stream one."""

from __future__ import annotations

import json

import jsonschema

from test_openai_python import MODEL, make_client

PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_forecast", "description": "Weather forecast for a city",
                                           "parameters": PARAMS}}]
ASK = [{"role": "user", "content": "What will the weather be in Rome for the next 3 days?"}]


def test_call_then_result_then_answer():
    client = make_client()
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_forecast"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS)

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": ["sun", "sun", "rain"]})}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=40)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content

    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=0, max_tokens=80, stream=True)
    pieces, name, finish = [], None, None
    for chunk in stream:
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                name = name or (t.function.name if t.function else None)
                pieces.append((t.function.arguments or "") if t.function else "")
            finish = c.finish_reason or finish
    assert name == "get_forecast" and finish == "tool_calls"
    assert "".join(pieces) == call.function.arguments
