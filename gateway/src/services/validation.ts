/**
 * zod issues → one ApiError in OpenAI's words, with `param` naming the field ("messages[0].content"), because the
 * openai SDKs surface `param` to users and our e2e tests assert on it.
 */
import type { z } from 'zod';
import { ApiError } from '../errors';

type Issue = z.core.$ZodIssue;
type PathKey = PropertyKey;

/** ["messages", 0, "content"] → "messages[0].content" (OpenAI's spelling). */
export function formatParam(path: readonly PathKey[]): string | null {
  let out = '';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else out += out ? `.${String(key)}` : String(key);
  }
  return out || null;
}

function valueAt(root: unknown, path: readonly PathKey[]): unknown {
  let cur: unknown = root;
  for (const key of path) {
    if (cur === null || typeof cur !== 'object') return undefined;
    cur = (cur as Record<PropertyKey, unknown>)[key as PropertyKey];
  }
  return cur;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'number') return Number.isInteger(value) ? 'an integer' : 'a decimal';
  if (typeof value === 'object') return 'an object';
  return `a ${typeof value}`;
}

const EXPECTED: Record<string, string> = {
  int: 'an integer',
  number: 'a number',
  string: 'a string',
  boolean: 'a boolean',
  array: 'an array',
  object: 'an object',
  record: 'an object',
};

/**
 * Unions report one list of issues per branch. The branch that got furthest into the value (the deepest path) is the
 * one the client meant, e.g. content given as an array whose part lacks `type`; a specific issue (not a mere type
 * mismatch) wins next. With neither, the union itself is reported.
 */
function unwrapUnion(issue: Issue): { issue: Issue; basePath: PathKey[] } {
  let basePath = [...issue.path];
  let cur = issue;
  while (cur.code === 'invalid_union') {
    const firsts = cur.errors.map((branch) => branch[0]).filter((i): i is Issue => i !== undefined);
    const deepest = firsts.reduce<Issue | null>((best, i) => (i.path.length > (best?.path.length ?? 0) ? i : best), null);
    const specific = deepest ?? cur.errors.flat().find((i) => i.code !== 'invalid_type');
    if (!specific) break;
    basePath = [...basePath, ...specific.path];
    cur = specific;
  }
  return { issue: cur, basePath };
}

export function zodErrorToApiError(error: z.ZodError, input: unknown): ApiError {
  const { issue, basePath } = unwrapUnion(error.issues[0]);
  const path = issue === error.issues[0] ? [...issue.path] : basePath;
  const param = formatParam(path);
  const value = valueAt(input, path);
  const name = param ?? 'body';

  if (param === null && (input === null || typeof input !== 'object' || Array.isArray(input))) {
    return new ApiError('invalid_type', 'The request body must be a JSON object.', { param: null });
  }
  // A discriminated union whose tag is missing or unknown (response_format.type): OpenAI's "Invalid value" answer.
  const options = issue.code === 'invalid_union' ? (issue as { options?: unknown[] }).options : undefined;
  if (options && value !== undefined) {
    return new ApiError(
      'invalid_value',
      `Invalid value for '${name}': ${JSON.stringify(value)}. Supported values are: ${options.map((v) => JSON.stringify(v)).join(', ')}.`,
      { param },
    );
  }
  switch (issue.code) {
    case 'invalid_type':
    case 'invalid_union': {
      if (value === undefined) {
        return new ApiError('missing_required_parameter', `Missing required parameter: '${name}'.`, { param });
      }
      const expectedOf = (i: Issue) => (i.code === 'invalid_type' ? (EXPECTED[i.expected] ?? i.expected) : null);
      const expected =
        issue.code === 'invalid_type'
          ? expectedOf(issue)
          : [...new Set(issue.errors.map((b) => (b[0] ? expectedOf(b[0]) : null)).filter(Boolean))].join(' or ') || 'another type';
      return new ApiError(
        'invalid_type',
        `Invalid type for '${name}': expected ${expected}, but got ${describe(value)} instead.`,
        { param },
      );
    }
    case 'too_small':
    case 'too_big': {
      const isArray = issue.origin === 'array';
      const bound = issue.code === 'too_small' ? issue.minimum : issue.maximum;
      const op = issue.code === 'too_small' ? (issue.inclusive ? '>=' : '>') : issue.inclusive ? '<=' : '<';
      const side = issue.code === 'too_small' ? 'minimum' : 'maximum';
      const what = isArray
        ? `Expected an array with ${side} length ${String(bound)}, but got an array with length ${Array.isArray(value) ? value.length : '?'} instead.`
        : issue.origin === 'string'
          ? `Expected a string with ${side} length ${String(bound)}, but got a string with length ${typeof value === 'string' ? value.length : '?'} instead.`
          : `Expected a value ${op} ${String(bound)}, but got ${JSON.stringify(value)} instead.`;
      return new ApiError('invalid_value', `Invalid '${name}': ${what}`, { param });
    }
    case 'invalid_value':
      return new ApiError(
        'invalid_value',
        `Invalid value for '${name}': ${JSON.stringify(value)}. Supported values are: ${issue.values.map((v) => JSON.stringify(v)).join(', ')}.`,
        { param },
      );
    default:
      return new ApiError('invalid_value', `Invalid '${name}': ${issue.message}.`, { param });
  }
}

