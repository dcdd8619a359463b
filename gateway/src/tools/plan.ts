/**
 * What a request's `tools`, `tool_choice` and `parallel_tool_calls` ask for, checked once: which functions go into the
 * prompt, whether the answer is parsed for calls, and the grammar that enforces "required" or a named function.
 */
import { ApiError } from '../errors';
import type { ChatCompletionRequest, ToolParam } from '../protocol/chat';
import type { JobResponseFormat } from '../protocol/job';
import { toolCallGrammar } from './grammar';

export interface ToolPlan {
  /** The functions the model is shown. */
  tools: ToolParam[];
  /** "auto": text or calls, parsed; otherwise calls are enforced by `grammar`. */
  choice: 'auto' | 'required' | { name: string };
  parallel: boolean;
  grammar: JobResponseFormat | null;
}

const JSON_TYPES = new Set(['object', 'array', 'string', 'number', 'integer', 'boolean', 'null']);

/**
 * The shape errors a JSON schema can have that the grammar compiler would only meet later (or, for "auto", never):
 * a wrong `type`, `properties` that are not schemas, `required` that is not a list of names. Unsupported keywords
 * are the worker's to name (400 with param "tools") when it compiles a forced call.
 */
function schemaProblem(schema: unknown, depth = 0): string | null {
  if (depth > 64) return 'is nested too deeply';
  if (typeof schema === 'boolean') return null;
  if (typeof schema !== 'object' || schema === null || Array.isArray(schema)) return 'must be a JSON schema object';
  const s = schema as Record<string, unknown>;
  if (s.type !== undefined) {
    const types = Array.isArray(s.type) ? s.type : [s.type];
    const bad = types.find((t) => typeof t !== 'string' || !JSON_TYPES.has(t));
    if (bad !== undefined || types.length === 0) return `has an invalid type ${JSON.stringify(s.type)}`;
  }
  if (s.required !== undefined && !(Array.isArray(s.required) && s.required.every((r) => typeof r === 'string'))) {
    return "has a 'required' that is not a list of property names";
  }
  for (const key of ['properties', '$defs', 'definitions'] as const) {
    if (s[key] === undefined) continue;
    if (typeof s[key] !== 'object' || s[key] === null || Array.isArray(s[key])) return `has '${key}' that is not an object`;
    for (const [name, sub] of Object.entries(s[key] as Record<string, unknown>)) {
      const p = schemaProblem(sub, depth + 1);
      if (p) return `${key}.${name} ${p}`;
    }
  }
  for (const key of ['items', 'additionalProperties', 'not'] as const) {
    if (s[key] !== undefined && typeof s[key] !== 'boolean') {
      const p = schemaProblem(s[key], depth + 1);
      if (p) return `${key} ${p}`;
    }
  }
  for (const key of ['anyOf', 'oneOf', 'allOf'] as const) {
    if (s[key] === undefined) continue;
    if (!Array.isArray(s[key])) return `has '${key}' that is not a list`;
    for (const [i, sub] of (s[key] as unknown[]).entries()) {
      const p = schemaProblem(sub, depth + 1);
      if (p) return `${key}[${i}] ${p}`;
    }
  }
  return null;
}

/** Null when the request uses no tools (none given, or tool_choice "none"). Throws the 400s of bad tool fields. */
export function planTools(req: ChatCompletionRequest): ToolPlan | null {
  const tools = req.tools ?? [];
  const choice = req.tool_choice ?? (tools.length > 0 ? 'auto' : 'none');
  if (tools.length === 0) {
    if (choice !== 'none') {
      throw new ApiError('invalid_value', "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.", {
        param: 'tool_choice',
      });
    }
    return null;
  }
  const seen = new Set<string>();
  tools.forEach((t, i) => {
    if (seen.has(t.function.name)) {
      throw new ApiError('invalid_value', `Invalid 'tools': the function name '${t.function.name}' is used twice.`, {
        param: `tools[${i}].function.name`,
      });
    }
    seen.add(t.function.name);
    const problem = t.function.parameters == null ? null : schemaProblem(t.function.parameters);
    if (problem) {
      const param = `tools[${i}].function.parameters`;
      throw new ApiError('invalid_value', `Invalid '${param}': the schema ${problem}.`, { param });
    }
  });
  if (choice === 'none') return null;
  const parallel = req.parallel_tool_calls ?? true;
  if (choice === 'auto') return { tools, choice, parallel, grammar: null };
  let allowed = tools;
  let planned: ToolPlan['choice'] = 'required';
  if (typeof choice === 'object') {
    const fn = tools.find((t) => t.function.name === choice.function.name);
    if (!fn) {
      throw new ApiError('invalid_value', `Invalid value for 'tool_choice': no function named '${choice.function.name}' is in 'tools'.`, {
        param: 'tool_choice',
      });
    }
    allowed = [fn];
    planned = { name: fn.function.name };
  }
  // A named function is called once (as vLLM does); "required" may call several when parallel calls are allowed.
  const grammar = toolCallGrammar(allowed, parallel && planned === 'required');
  return { tools, choice: planned, parallel, grammar: { type: 'lark', grammar, param: 'tools' } };
}
