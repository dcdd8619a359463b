/**
 * Converts an OpenAI chat request into the worker's job parameters, once (vLLM's `to_sampling_params` idea).
 *
 * PARAM_TABLE is the one place that says which OpenAI chat fields we support. To enable a field: set `supported: true`
 * and give it an `apply`. Ranges are checked by the zod schema (protocol/chat.ts), with OpenAI's bounds. The sampling
 * rows (SAMPLING_RULES) are shared with the legacy completions' table (services/completion-params.ts).
 */
import { ApiError } from '../errors';
import type { ChatCompletionRequest, ChatMessageParam, ResponseFormat } from '../protocol/chat';
import { planTools, type ToolPlan } from '../tools/plan';
import { assistantCallsText, toolResponseText, toolsSystemText } from '../tools/prompt';
import type { JobMessage, JobParams } from '../protocol/job';

type Req = ChatCompletionRequest;

/** One row of a parameter table, over the request type `R` it reads. */
export interface ParamRule<R> {
  field: keyof R & string;
  supported: boolean;
  /** Whether the value asks for something; unset (null/undefined) never does. Default: any non-null value. */
  used?: (value: unknown, req: R) => boolean;
  /** Message when an unsupported field is used; `code` tells a value we refuse from a field we refuse. */
  refusal?: { code: 'unsupported_parameter' | 'unsupported_value'; message: string };
  /** Writes the field into the job's params (only called when the value is non-null). */
  apply?: (value: never, params: JobParams, req: R) => void;
}

/** The sampling fields that chat and the legacy completions share, with one meaning (and one schema) each. */
export type SamplingFields = Pick<
  Req,
  'temperature' | 'top_p' | 'seed' | 'stop' | 'n' | 'presence_penalty' | 'frequency_penalty' | 'logit_bias' | 'top_k' | 'min_p' | 'repetition_penalty' | 'ignore_eos'
>;

/** What a request that sets nothing gets (OpenAI's defaults); max_tokens is decided later from the context. */
export const DEFAULT_JOB_PARAMS: Readonly<Omit<JobParams, 'max_tokens'>> = Object.freeze({
  temperature: 1.0,
  top_p: 1.0,
  seed: null,
  stop: [],
  n: 1,
  presence_penalty: 0,
  frequency_penalty: 0,
  logit_bias: {},
  logprobs: false,
  top_logprobs: 0,
  top_k: 0,
  min_p: 0,
  repetition_penalty: 1.0,
  ignore_eos: false,
});

/**
 * A schema larger than this is refused before it reaches a worker: its grammar is compiled there, and no real
 * response schema comes near it (OpenAI's own limits: 5,000 properties, 10 levels, 120,000 characters of names).
 */
export const MAX_RESPONSE_SCHEMA_CHARS = 128 * 1024;

function applyResponseFormat(v: ResponseFormat, p: JobParams): void {
  if (v.type === 'text') return;
  if (v.type === 'json_object') {
    p.response_format = { type: 'json_object' };
    return;
  }
  // No schema: any JSON value, as vLLM does (OpenAI requires one in strict mode only).
  const schema = v.json_schema.schema ?? {};
  if (JSON.stringify(schema).length > MAX_RESPONSE_SCHEMA_CHARS) {
    throw new ApiError('invalid_value', `The JSON schema is longer than ${MAX_RESPONSE_SCHEMA_CHARS} characters.`, {
      param: 'response_format.json_schema.schema',
    });
  }
  p.response_format = { type: 'json_schema', schema };
}

/** The rows both tables start with (services/completion-params.ts reuses them). */
export const SAMPLING_RULES: readonly ParamRule<SamplingFields>[] = [
  { field: 'temperature', supported: true, apply: (v: number, p) => void (p.temperature = v) },
  {
    field: 'top_p',
    supported: true,
    // OpenAI accepts 0 (keep only the most likely token); the worker, like vLLM, wants (0, 1]. Same thing: greedy.
    apply: (v: number, p) => void (v === 0 ? ((p.temperature = 0), (p.top_p = 1)) : (p.top_p = v)),
  },
  { field: 'seed', supported: true, apply: (v: number, p) => void (p.seed = v) },
  {
    field: 'stop',
    supported: true,
    // Empty strings would stop at once; OpenAI ignores them, so do we.
    apply: (v: string | string[], p) => void (p.stop = (Array.isArray(v) ? v : [v]).filter((s) => s.length > 0)),
  },
  { field: 'n', supported: true, apply: (v: number, p) => void (p.n = v) },
  { field: 'presence_penalty', supported: true, apply: (v: number, p) => void (p.presence_penalty = v) },
  { field: 'frequency_penalty', supported: true, apply: (v: number, p) => void (p.frequency_penalty = v) },
  { field: 'logit_bias', supported: true, apply: (v: Record<string, number>, p) => void (p.logit_bias = { ...v }) },
  // vLLM extensions: -1 and 0 both mean "off" for top_k; the worker's convention is 0.
  { field: 'top_k', supported: true, apply: (v: number, p) => void (p.top_k = Math.max(0, v)) },
  { field: 'min_p', supported: true, apply: (v: number, p) => void (p.min_p = v) },
  { field: 'repetition_penalty', supported: true, apply: (v: number, p) => void (p.repetition_penalty = v) },
  { field: 'ignore_eos', supported: true, apply: (v: boolean, p) => void (p.ignore_eos = v) },
];

