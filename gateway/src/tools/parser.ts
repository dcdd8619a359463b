/**
 * Reads tool calls back out of a model's text (the format of tools/prompt.ts), as it streams.
 *
 * One parser serves both shapes: a stream feeds it each delta and renders its events as they come; a whole answer is
 * fed at once (`parseToolOutput`). So the streamed fragments always reassemble to the non-stream answer.
 *
 * Text outside `<tool_call>` blocks is content. A possible beginning of `<tool_call>` at the end of the text so far is
 * held back, and so is whitespace after a call, so half a tag never leaks into `content`. Inside a block that starts
 * `{"name": "<fn>", "arguments": {` the call is announced at once (id, type, name) and its arguments stream as the model
 * writes them, the final `}` of the call object (and anything after the last `}`) held back until the block closes.
 * Any other block is read whole when it closes; one that is not a call (not JSON, no name) is content, unchanged. A
 * block still open when the answer ends (max_tokens) is content too, unless its arguments were already streaming.
 *
 * Call ids are derived, not random (`toolCallId`): a resumed stream renders the same events again and must give the
 * same ids the client already has (streaming/event-ids.ts).
 */
import { createHash } from 'node:crypto';

const OPEN = '<tool_call>';
const CLOSE = '</tool_call>';
const CALL_HEAD = /^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)/;

export type ToolEvent =
  | { kind: 'text'; text: string }
  | { kind: 'call'; index: number; id: string; name: string }
  | { kind: 'arguments'; index: number; text: string };

/** Names the calls of one choice: its k-th call's id. */
export type CallIds = (call: number) => string;

/** `call_` + 16 characters of SHA-256 over (completion id, choice, call): unique per completion, the same every time. */
export function toolCallId(completionId: string, choice: number, call: number): string {
  return `call_${createHash('sha256').update(`${completionId}:${choice}:${call}`).digest('base64url').slice(0, 16)}`;
}

/** Ids for a parser used outside a completion (tests). */
export const sequentialCallIds: CallIds = (call) => `call_${call}`;

/** The longest suffix of `s` that is a proper prefix of `tag`. */
function partialTag(s: string, tag: string): number {
  for (let n = Math.min(tag.length - 1, s.length); n > 0; n--) if (s.endsWith(tag.slice(0, n))) return n;
  return 0;
}

export class ToolCallParser {
  private mode: 'text' | 'block' | 'arguments' = 'text';
  private buf = '';
  /** Whitespace after a call, sent only if more text follows. */
  private gap = '';
  private calls = 0;

  constructor(private readonly callId: CallIds = sequentialCallIds) {}

  get callCount(): number {
    return this.calls;
  }

  push(text: string): ToolEvent[] {
    const out: ToolEvent[] = [];
    this.buf += text;
    for (;;) {
      if (this.mode === 'text') {
        const at = this.buf.indexOf(OPEN);
        if (at < 0) {
          const keep = partialTag(this.buf, OPEN);
          this.text(out, this.buf.slice(0, this.buf.length - keep));
          this.buf = this.buf.slice(this.buf.length - keep);
          return out;
        }
        this.text(out, this.buf.slice(0, at));
        this.buf = this.buf.slice(at + OPEN.length);
        this.mode = 'block';
      } else if (this.mode === 'block') {
        const head = CALL_HEAD.exec(this.buf);
        if (head) {
          out.push({ kind: 'call', index: this.calls, id: this.callId(this.calls), name: JSON.parse(head[1]) as string });
          this.buf = this.buf.slice(head[0].length);
          this.mode = 'arguments';
          continue;
        }
        const end = this.buf.indexOf(CLOSE);
        if (end < 0) return out;
        this.wholeBlock(out, this.buf.slice(0, end));
        this.buf = this.buf.slice(end + CLOSE.length);
        this.mode = 'text';
      } else {
        const end = this.buf.indexOf(CLOSE);
        const upto = end < 0 ? this.buf.length : end;
        const lastBrace = this.buf.lastIndexOf('}', upto - 1);
        if (end < 0) {
          // Up to the last '}', which may close the call object: held until more arguments or the close tag come.
          const cut = lastBrace < 0 ? this.buf.length : lastBrace;
          this.args(out, this.buf.slice(0, cut));
          this.buf = this.buf.slice(cut);
          return out;
        }
        this.args(out, this.buf.slice(0, lastBrace < 0 ? upto : lastBrace).trimEnd());
        this.endCall();
        this.buf = this.buf.slice(end + CLOSE.length);
      }
    }
  }

  /** The answer ended: whatever is held back is released as what it would have been. */
  flush(): ToolEvent[] {
    const out: ToolEvent[] = [];
    if (this.mode === 'text') this.text(out, this.buf);
    else if (this.mode === 'block') this.text(out, OPEN + this.buf);
    else this.args(out, this.buf);
    this.buf = '';
    this.mode = 'text';
    if (this.calls === 0 && this.gap) out.push({ kind: 'text', text: this.gap });
    this.gap = '';
    return out;
  }

  private text(out: ToolEvent[], text: string): void {
    if (text.length === 0) return;
    if (this.calls > 0 && /^\s*$/.test(text)) {
      this.gap += text;
      return;
    }
    out.push({ kind: 'text', text: this.gap + text });
    this.gap = '';
  }

  private args(out: ToolEvent[], text: string): void {
    if (text.length > 0) out.push({ kind: 'arguments', index: this.calls, text });
  }

  private endCall(): void {
    this.calls += 1;
    this.mode = 'text';
  }

  private wholeBlock(out: ToolEvent[], body: string): void {
    let value: unknown = null;
    try {
      value = JSON.parse(body);
    } catch {
      value = null;
    }
    const call = typeof value === 'object' && value !== null ? (value as { name?: unknown; arguments?: unknown }) : null;
    if (call === null || typeof call.name !== 'string' || call.arguments === undefined) {
      this.text(out, OPEN + body + CLOSE);
      return;
    }
    const args = typeof call.arguments === 'string' ? call.arguments : JSON.stringify(call.arguments);
    out.push({ kind: 'call', index: this.calls, id: this.callId(this.calls), name: call.name });
    this.args(out, args);
    this.endCall();
  }
}

export interface ParsedToolOutput {
  content: string | null;
  calls: { id: string; name: string; arguments: string }[];
}

/** A whole answer, read by the same parser a stream uses. */
export function parseToolOutput(text: string, callId: CallIds = sequentialCallIds): ParsedToolOutput {
  const parser = new ToolCallParser(callId);
  const events = [...parser.push(text), ...parser.flush()];
  return collect(events);
}

export function collect(events: ToolEvent[]): ParsedToolOutput {
  let content = '';
  const calls: ParsedToolOutput['calls'] = [];
  for (const e of events) {
    if (e.kind === 'text') content += e.text;
    else if (e.kind === 'call') calls.push({ id: e.id, name: e.name, arguments: '' });
    else calls[e.index].arguments += e.text;
  }
  return { content: calls.length > 0 && content.trim() === '' ? null : content, calls };
}
