/**
 * Tools in the prompt: OpenAI's `tools`, assistant `tool_calls` and `tool` messages written as plain chat turns in one
 * documented format, the one Qwen2.5's own chat template uses (Hermes style):
 *   - the tool list goes at the end of the system message (one is added when there is none):
 *       # Tools … <tools>\n{"type": "function", "function": {…}}\n</tools> … <tool_call>…</tool_call>
 *   - an assistant's calls follow its text as `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` blocks;
 *   - consecutive tool results become one user turn of `<tool_response>\n…\n</tool_response>` blocks.
 * The worker then renders plain system/user/assistant messages with the model's template, so every model gets the
 * same tool format, and the model's answer is parsed back in that format (tools/parser.ts). For Qwen2.5 this is, text
 * for text, what its template renders with `tools=` (except its default system line when the request has none).
 */
import { ApiError } from '../errors';
import type { ChatMessageParam, ToolParam } from '../protocol/chat';

const TOOLS_HEADER =
  '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' +
  'You are provided with function signatures within <tools></tools> XML tags:\n<tools>';
const TOOLS_FOOTER =
  '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' +
  '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>';

/** The system text that lists the tools. */
export function toolsSystemText(tools: readonly ToolParam[]): string {
  const lines = tools.map((t) => {
    const { name, description, parameters } = t.function;
    const fn: Record<string, unknown> = { name };
    if (description != null) fn.description = description;
    fn.parameters = parameters ?? { type: 'object', properties: {} };
    return `\n${JSON.stringify({ type: 'function', function: fn })}`;
  });
  return TOOLS_HEADER + lines.join('') + TOOLS_FOOTER;
}

/** One call as the model writes it (and as the history gives it back to the model). */
export function toolCallText(name: string, args: string): string {
  return `<tool_call>\n{"name": ${JSON.stringify(name)}, "arguments": ${args}}\n</tool_call>`;
}

export function toolResponseText(content: string): string {
  return `<tool_response>\n${content}\n</tool_response>`;
}

/**
 * Checks an assistant message's tool calls and returns them as text; `param` is the message's path. Arguments must be
 * a JSON object (as text, the way OpenAI returns them): anything else would teach the model a broken call.
 */
export function assistantCallsText(calls: NonNullable<ChatMessageParam['tool_calls']>, param: string): string {
  return calls
    .map((c, j) => {
      const where = `${param}.tool_calls[${j}].function.arguments`;
      let parsed: unknown;
      try {
        parsed = JSON.parse(c.function.arguments);
      } catch {
        throw new ApiError('invalid_value', `Invalid '${where}': the arguments are not valid JSON.`, { param: where });
      }
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        throw new ApiError('invalid_value', `Invalid '${where}': the arguments must be a JSON object.`, { param: where });
      }
      return toolCallText(c.function.name, JSON.stringify(parsed));
    })
    .join('\n');
}
