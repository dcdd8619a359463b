/**
 * Structured JSON logs, one object per line on stdout. Small on purpose: winston is planned (issue 6) and only this
 * file should change then. Callers pass fields (requestId, jobId, model, keyId …), never keys or, unless LOG_PROMPTS,
 * prompt/output text.
 */
export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type LogFields = Record<string, unknown>;

const RANK: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

export interface Logger {
  error(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  debug(msg: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
  isLevelEnabled(level: LogLevel): boolean;
}

export type LogSink = (line: string) => void;

const stdoutSink: LogSink = (line) => {
  process.stdout.write(line + '\n');
};

/** Errors do not survive JSON.stringify; keep what helps an operator. */
function serialise(value: unknown): unknown {
  if (value instanceof Error) {
    const out: LogFields = { name: value.name, message: value.message };
    const code = (value as { code?: unknown }).code;
    if (code !== undefined) out.code = code;
    if (value.stack) out.stack = value.stack.split('\n').slice(0, 8).join('\n');
    return out;
  }
  return value;
}

class JsonLogger implements Logger {
  constructor(
    private readonly level: LogLevel,
    private readonly base: LogFields,
    private readonly sink: LogSink,
  ) {}

  isLevelEnabled(level: LogLevel): boolean {
    return RANK[level] <= RANK[this.level];
  }

  private write(level: LogLevel, msg: string, fields?: LogFields): void {
    if (!this.isLevelEnabled(level)) return;
    const entry: LogFields = { ts: new Date().toISOString(), level, msg, ...this.base };
    if (fields) for (const [k, v] of Object.entries(fields)) if (v !== undefined) entry[k] = serialise(v);
    let line: string;
    try {
      line = JSON.stringify(entry);
    } catch {
      line = JSON.stringify({ ts: entry.ts, level, msg, note: 'unserialisable log fields' });
    }
    this.sink(line);
  }

  error(msg: string, fields?: LogFields): void {
    this.write('error', msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    this.write('warn', msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    this.write('info', msg, fields);
  }
  debug(msg: string, fields?: LogFields): void {
    this.write('debug', msg, fields);
  }
  child(fields: LogFields): Logger {
    return new JsonLogger(this.level, { ...this.base, ...fields }, this.sink);
  }
}

export function createLogger(level: LogLevel = 'info', sink: LogSink = stdoutSink, base: LogFields = {}): Logger {
  return new JsonLogger(level, base, sink);
}

/** For tests and library defaults: drops everything. */
export const silentLogger: Logger = createLogger('error', () => undefined);
