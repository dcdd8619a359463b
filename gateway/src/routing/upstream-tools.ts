/**
 * Tool calls of an upstream's answer (routing/upstream.ts), carried through as the upstream made them: an upstream
 * such as vLLM parses its model's calls itself, so nothing here reads text for calls (gateway/src/tools/ is for our
 * own workers' Hermes format). A stream's `delta.tool_calls` fragments are passed on one by one (index, id, type,
 * function.name, then pieces of function.arguments) and also joined into whole calls, which the result carries
 * (ResultToolCall on its choice) for the non-streamed answer, the finish reason and the logs.
 */
import type { ToolCall, ToolCallDelta } from '../protocol/chat';

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/** A result choice's tool calls (the upstream's, whole), when it made any: a field of the loose JobResult choice. */
export function toolCallsOf(choice: object): ToolCall[] | null {
  const calls = (choice as { tool_calls?: unknown }).tool_calls;
  return Array.isArray(calls) && calls.length > 0 ? (calls as ToolCall[]) : null;
}

/** One `delta.tool_calls` entry in our chunk's shape, or null when it is not one (no index). */
export function toolCallDelta(raw: unknown): ToolCallDelta | null {
  if (!isObject(raw) || typeof raw.index !== 'number' || !Number.isInteger(raw.index)) return null;
  const fn = isObject(raw.function) ? raw.function : {};
  const delta: ToolCallDelta = { index: raw.index, function: {} };
  if (typeof raw.id === 'string') delta.id = raw.id;
  if (raw.type === 'function' || typeof raw.id === 'string') delta.type = 'function';
  if (typeof fn.name === 'string') delta.function.name = fn.name;
  if (typeof fn.arguments === 'string') delta.function.arguments = fn.arguments;
  return delta;
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