export const PARAM_TABLE: readonly ParamRule<Req>[] = [
  ...SAMPLING_RULES,
  { field: 'logprobs', supported: true, apply: (v: boolean, p) => void (p.logprobs = v) },
  { field: 'top_logprobs', supported: true, apply: (v: number, p) => void (p.top_logprobs = v) },
  { field: 'response_format', supported: true, apply: (v: ResponseFormat, p) => void applyResponseFormat(v, p) },

  // Read by tools/plan.ts (prompt, grammar and parsing of calls), which checks them; nothing to copy here.
  { field: 'tools', supported: true },
  { field: 'tool_choice', supported: true },
  { field: 'parallel_tool_calls', supported: true },

  // Defined by OpenAI, not served yet: using them is a 400 naming the field, never a silent ignore.
  {
    field: 'functions',
    supported: false,
    refusal: { code: 'unsupported_parameter', message: "The deprecated 'functions' parameter is not supported; use 'tools'." },
  },
  {
    field: 'function_call',
    supported: false,
    used: (v) => v !== 'none',
    refusal: { code: 'unsupported_value', message: "The deprecated 'function_call' parameter is not supported; use 'tool_choice'." },
  },
  { field: 'audio', supported: false },
  {
    field: 'modalities',
    supported: false,
    used: (v) => Array.isArray(v) && v.some((m) => m !== 'text'),
    refusal: { code: 'unsupported_value', message: "Only the 'text' modality is supported." },
  },
  { field: 'prediction', supported: false },
  { field: 'web_search_options', supported: false },
  { field: 'reasoning_effort', supported: false },
  { field: 'verbosity', supported: false },
];

/** Throws for the first unsupported field the request uses, then builds the job's params (without max_tokens). */
export function toJobParams(req: Req, tools: ToolPlan | null = null): Omit<JobParams, 'max_tokens'> {
  const params = applyParamTable(PARAM_TABLE, req);
  checkCrossField(req, params);
  if (tools?.grammar) {
    if (params.response_format) {
      // Both would constrain the same text: a call's JSON and the response's schema cannot both hold.
      throw new ApiError('invalid_value', "'response_format' cannot be combined with a tool_choice that forces a tool call.", {
        param: 'response_format',
      });
    }
    params.response_format = tools.grammar;
  }
  return params;
}

/**
 * A parsed chat request as its job needs it, in the one order the three depend on each other: the tools' plan (its
 * grammar goes into the params, its listing into the messages), the job's params (without max_tokens), the messages.
 */
export function toChatJob(req: Req): { tools: ToolPlan | null; params: Omit<JobParams, 'max_tokens'>; messages: JobMessage[] } {
  const tools = planTools(req);
  return { tools, params: toJobParams(req, tools), messages: normaliseMessages(req.messages, tools) };
}

/** Runs a parameter table over a request: the first unsupported field it uses throws (400 naming it). */
export function applyParamTable<R extends object>(table: readonly ParamRule<R>[], req: R): Omit<JobParams, 'max_tokens'> {
  const params: JobParams = { ...DEFAULT_JOB_PARAMS, stop: [], logit_bias: {}, max_tokens: 1 };
  for (const rule of table) {
    const value = req[rule.field];
    if (value === undefined || value === null) continue;
    if (!rule.supported) {
      if (rule.used && !rule.used(value, req)) continue;
      const refusal = rule.refusal ?? {
        code: 'unsupported_parameter' as const,
        message: `Unsupported parameter: '${rule.field}' is not supported by this server yet.`,
      };
      throw new ApiError(refusal.code, refusal.message, { param: rule.field });
    }
    rule.apply?.(value as never, params, req);
  }
  const { max_tokens: _unused, ...rest } = params;
  return rest;
}

function checkCrossField(req: Req, params: Omit<JobParams, 'max_tokens'>): void {
  requestedMaxTokens(req);
  if (req.top_logprobs != null && req.top_logprobs > 0 && !params.logprobs) {
    throw new ApiError('invalid_value', "'logprobs' must be set to true when 'top_logprobs' is used.", {
      param: 'top_logprobs',
    });
  }
  checkStreamOptions(req);
}

