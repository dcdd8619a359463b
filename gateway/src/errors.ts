/**
 * Typed errors with stable codes, the one table that maps a code to an HTTP status and an OpenAI error `type`, and the
 * one writer of error bodies. Every error a client can see has the OpenAI shape {"error":{message,type,param,code}},
 * because the official SDKs raise their typed errors (BadRequestError, AuthenticationError …) only for that shape.
 */
import type { ErrorRequestHandler, Response } from 'express';
import type { Server } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Logger } from './logger';

type ErrorType = 'invalid_request_error' | 'server_error' | 'rate_limit_error';

/** code → status and type. A code is part of our API: clients may match on it, so never rename one. */
export const ERROR_TABLE = {
  // 400: the request itself is wrong (OpenAI's own codes where it has them).
  invalid_json: { status: 400, type: 'invalid_request_error' },
  missing_required_parameter: { status: 400, type: 'invalid_request_error' },
  invalid_type: { status: 400, type: 'invalid_request_error' },
  invalid_value: { status: 400, type: 'invalid_request_error' },
  unsupported_parameter: { status: 400, type: 'invalid_request_error' },
  unsupported_value: { status: 400, type: 'invalid_request_error' },
  invalid_request: { status: 400, type: 'invalid_request_error' },
  /** The client took longer than HEADERS_TIMEOUT_MS / REQUEST_RECEIVE_TIMEOUT_MS to send its request (slow-loris). */
  request_receive_timeout: { status: 408, type: 'invalid_request_error' },
  context_length_exceeded: { status: 400, type: 'invalid_request_error' },
  invalid_api_key: { status: 401, type: 'invalid_request_error' },
  model_not_found: { status: 404, type: 'invalid_request_error' },
  // A resumed stream (GET …/{id}/stream): no such stream of this caller (or its events expired).
  completion_not_found: { status: 404, type: 'invalid_request_error' },
  // The stream exists but its events were not stored (a worker that does not keep them): it cannot be resumed.
  stream_not_resumable: { status: 409, type: 'invalid_request_error' },
  // Its events passed RESUME_EVENTS_MAX_BYTES and were cut: it can no longer be resumed.
  stream_truncated: { status: 410, type: 'invalid_request_error' },
  unknown_url: { status: 404, type: 'invalid_request_error' },
  request_too_large: { status: 413, type: 'invalid_request_error' },
  request_header_too_large: { status: 431, type: 'invalid_request_error' },
  unsupported_media_type: { status: 415, type: 'invalid_request_error' },
  rate_limit_exceeded: { status: 429, type: 'rate_limit_error' },
  // The client went away; the status is only ever seen in our own logs (nginx's convention).
  cancelled: { status: 499, type: 'invalid_request_error' },
  // 5xx: our side. The SDKs retry these (503 obeying retry-after).
  internal_error: { status: 500, type: 'server_error' },
  worker_lost: { status: 502, type: 'server_error' },
  no_worker_available: { status: 503, type: 'server_error' },
  redis_unavailable: { status: 503, type: 'server_error' },
  queue_timeout: { status: 503, type: 'server_error' },
  queue_full: { status: 503, type: 'server_error' },
  shutting_down: { status: 503, type: 'server_error' },
  // The gateway's own bounded work queues (prompt counting) are full: retry shortly.
  server_busy: { status: 503, type: 'server_error' },
  // In-stream only: the client left more than SSE_MAX_BUFFER_BYTES unread (streaming/sse.ts); the job is cancelled.
  stream_buffer_full: { status: 503, type: 'server_error' },
  request_timeout: { status: 504, type: 'server_error' },
  // An external upstream of the routing table (routing/upstream.ts). Its refusal of the request itself (a 4xx other than
  // 401/403/429) keeps the upstream's status; the others say the upstream cannot serve (the fallback chain may answer).
  upstream_invalid_request: { status: 400, type: 'invalid_request_error' },
  upstream_rate_limited: { status: 429, type: 'rate_limit_error' },
  upstream_error: { status: 502, type: 'server_error' },
  upstream_unavailable: { status: 503, type: 'server_error' },
  upstream_timeout: { status: 504, type: 'server_error' },
} as const satisfies Record<string, { status: number; type: ErrorType }>;

export type ErrorCode = keyof typeof ERROR_TABLE;

