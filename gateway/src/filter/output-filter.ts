/**
 * Output filter: phrases of a block list (case-insensitive) and regular expressions are replaced in the model's text.
 * Streamed text is held back by the longest possible match (OUTPUT_FILTER_MAX_MATCH_CHARS, at least the longest
 * phrase), so a blocked phrase split across chunks is still caught: nothing is sent until no match that could still
 * grow can reach into it. The rest is released when the choice ends.
 */
import type { Config } from '../config';

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

export class OutputFilter {
  private readonly re: RegExp | null;
  /** Characters held back while streaming. */
  readonly holdback: number;

  constructor(
    blocklist: readonly string[],
    patterns: readonly string[],
    private readonly replacement: string,
    maxMatchChars: number,
  ) {
    const parts = [...blocklist.map(escape), ...patterns.map((p) => `(?:${p})`)];
    this.re = parts.length > 0 ? new RegExp(parts.join('|'), 'giu') : null;
    this.holdback = Math.max(maxMatchChars, ...blocklist.map((b) => b.length));
  }

  static fromConfig(c: Config): OutputFilter {
    return new OutputFilter(c.OUTPUT_FILTER_BLOCKLIST, c.OUTPUT_FILTER_PATTERNS, c.OUTPUT_FILTER_REPLACEMENT, c.OUTPUT_FILTER_MAX_MATCH_CHARS);
  }

  get active(): boolean {
    return this.re !== null;
  }

  /** Whole text at once (non-stream answers). */
  apply(text: string): string {
    return this.re ? text.replace(this.re, (m) => (m.length === 0 ? m : this.replacement)) : text;
  }

  /** A per-response streaming view: one buffer per choice index. */
  stream(): StreamFilter {
    return new StreamFilter(this);
  }
}

export class StreamFilter {
  private readonly pending = new Map<number, string>();

  constructor(private readonly filter: OutputFilter) {}

  /** Feeds text of one choice; returns what is now safe to send (possibly ''). */
  push(index: number, text: string): string {
    if (!this.filter.active) return text;
    const buf = this.filter.apply((this.pending.get(index) ?? '') + text);
    let cut = Math.max(0, buf.length - this.filter.holdback);
    // Never split a surrogate pair.
    if (cut > 0 && cut < buf.length && /[\uD800-\uDBFF]/.test(buf[cut - 1])) cut -= 1;
    this.pending.set(index, buf.slice(cut));
    return buf.slice(0, cut);
  }

  /** The choice ended: releases what was held back. */
  flush(index: number): string {
    const rest = this.pending.get(index) ?? '';
    this.pending.delete(index);
    return this.filter.apply(rest);
  }
}
