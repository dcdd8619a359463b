/**
 * tool_choice "required" and a named function are enforced, not asked for: the worker constrains the answer to
 * `<tool_call>` blocks (the format of tools/prompt.ts) whose JSON names one of the allowed functions and whose
 * arguments validate against that function's `parameters`. The grammar is Lark in llguidance's dialect, where
 * `%json {schema}` stands for any JSON text valid against the schema; the worker compiles it (worker-py grammar.py).
 *
 * "auto" is not constrained: the model answers in text or calls a tool, and tools/parser.ts reads either.
 */
import type { ToolParam } from '../protocol/chat';

/**
 * At most this many calls in one answer when parallel calls are allowed. A small model tends to repeat a call instead
 * of ending its turn; the bound keeps that from running to max_tokens.
 */
export const MAX_PARALLEL_CALLS = 4;

// The JSON of a call is written the way the prompt shows it: {"name": "f", "arguments": {...}}, no free whitespace.
const JSON_STYLE = { whitespace_flexible: false, key_separator: ': ', item_separator: ', ' };

export function argumentsSchema(tool: ToolParam): Record<string, unknown> {
  return tool.function.parameters ?? { type: 'object', properties: {}, additionalProperties: false };
}

function callSchema(tool: ToolParam): string {
  return JSON.stringify({
    type: 'object',
    properties: { name: { const: tool.function.name }, arguments: argumentsSchema(tool) },
    required: ['name', 'arguments'],
    additionalProperties: false,
    'x-guidance': JSON_STYLE,
  });
}

/** The grammar of an answer that calls one of `tools` (one call, or 1..MAX_PARALLEL_CALLS when `parallel`). */
export function toolCallGrammar(tools: readonly ToolParam[], parallel: boolean): string {
  const rules = tools.map((t, i) => `fn_${i}: %json ${callSchema(t)}`);
  const anyCall = tools.map((_, i) => `fn_${i}`).join(' | ');
  const more = parallel ? ` ("\\n" call){0,${MAX_PARALLEL_CALLS - 1}}` : '';
  return [`start: call${more}`, `call: "<tool_call>\\n" (${anyCall}) "\\n</tool_call>"`, ...rules].join('\n') + '\n';
}
