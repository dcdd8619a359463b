/**
 * What the prepare step (services/chat-service.ts, services/upstream-prepare.ts) hands to admission and the run: the
 * request's context and the prepared request. Types only, apart from chat-service.ts so that the upstream's
 * preparation can build one without an import cycle.
 */
import type { Logger } from '../logger';
import type { JobData } from '../protocol/job';
import type { JobPlacement } from '../queue/job-queue';
import type { Permit } from '../routing/breaker';
import type { UpstreamRequest } from '../routing/upstream';
import type { CompletionMeta } from './chat-format';
import type { Stamps } from './stamps';

export interface RequestContext {
  requestId: string;
  log: Logger;
  /** Aborted when the client goes away (reason "client") or the gateway shuts down (reason "shutdown"). */
  signal: AbortSignal;
  /** Where the time goes (services/stamps.ts): logged with the finished request. */
  stamps?: Stamps;
}

export interface PreparedChat {
  meta: CompletionMeta;
  data: JobData;
  stream: boolean;
  includeUsage: boolean;
  wantLogprobs: boolean;
  /** Sequences the model's live workers run at once (ModelView.slots): backlog admission's free-room check. */
  slots: number | null;
  /** The request field that holds the prompt, named by errors about its length. */
  promptParam: 'messages' | 'prompt';
  /** The request offered tools: the answer is rendered with its tool calls (tools/parser.ts). */
  parseToolCalls: boolean;
  /** Where the job goes in the queue (the caller's tier); absent = FIFO. */
  placement?: JobPlacement;
  /** Set when an external upstream answers instead of a job (routing/upstream.ts, services/upstream-prepare.ts): there is no queue then. */
  upstream?: UpstreamRequest;
  /** Neither read nor written in the response cache (an upstream's request offering tools: services/upstream-prepare.ts). */
  noCache?: boolean;
  /** More of the request than `data` holds that keys the cache: what an upstream is sent besides the job's input. */
  cacheExtra?: Record<string, unknown>;
  /** The circuit breaker this run reports to (routing/breaker.ts), set by the pipeline's fallback chain. */
  permit?: Permit;
}
