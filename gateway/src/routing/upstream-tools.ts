/**
 * Tool calls of an upstream's answer (routing/upstream.ts), carried through as the upstream made them: an upstream
 * such as vLLM parses its model's calls itself, so nothing here reads text for calls (gateway/src/tools/ is for our
 * own workers' Hermes format). A stream's `delta.tool_calls` fragments are passed on one by one (index, id, type,
 * function.name, then pieces of function.arguments) and also joined into whole calls, which the result carries
 * (`tool_calls` on its loose result choice) for the non-streamed answer, the finish reason, the output filter and the
 * cache (which never stores them: services/upstream-prepare.ts).
 */
import type { ToolCall, ToolCallDelta } from '../protocol/chat';
import { isObject } from './upstream-io';

/** A result choice's tool calls (the upstream's, whole), when it made any: a field of the loose JobResult choice. */
export function toolCallsOf(choice: object): ToolCall[] | null {
  const calls = (choice as { tool_calls?: unknown }).tool_calls;
  return Array.isArray(calls) && calls.length > 0 ? (calls as ToolCall[]) : null;
}

/**
 * One `delta.tool_calls` entry in our chunk's shape, or null when it is not an object. An entry without `index`
 * (some OpenAI-compatible servers leave it out) takes its place in the chunk's list, `at`.
 */
export function toolCallDelta(raw: unknown, at: number): ToolCallDelta | null {
  if (!isObject(raw)) return null;
  const index = typeof raw.index === 'number' && Number.isInteger(raw.index) && raw.index >= 0 ? raw.index : at;
  const fn = isObject(raw.function) ? raw.function : {};
  // Keys in OpenAI's order (index, id, type, function), each only when the upstream sent it.
  return {
    index,
    ...(typeof raw.id === 'string' ? { id: raw.id } : {}),
    ...(raw.type === 'function' || typeof raw.id === 'string' ? { type: 'function' as const } : {}),
    function: {
      ...(typeof fn.name === 'string' ? { name: fn.name } : {}),
      ...(typeof fn.arguments === 'string' ? { arguments: fn.arguments } : {}),
    },
  };
}

/** The calls of one choice, joined from its fragments in call-index order. */
export class ToolCallJoiner {
  private readonly calls = new Map<number, ToolCall>();

  add(d: ToolCallDelta): void {
    let call = this.calls.get(d.index);
    if (!call) this.calls.set(d.index, (call = { id: '', type: 'function', function: { name: '', arguments: '' } }));
    if (d.id) call.id = d.id;
    if (d.function.name) call.function.name += d.function.name;
    if (d.function.arguments) call.function.arguments += d.function.arguments;
  }

  joined(): ToolCall[] {
    return [...this.calls.entries()].sort(([a], [b]) => a - b).map(([, c]) => c);
  }
}

/** A non-streamed message's `tool_calls`, kept as the upstream gave them (ids included); malformed entries dropped. */
export function messageToolCalls(raw: unknown): ToolCall[] {
  if (!Array.isArray(raw)) return [];
  const calls: ToolCall[] = [];
  for (const c of raw) {
    if (!isObject(c) || !isObject(c.function) || typeof c.function.name !== 'string') continue;
    const args = c.function.arguments;
    calls.push({
      id: typeof c.id === 'string' ? c.id : '',
      type: 'function',
      function: { name: c.function.name, arguments: typeof args === 'string' ? args : JSON.stringify(args ?? {}) },
    });
  }
  return calls;
}
