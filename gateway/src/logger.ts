/**
 * Structured JSON logs with winston, one object per line on stdout: `{"ts","level","msg",…fields}` (the worker's
 * log.py writes the same keys, so one log pipeline reads both). Callers pass fields (requestId, jobId, model, keyId,
 * status, ms, promptTokens, completionTokens …), never keys or, unless LOG_PROMPTS, prompt/output text.
 *
 * The Logger interface is ours, not winston's, so callers and tests never depend on the library: a sink function
 * receives each finished line (stdout in production, an array in tests).
 */
import winston from 'winston';
import Transport from 'winston-transport';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type LogFields = Record<string, unknown>;

/** winston's npm levels less http/verbose/silly: the four LOG_LEVEL accepts. */
const LEVELS: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

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

// winston keeps `level` and `message` on its info object, and folds a `message` meta field into the message; so the
// call's fields travel under one key of their own and are spread only here (a field may then be named anything).
const FIELDS = '__fields';
const RESERVED = new Set(['level', 'message', FIELDS]);

/** Builds the line: ts, level, msg first (as the worker writes them), then the fields, undefined ones dropped. */
const toLine = winston.format((info) => {
  const entry: LogFields = { ts: new Date().toISOString(), level: info.level, msg: info.message };
  const add = (k: string, v: unknown) => {
    if (v !== undefined && !(k in entry && (k === 'ts' || k === 'level' || k === 'msg'))) entry[k] = serialise(v);
  };
  for (const [k, v] of Object.entries(info)) if (!RESERVED.has(k)) add(k, v); // the child's and base fields
  for (const [k, v] of Object.entries((info[FIELDS] as LogFields | undefined) ?? {})) add(k, v);
  let line: string;
  try {
    line = JSON.stringify(entry);
  } catch {
    line = JSON.stringify({ ts: entry.ts, level: info.level, msg: info.message, note: 'unserialisable log fields' });
  }
  (info as Record<symbol, unknown>)[Symbol.for('message')] = line;
  return info;
});

/** A winston transport that hands each finished line to a sink function (synchronously, so tests see it at once). */
class SinkTransport extends Transport {
  constructor(private readonly sink: LogSink) {
    super();
  }
  override log(info: Record<symbol, unknown>, next: () => void): void {
    this.sink(String(info[Symbol.for('message')]));
    next();
  }
}

class WinstonLogger implements Logger {
  constructor(private readonly w: winston.Logger) {}

  isLevelEnabled(level: LogLevel): boolean {
    return this.w.isLevelEnabled(level);
  }
  private write(level: LogLevel, msg: string, fields?: LogFields): void {
    if (this.w.isLevelEnabled(level)) this.w.log({ level, message: msg, [FIELDS]: fields });
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
    return new WinstonLogger(this.w.child(fields));
  }
}

export function createLogger(level: LogLevel = 'info', sink: LogSink = stdoutSink, base: LogFields = {}): Logger {
  const w = winston.createLogger({
    level,
    levels: LEVELS,
    format: toLine(),
    defaultMeta: base,
    transports: [new SinkTransport(sink)],
    exitOnError: false,
  });
  return new WinstonLogger(w);
}

/** For tests and library defaults: drops everything. */
export const silentLogger: Logger = createLogger('error', () => undefined);
