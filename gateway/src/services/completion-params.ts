/**
 * Converts a legacy completions request (POST /v1/completions) into job parameters, once, with the chat table's
 * sampling rows (services/chat-params.ts SAMPLING_RULES) plus the rows only completions have. COMPLETION_PARAM_TABLE
 * is the one place that says which completions fields we serve; ranges are the zod schema's (protocol/completions.ts).
 */
import { ApiError } from '../errors';
import { type CompletionRequest, completionRequestSchema } from '../protocol/completions';
import type { JobParams } from '../protocol/job';
import { applyParamTable, checkStreamOptions, type ParamRule, SAMPLING_RULES } from './chat-params';
import { parseOrThrow } from './validation';

type Req = CompletionRequest;

/** OpenAI's default max_tokens for completions (chat's is DEFAULT_MAX_TOKENS, from the configuration). */
export const COMPLETION_DEFAULT_MAX_TOKENS = 16;
/**
 * Prompts in one request at most. Each prompt of a list is admitted and run as a request of its own (rate limits,
 * concurrency slot, cache entry, job), so a list costs what as many single requests cost.
 */
export const MAX_PROMPTS = 16;

export const COMPLETION_PARAM_TABLE: readonly ParamRule<Req>[] = [
  ...SAMPLING_RULES,
  // The legacy integer k: the sampled token's logprob plus its k most likely alternatives (0: the sampled one only).
  { field: 'logprobs', supported: true, apply: (v: number, p) => void ((p.logprobs = true), (p.top_logprobs = v)) },
  // echo changes what is rendered (the prompt before each choice's text), not what is generated: nothing to apply.
  { field: 'echo', supported: true },
  {
    field: 'suffix',
    supported: false,
    used: (v) => v !== '',
    refusal: { code: 'unsupported_value', message: "'suffix' is not supported: this server does not insert text (leave it out, null or empty)." },
  },
  {
    field: 'best_of',
    supported: false,
    used: (v, req) => v !== (req.n ?? 1),
    refusal: { code: 'unsupported_value', message: "'best_of' must equal 'n' (or be left out): this server does not generate extra completions to choose from." },
  },
];

/** A validated completions request: its prompts, the job's params (without max_tokens) and what rendering needs. */
export interface ParsedCompletion {
  req: Req;
  prompts: string[];
  params: Omit<JobParams, 'max_tokens'>;
  /** The legacy logprobs' k, or null when none were asked for. */
  logprobs: number | null;
  echo: boolean;
}

export function parseCompletion(body: unknown): ParsedCompletion {
  const req = parseOrThrow(completionRequestSchema, body);
  const prompts = promptList(req.prompt);
  const params = applyParamTable(COMPLETION_PARAM_TABLE, req);
  checkStreamOptions(req);
  // Echoed with logprobs, as OpenAI's legacy API does it: the prompt's tokens are scored too (their entries first).
  if (req.echo && req.logprobs != null) params.prompt_logprobs = req.logprobs;
  return { req, prompts, params, logprobs: req.logprobs ?? null, echo: req.echo === true };
}

function promptList(prompt: Req['prompt']): string[] {
  const list: unknown[] = typeof prompt === 'string' ? [prompt] : prompt;
  if (list.length === 0) throw new ApiError('invalid_value', "Invalid 'prompt': expected a string or a non-empty list of strings.", { param: 'prompt' });
  if (list.some((p) => typeof p !== 'string')) {
    throw new ApiError('unsupported_value', "Token-id prompts are not supported: send 'prompt' as text (a string or a list of strings).", {
      param: 'prompt',
    });
  }
  if (list.length > MAX_PROMPTS) {
    throw new ApiError('invalid_value', `Invalid 'prompt': at most ${MAX_PROMPTS} prompts per request (got ${list.length}).`, { param: 'prompt' });
  }
  if (list.some((p) => p === '')) throw new ApiError('invalid_value', "Invalid 'prompt': a prompt must not be empty.", { param: 'prompt' });
  return list as string[];
}