/** OpenAI refuses stream_options without stream (chat and completions alike). */
export function checkStreamOptions(req: { stream?: boolean | null; stream_options?: unknown }): void {
  if (req.stream_options != null && !req.stream) {
    throw new ApiError('invalid_value', "The 'stream_options' parameter is only allowed when 'stream' is enabled.", {
      param: 'stream_options',
    });
  }
}

/** max_tokens and max_completion_tokens mean the same; if both are sent they must agree. */
export function requestedMaxTokens(req: Req): number | null {
  const a = req.max_completion_tokens ?? null;
  const b = req.max_tokens ?? null;
  if (a !== null && b !== null && a !== b) {
    throw new ApiError('invalid_value', "'max_tokens' and 'max_completion_tokens' were both set to different values; set one.", {
      param: 'max_tokens',
    });
  }
  return a ?? b;
}

/**
 * Normalises messages for the worker (docs/PROTOCOL.md): roles system|user|assistant (developer → system), content a
 * string (text parts joined with "\n"). With tools (tools/prompt.ts): the tool list goes into the system message, an
 * assistant's tool_calls into its text, and each run of tool messages (which must answer a call made before them)
 * into one user turn.
 */
export function normaliseMessages(messages: ChatMessageParam[], tools: ToolPlan | null = null): JobMessage[] {
  const out: JobMessage[] = [];
  const callIds = new Set<string>();
  let inToolRun = false;
  messages.forEach((m, i) => {
    const param = `messages[${i}]`;
    let role: JobMessage['role'];
    switch (m.role) {
      case 'system':
      case 'user':
      case 'assistant':
        role = m.role;
        break;
      case 'developer':
        role = 'system';
        break;
      case 'tool': {
        const id = m.tool_call_id;
        if (id == null) {
          throw new ApiError('missing_required_parameter', `Missing required parameter: '${param}.tool_call_id'.`, {
            param: `${param}.tool_call_id`,
          });
        }
        if (!callIds.has(id)) {
          throw new ApiError('invalid_value', `Invalid '${param}.tool_call_id': no earlier assistant message made a tool call with id '${id}'.`, {
            param: `${param}.tool_call_id`,
          });
        }
        const text = toolResponseText(contentText(m.content, `${param}.content`, 'tool'));
        if (inToolRun) out[out.length - 1].content += `\n${text}`;
        else out.push({ role: 'user', content: text });
        inToolRun = true;
        return;
      }
      case 'function':
        throw new ApiError('unsupported_value', "Messages with role 'function' (deprecated) are not supported; use role 'tool'.", {
          param: `${param}.role`,
        });
      default:
        throw new ApiError(
          'invalid_value',
          `Invalid value: '${m.role}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'.`,
          { param: `${param}.role` },
        );
    }
    inToolRun = false;
    let content = contentText(m.content, `${param}.content`, role);
    if (m.tool_calls != null && m.tool_calls.length > 0) {
      if (role !== 'assistant') {
        throw new ApiError('invalid_value', `Only assistant messages may have 'tool_calls'.`, { param: `${param}.tool_calls` });
      }
      for (const c of m.tool_calls) callIds.add(c.id);
      const calls = assistantCallsText(m.tool_calls, param);
      content = content ? `${content}\n${calls}` : calls;
    }
    out.push({ role, content });
  });
  if (tools) {
    const listing = toolsSystemText(tools.tools);
    if (out[0]?.role === 'system') out[0] = { role: 'system', content: `${out[0].content}\n\n${listing}` };
    else out.unshift({ role: 'system', content: listing });
  }
  return out;
}

function contentText(content: ChatMessageParam['content'], param: string, role: string): string {
  if (content == null) {
    if (role === 'assistant') return '';
    throw new ApiError('missing_required_parameter', `Missing required parameter: '${param}'.`, { param });
  }
  if (typeof content === 'string') return content;
  const texts: string[] = [];
  content.forEach((part, j) => {
    const p = part as { type: string; text?: unknown; refusal?: unknown };
    if (p.type === 'text' && typeof p.text === 'string') texts.push(p.text);
    else if (p.type === 'refusal' && role === 'assistant' && typeof p.refusal === 'string') texts.push(p.refusal);
    else if (p.type === 'text') {
      throw new ApiError('invalid_type', `Invalid type for '${param}[${j}].text': expected a string.`, {
        param: `${param}[${j}].text`,
      });
    } else {
      throw new ApiError('unsupported_value', `Content parts of type '${p.type}' are not supported; only 'text' is.`, {
        param: `${param}[${j}].type`,
      });
    }
  });
  return texts.join('\n');
}
