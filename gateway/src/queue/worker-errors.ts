/**
 * A worker's failure (docs/PROTOCOL.md, Failures) as the client sees it: from an `error` event's {code, message} or from
 * BullMQ's failedReason "<code>: <message>". Internal details stay in the logs.
 */
import { ApiError } from '../errors';
import { parseFailedReason, type WorkerError } from '../protocol/job';

export function safeJson(raw: string): unknown {
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

/** A worker's failure code (docs/PROTOCOL.md, Failures) as the client sees it. */
export function workerErrorToApiError(e: WorkerError): ApiError {
  switch (e.code) {
    case 'context_length_exceeded':
      return new ApiError('context_length_exceeded', e.message, { param: 'messages' });
    case 'invalid_request':
      return new ApiError('invalid_request', e.message, e.param ? { param: e.param } : {});
    case 'queue_timeout':
      return new ApiError('queue_timeout', 'No worker could take this request in time: the server is busy. Please retry.', {
        retryAfterMs: 1000,
      });
    case 'cancelled':
      return new ApiError('cancelled', 'The request was cancelled.');
    default:
      return new ApiError('internal_error', 'The server had an error while generating the response. Please retry.', {
        cause: e,
      });
  }
}

export function failedReasonToApiError(reason: string | undefined): ApiError {
  // BullMQ's own reason when a job's worker died more often than maxStalledCount allows.
  if (reason && /stalled more than allowable limit/i.test(reason)) {
    return new ApiError('worker_lost', 'The worker generating this response was lost. Please retry.');
  }
  let text = reason ?? '';
  // Python bullmq <= 3.0.4 JSON-quotes failedReason (FACTS.md, issue #4596); unwrap it rather than show the quotes.
  if (text.startsWith('"') && text.endsWith('"')) {
    const unquoted = safeJson(text);
    if (typeof unquoted === 'string') text = unquoted;
  }
  return workerErrorToApiError(parseFailedReason(text));
}