/**
 * The path of the first string (value or key) holding a lone UTF-16 surrogate ("\ud800" is valid JSON but not text):
 * it cannot be encoded as UTF-8, so the worker's tokenizer would fail on it. Null when every string is text.
 */
export function loneSurrogateAt(root: unknown): PathKey[] | null {
  // An explicit stack, not recursion: a body nested thousands deep (valid JSON, a few KB) must not overflow the call
  // stack (a 500).
  // Each entry links to its parent, and the path is spelled only for the one string found: copying a path per level
  // would make a deep body cost depth² (seconds of event loop for 40 KB of brackets).
  type Node = { value: unknown; key: PathKey | null; parent: Node | null };
  const pathOf = (n: Node | null, last?: PathKey): PathKey[] => {
    const path: PathKey[] = last === undefined ? [] : [last];
    for (let at = n; at && at.key !== null; at = at.parent) path.push(at.key);
    return path.reverse();
  };
  const stack: Node[] = [{ value: root, key: null, parent: null }];
  while (stack.length > 0) {
    const node = stack.pop()!;
    const value = node.value;
    if (typeof value === 'string') {
      if (LONE_SURROGATE.test(value)) return pathOf(node);
    } else if (Array.isArray(value)) {
      for (let i = value.length - 1; i >= 0; i--) stack.push({ value: value[i], key: i, parent: node });
    } else if (value !== null && typeof value === 'object') {
      const entries = Object.entries(value);
      for (const [k] of entries) if (LONE_SURROGATE.test(k)) return pathOf(node, k);
      for (let i = entries.length - 1; i >= 0; i--) stack.push({ value: entries[i][1], key: entries[i][0], parent: node });
    }
  }
  return null;
}

/** A surrogate code point not part of a pair (with the u flag a well-formed pair is one code point, not Cs). */
const LONE_SURROGATE = /\p{Cs}/u;

/** Parses `input` with `schema` or throws the ApiError for its first issue. */
export function parseOrThrow<S extends z.ZodType>(schema: S, input: unknown): z.infer<S> {
  const parsed = schema.safeParse(input);
  if (!parsed.success) throw zodErrorToApiError(parsed.error, input);
  const bad = loneSurrogateAt(parsed.data);
  if (bad) {
    const param = formatParam(bad);
    throw new ApiError('invalid_value', `Invalid '${param ?? 'body'}': the string contains a lone UTF-16 surrogate, which is not valid Unicode text.`, { param });
  }
  return parsed.data;
}
