/**
 * Tool calling without a model: the request checks (400s with param), the prompt the tools become, the grammar of a
 * forced call, and the parser that reads calls back, fed whole and fed in every possible split (a stream's deltas
 * reassemble to the non-stream answer, and no piece of a tag leaks into content).
 */
import { ApiError } from '../src/errors';
import { chatCompletionRequestSchema } from '../src/protocol/chat';
import { toChatJob } from '../src/services/chat-params';
import { parseOrThrow } from '../src/services/validation';
import { MAX_PARALLEL_CALLS } from '../src/tools/grammar';
import { collect, parseToolOutput, ToolCallParser, type ToolEvent } from '../src/tools/parser';

const weather = {
  type: 'function' as const,
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const time = { type: 'function' as const, function: { name: 'get_time' } };
const base = { model: 'm', messages: [{ role: 'user', content: 'Weather in Paris?' }], tools: [weather, time] };

function prepare(body: unknown) {
  const req = parseOrThrow(chatCompletionRequestSchema, body);
  return toChatJob(req);
}

function rejection(body: unknown): ApiError {
  try {
    prepare(body);
  } catch (err) {
    if (err instanceof ApiError) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

describe('tool requests', () => {
  it('auto: tools listed in the system message, nothing constrained', () => {
    const { tools, params, messages } = prepare(base);
    expect(tools?.choice).toBe('auto');
    expect(params.response_format).toBeUndefined();
    expect(messages[0].role).toBe('system');
    expect(messages[0].content).toContain('<tools>\n{"type":"function","function":{"name":"get_weather"');
    expect(messages[0].content).toContain('{"name": <function-name>, "arguments": <args-json-object>}');
    expect(messages[1]).toEqual({ role: 'user', content: 'Weather in Paris?' });
  });

  it('an existing system message keeps its text first', () => {
    const { messages } = prepare({ ...base, messages: [{ role: 'developer', content: 'Be brief.' }, ...base.messages] });
    expect(messages).toHaveLength(2);
    expect(messages[0].content.startsWith('Be brief.\n\n# Tools\n')).toBe(true);
  });

  it('required and a named function become a grammar the worker enforces (param "tools" for its errors)', () => {
    const required = prepare({ ...base, tool_choice: 'required' }).params.response_format;
    expect(required).toMatchObject({ type: 'lark', param: 'tools' });
    const g = (required as { grammar: string }).grammar;
    expect(g).toContain(`("\\n" call){0,${MAX_PARALLEL_CALLS - 1}}`);
    expect(g).toContain('"const":"get_weather"');
    expect(g).toContain('"const":"get_time"');
    const named = prepare({ ...base, tool_choice: { type: 'function', function: { name: 'get_time' } } }).params.response_format as { grammar: string };
    expect(named.grammar).not.toContain('get_weather');
    expect(named.grammar.startsWith('start: call\n')).toBe(true); // a named function is called once
    const single = prepare({ ...base, tool_choice: 'required', parallel_tool_calls: false }).params.response_format as { grammar: string };
    expect(single.grammar.startsWith('start: call\n')).toBe(true);
  });

  it('tool_choice none: no tools in the prompt and no parsing', () => {
    const { tools, messages } = prepare({ ...base, tool_choice: 'none' });
    expect(tools).toBeNull();
    expect(messages).toEqual([{ role: 'user', content: 'Weather in Paris?' }]);
  });

  it('history: assistant tool_calls become <tool_call> text, a run of tool results one user turn', () => {
    const { messages } = prepare({
      ...base,
      messages: [
        ...base.messages,
        {
          role: 'assistant',
          content: null,
          tool_calls: [
            { id: 'call_a', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } },
            { id: 'call_b', type: 'function', function: { name: 'get_time', arguments: '{}' } },
          ],
        },
        { role: 'tool', tool_call_id: 'call_a', content: '18 C, sunny' },
        { role: 'tool', tool_call_id: 'call_b', content: [{ type: 'text', text: '14:02' }] },
      ],
    });
    expect(messages.slice(2)).toEqual([
      {
        role: 'assistant',
        content:
          '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
      },
      { role: 'user', content: '<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n14:02\n</tool_response>' },
    ]);
  });

  it.each([
    ['tool_choice without tools', { model: 'm', messages: base.messages, tool_choice: 'auto' }, 'tool_choice', 'invalid_value'],
    ['tool_choice naming an unknown function', { ...base, tool_choice: { type: 'function', function: { name: 'nope' } } }, 'tool_choice', 'invalid_value'],
    ['tool_choice of an unknown value', { ...base, tool_choice: 'always' }, 'tool_choice', 'invalid_value'],
    ['a function name with a space', { ...base, tools: [{ type: 'function', function: { name: 'get weather' } }] }, 'tools[0].function.name', 'invalid_value'],
    ['the same function twice', { ...base, tools: [weather, weather] }, 'tools[1].function.name', 'invalid_value'],
    [
      'parameters with an invalid type',
      { ...base, tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'obj' } } }] },
      'tools[0].function.parameters',
      'invalid_value',
    ],
    [
      'parameters whose property is not a schema',
      { ...base, tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { a: 5 } } } }] },
      'tools[0].function.parameters',
      'invalid_value',
    ],
    [
      'parameters with required not a list',
      { ...base, tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', required: 'a' } } }] },
      'tools[0].function.parameters',
      'invalid_value',
    ],
    ['parameters an array', { ...base, tools: [{ type: 'function', function: { name: 'f', parameters: [] } }] }, 'tools[0].function.parameters', 'invalid_type'],
    [
      'a tool message answering no call',
      { ...base, messages: [...base.messages, { role: 'tool', tool_call_id: 'call_x', content: 'hi' }] },
      'messages[1].tool_call_id',
      'invalid_value',
    ],
    [
      'a tool message without tool_call_id',
      { ...base, messages: [...base.messages, { role: 'tool', content: 'hi' }] },
      'messages[1].tool_call_id',
      'missing_required_parameter',
    ],
    [
      'assistant arguments that are not JSON',
      {
        ...base,
        messages: [...base.messages, { role: 'assistant', tool_calls: [{ id: 'c', type: 'function', function: { name: 'get_time', arguments: '{oops' } }] }],
      },
      'messages[1].tool_calls[0].function.arguments',
      'invalid_value',
    ],
    ['a forced call with a response_format', { ...base, tool_choice: 'required', response_format: { type: 'json_object' } }, 'response_format', 'invalid_value'],
    ['the deprecated functions', { ...base, functions: [{ name: 'f' }] }, 'functions', 'unsupported_parameter'],
  ])('%s is a 400 naming %s', (_name, body, param, code) => {
    const err = rejection(body);
    expect(err.status).toBe(400);
    expect({ param: err.param, code: err.code }).toEqual({ param, code });
  });
});

const CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": {"n": 2}}}\n</tool_call>';

function streamed(text: string, cuts: number[]): ToolEvent[] {
  const parser = new ToolCallParser();
  const events: ToolEvent[] = [];
  let at = 0;
  for (const cut of [...cuts, text.length]) {
    events.push(...parser.push(text.slice(at, cut)));
    at = cut;
  }
  return [...events, ...parser.flush()];
}

const withoutIds = (p: ReturnType<typeof collect>) => ({ ...p, calls: p.calls.map(({ id: _id, ...rest }) => rest) });

describe('reading tool calls back', () => {
  it.each([
    ['one call', CALL, null, [{ name: 'get_weather', arguments: '{"city": "Paris", "days": {"n": 2}}' }]],
    ['two calls', `${CALL}\n${CALL.replace('Paris', 'Rome')}`, null, 2],
    ['text then a call', `Let me check.\n${CALL}`, 'Let me check.\n', 1],
    ['plain text', 'It is sunny <b>today</b>.', 'It is sunny <b>today</b>.', 0],
    ['arguments first (read whole)', '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>', null, [{ name: 'f', arguments: '{"a":1}' }]],
    ['a block that is not a call stays text', '<tool_call>not json</tool_call> ok', '<tool_call>not json</tool_call> ok', 0],
    ['a block cut by max_tokens stays text', '<tool_call>\n{"na', '<tool_call>\n{"na', 0],
    ['a half tag at the end stays text', 'see <tool_ca', 'see <tool_ca', 0],
  ])('%s', (_name, text, content, calls) => {
    const whole = parseToolOutput(text);
    expect(whole.content).toBe(content);
    if (typeof calls === 'number') expect(whole.calls).toHaveLength(calls);
    else expect(withoutIds(whole).calls).toEqual(calls);
    // Every split into two and three pieces gives the same answer, and the first call's name comes before its arguments.
    for (let i = 0; i <= text.length; i++) {
      expect(withoutIds(collect(streamed(text, [i])))).toEqual(withoutIds(whole));
      const j = Math.min(text.length, i + 7);
      const events = streamed(text, [i, j]);
      expect(withoutIds(collect(events))).toEqual(withoutIds(whole));
      for (const e of events) if (e.kind === 'text') expect(e.text).not.toMatch(/<tool_call>\n\{"name"/);
    }
  });

  it('streams a call as it is written: the name first, then the arguments in pieces', () => {
    const parser = new ToolCallParser();
    const first = parser.push('<tool_call>\n{"name": "get_weather", "arguments": {"ci');
    expect(first).toEqual([
      { kind: 'call', index: 0, id: expect.stringMatching(/^call_/), name: 'get_weather' },
      { kind: 'arguments', index: 0, text: '{"ci' },
    ]);
    expect(parser.push('ty": "Paris"}')).toEqual([{ kind: 'arguments', index: 0, text: 'ty": "Paris"' }]);
    expect(parser.push('}\n</tool_call>')).toEqual([{ kind: 'arguments', index: 0, text: '}' }]);
    expect(parser.flush()).toEqual([]);
    expect(parser.callCount).toBe(1);
  });
});