export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export class ApiError extends Error {
  override name = 'ApiError';
  readonly status: number;
  readonly type: string;
  readonly param: string | null;
  /** When set, 429/503 responses carry retry-after and retry-after-ms. */
  readonly retryAfterMs: number | undefined;

  constructor(
    readonly code: ErrorCode,
    message: string,
    /** `status`: only for an upstream's refusal passed on with the upstream's own 4xx (routing/upstream.ts). */
    opts: { param?: string | null; retryAfterMs?: number; cause?: unknown; status?: number } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.status = opts.status ?? ERROR_TABLE[code].status;
    this.type = ERROR_TABLE[code].type;
    this.param = opts.param ?? null;
    this.retryAfterMs = opts.retryAfterMs;
  }

  toBody(): ErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null;

/** ioredis/BullMQ errors that mean "Redis is not answering", as opposed to a bug of ours. */
function isRedisDown(err: Record<string, unknown>): boolean {
  const name = String(err.name ?? '');
  const message = String(err.message ?? '');
  return (
    name === 'MaxRetriesPerRequestError' ||
    /Connection is closed|ECONNREFUSED|ECONNRESET|ETIMEDOUT|Stream isn't writeable|Redis is unavailable/i.test(message)
  );
}

/** Turns anything thrown into an ApiError; unknown errors become a 500 that hides internals. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (isObject(err)) {
    // body-parser (express.json) marks its errors with `type`.
    switch (err.type) {
      case 'entity.too.large':
        return new ApiError('request_too_large', 'The request body is too large.', { cause: err });
      case 'entity.parse.failed':
        return new ApiError(
          'invalid_json',
          "We could not parse the JSON body of your request. The API expects a JSON payload, but what was sent was not valid JSON.",
          { cause: err },
        );
      case 'encoding.unsupported':
      case 'charset.unsupported':
        return new ApiError('unsupported_media_type', String(err.message ?? 'Unsupported encoding.'), { cause: err });
      case 'request.aborted':
        return new ApiError('cancelled', 'The client closed the request.', { cause: err });
    }
    // A Content-Encoding body (gzip, deflate, br) that is not valid or is cut off: zlib's error, the client's fault.
    if (typeof err.code === 'string' && /^(Z_|ERR_ZLIB|ERR__?BROTLI)/.test(err.code)) {
      return new ApiError('invalid_request', `The request body could not be decompressed (${String(err.message ?? err.code)}).`, { cause: err });
    }
    // Any other body-reading error that http-errors marked as the client's (4xx, exposable).
    const status = Number(err.status ?? err.statusCode);
    if (err.expose === true && status >= 400 && status < 500) {
      const code = status === 413 ? 'request_too_large' : status === 415 ? 'unsupported_media_type' : 'invalid_request';
      return new ApiError(code, String(err.message ?? 'Invalid request body.'), { cause: err });
    }
    if (isRedisDown(err)) {
      return new ApiError('redis_unavailable', 'The service is temporarily unavailable (queue store unreachable). Please retry.', {
        retryAfterMs: 1000,
        cause: err,
      });
    }
  }
  return new ApiError('internal_error', 'The server had an error while processing your request. Sorry about that!', {
    cause: err,
  });
}

/** Sets the headers that tell the official SDKs whether and when to retry. */
export function setRetryHeaders(res: Response, err: ApiError): void {
  if (err.retryAfterMs === undefined) return;
  res.setHeader('retry-after', String(Math.max(1, Math.ceil(err.retryAfterMs / 1000))));
  res.setHeader('retry-after-ms', String(Math.max(0, Math.round(err.retryAfterMs))));
}

/** The one writer of error responses (before any header has been sent). */
export function writeError(res: Response, err: ApiError): void {
  setRetryHeaders(res, err);
  res.status(err.status).json(err.toBody());
}

/**
 * Express error middleware: the single place where an error becomes a response and is logged (once).
 * Errors after a stream's headers are written into the stream by the chat service, not here; if one still arrives
 * with headers sent, the connection is ended rather than left hanging.
 */
export function errorMiddleware(logger: Logger): ErrorRequestHandler {
  return (err, req, res, _next) => {
    const apiErr = toApiError(err);
    const fields = { requestId: res.locals.requestId, method: req.method, path: req.path, code: apiErr.code };
    if (apiErr.retryAfterMs !== undefined) logger.warn('request refused for now', { ...fields, status: apiErr.status });
    else if (apiErr.status >= 500) logger.error('request failed', { ...fields, status: apiErr.status, err: apiErr.cause ?? apiErr });
    else logger.debug('request rejected', { ...fields, status: apiErr.status, param: apiErr.param });
    if (res.headersSent) {
      res.end();
      return;
    }
    writeError(res, apiErr);
  };
}

/**
 * Requests Node's HTTP parser refuses before Express sees them (headers over --max-http-header-size, malformed
 * request lines): answered in the same error shape instead of Node's bare 400/431 with an empty body.
 */
export function answerClientErrors(server: Server): void {
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    if (err.code === 'ECONNRESET' || !socket.writable) {
      socket.destroy();
      return;
    }
    const e =
      err.code === 'HPE_HEADER_OVERFLOW'
        ? new ApiError('request_header_too_large', 'The request headers are too large (the Authorization header or cookies, most likely).')
        : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
          ? new ApiError('request_receive_timeout', 'The request was not received in time.')
          : new ApiError('invalid_request', 'The HTTP request could not be parsed.');
    const body = JSON.stringify(e.toBody());
    const reason = e.status === 431 ? 'Request Header Fields Too Large' : e.status === 408 ? 'Request Timeout' : 'Bad Request';
    socket.end(
      `HTTP/1.1 ${e.status} ${reason}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
    );
  });
}
