/**
 * The OpenAPI 3.1 document, generated from the zod schemas that validate and type the wire (src/protocol/*): one
 * source, so the document cannot drift from what the gateway parses. zod-openapi renders them through zod 4's own
 * toJSONSchema (input shapes for requests, output shapes for responses).
 *
 * Paths are listed by hand (which method, which schemas, which errors); gateway/test/openapi.test.ts checks them
 * against the routes Express actually serves, both ways, for the configuration given here.
 */
import { z } from 'zod';
import { createDocument, type ZodOpenApiOperationObject, type ZodOpenApiPathsObject } from 'zod-openapi';
import type { Config } from '../config';
import { ERROR_TABLE, type ErrorCode } from '../errors';
import { createdKeySchema, createKeyRequestSchema, keyListSchema, keyRecordSchema, revokeJwtRequestSchema, updateKeyRequestSchema } from '../protocol/admin';
import { chatCompletionChunkSchema, chatCompletionRequestSchema, chatCompletionSchema } from '../protocol/chat';
import { completionRequestSchema, textCompletionChunkSchema, textCompletionSchema } from '../protocol/completions';
import { modelListSchema, modelSchema } from '../protocol/models';
import { tutorialBatchResponseSchema, tutorialChatRequestSchema, tutorialChatResponseSchema, tutorialSecureResponseSchema } from '../protocol/tutorial';
import { errorBodySchema, healthSchema, readySchema } from './schemas';

export const API_VERSION = '0.1.0';

const json = (schema: z.ZodType) => ({ 'application/json': { schema } });

/** One response per status the operation can answer with, each listing the stable codes of ERROR_TABLE it may carry. */
function errors(...codes: ErrorCode[]): ZodOpenApiOperationObject['responses'] {
  const byStatus = new Map<number, ErrorCode[]>();
  for (const code of codes) byStatus.set(ERROR_TABLE[code].status, [...(byStatus.get(ERROR_TABLE[code].status) ?? []), code]);
  const out: ZodOpenApiOperationObject['responses'] = {};
  for (const [status, list] of [...byStatus].sort((a, b) => a[0] - b[0])) {
    out[String(status) as `${4 | 5}${string}`] = { description: `Error; \`code\`: ${list.map((c) => `\`${c}\``).join(', ')}`, content: json(errorBodySchema) };
  }
  return out;
}

const AUTH_ERRORS: ErrorCode[] = ['invalid_api_key'];
const BODY_ERRORS: ErrorCode[] = ['invalid_json', 'invalid_type', 'invalid_value', 'missing_required_parameter', 'request_too_large'];
const GEN_ERRORS: ErrorCode[] = [
  ...BODY_ERRORS,
  'unsupported_parameter',
  'unsupported_value',
  'context_length_exceeded',
  'model_not_found',
  'rate_limit_exceeded',
  'internal_error',
  'no_worker_available',
  'redis_unavailable',
  'queue_timeout',
  'shutting_down',
  'request_timeout',
  // A model of the routing table served by an external upstream (docs/ROUTING.md).
  'upstream_invalid_request',
  'upstream_rate_limited',
  'upstream_error',
  'upstream_unavailable',
  'upstream_timeout',
];

const sseNote =
  'With `stream: true`: `text/event-stream`, one `data: <chunk JSON>` per event, then `data: [DONE]`, each with an ' +
  '`id:` (`<completion id>/<seq>.<k>`) to resume the stream from (`GET …/{id}/stream`). An error after the headers is ' +
  'sent as `data: {"error":{…}}` then `data: [DONE]` (without ids).';

/**
 * The `text/event-stream` content of a streaming response. Its `schema` describes one event, as OpenAPI 3.2 models
 * server-sent events (an object of `data`, `event`, `id`, `retry`) and as tools read a 3.1 document (schemathesis
 * validates each event against it): `data` is the JSON of one `chunk` (a component's name) or `[DONE]`, or for the
 * tutorial's stream (no chunk) a piece of text.
 */
function sseContent(chunk: 'ChatCompletionChunk' | 'TextCompletionChunk' | null) {
  const data = chunk
    ? z.string().meta({ description: `The JSON of a \`${chunk}\`, \`{"error":{…}}\`, or \`[DONE]\``, contentMediaType: 'application/json', contentSchema: { $ref: `#/components/schemas/${chunk}` } })
    : z.string().meta({ description: 'A piece of new text, `[DONE]`, or (with `event: error`) the error object' });
  return {
    'text/event-stream': {
      schema: z.object({ data, event: z.string().optional(), id: z.string().optional(), retry: z.number().int().optional() }),
    },
  };
}

const RESUME_ERRORS: ErrorCode[] = ['invalid_value', 'completion_not_found', 'stream_not_resumable', 'stream_truncated', 'rate_limit_exceeded', 'redis_unavailable'];

/** GET …/{id}/stream of one route: `chunk` is the schema of its events. */
function resumePath(operationId: string, route: string, chunk: 'ChatCompletionChunk' | 'TextCompletionChunk'): ZodOpenApiOperationObject {
  return {
    operationId,
    summary: `Resume a stream of ${route}`,
    description:
      `The stream \`id\` (the \`id\` of its chunks) again, for the caller who started it (another caller gets a 404): ` +
      'the events after `Last-Event-ID` (none: from the start), then the rest live, then `data: [DONE]`. Resumable ' +
      'until its stored events expire (`RESUME_EVENTS_TTL_MS` after the last one); 409 when they were not stored, 410 ' +
      'when they passed `RESUME_EVENTS_MAX_BYTES`. It draws one request from the RPM budget and no tokens.',
    tags: ['OpenAI'],
    security: [{ bearerAuth: [] }],
    requestParams: {
      path: z.object({ id: z.string().meta({ description: 'The completion id (`chatcmpl-…` or `cmpl-…`)' }) }),
      header: z.object({ 'last-event-id': z.string().optional().meta({ description: 'The `id:` of the last event received' }) }),
    },
    responses: {
      '200': { description: 'The events not yet received, as server-sent events', content: sseContent(chunk) },
      ...errors(...AUTH_ERRORS, ...RESUME_ERRORS),
    },
  };
}

function chatPaths(): ZodOpenApiPathsObject {
  return {
    '/v1/chat/completions': {
      post: {
        operationId: 'createChatCompletion',
        summary: 'Create a chat completion (OpenAI Chat Completions)',
        description: `OpenAI's request and response shapes. ${sseNote}`,
        tags: ['OpenAI'],
        security: [{ bearerAuth: [] }],
        requestBody: { required: true, content: json(chatCompletionRequestSchema) },
        responses: {
          '200': {
            description: 'The completion (JSON), or its chunks as server-sent events when `stream` is true',
            content: { ...json(chatCompletionSchema), ...sseContent('ChatCompletionChunk') },
          },
          ...errors(...AUTH_ERRORS, ...GEN_ERRORS),
        },
      },
    },
    '/v1/completions': {
      post: {
        operationId: 'createCompletion',
        summary: 'Create a text completion (OpenAI legacy Completions)',
        description:
          `OpenAI's request and \`text_completion\` shapes; the prompt is sent to the model as is (no chat template). A list ` +
          'of prompts gives choices indexed prompt × n + choice. Refused with a 400 naming the field: token-id prompts, a ' +
          `non-empty \`suffix\`, \`best_of\` other than \`n\`, \`echo\` with \`logprobs\`, and \`logprobs\` for a model ` +
          `served by an external upstream (docs/ROUTING.md). ${sseNote}`,
        tags: ['OpenAI'],
        security: [{ bearerAuth: [] }],
        requestBody: { required: true, content: json(completionRequestSchema) },
        responses: {
          '200': {
            description: 'The completion (JSON), or its chunks as server-sent events when `stream` is true',
            content: { ...json(textCompletionSchema), ...sseContent('TextCompletionChunk') },
          },
          ...errors(...AUTH_ERRORS, ...GEN_ERRORS),
        },
      },
    },
    '/v1/chat/completions/{id}/stream': { get: resumePath('resumeChatCompletionStream', '/v1/chat/completions', 'ChatCompletionChunk') },
    '/v1/completions/{id}/stream': { get: resumePath('resumeCompletionStream', '/v1/completions', 'TextCompletionChunk') },
    '/v1/models': {
      get: {
        operationId: 'listModels',
        summary: 'Models served by live workers',
        tags: ['OpenAI'],
        security: [{ bearerAuth: [] }],
        responses: { '200': { description: 'The list', content: json(modelListSchema) }, ...errors(...AUTH_ERRORS) },
      },
    },
    '/v1/models/{id}': {
      get: {
        operationId: 'retrieveModel',
        summary: 'One model served by a live worker',
        description: 'The id may contain `/` (e.g. `Qwen/Qwen2.5-7B-Instruct`), encoded or not.',
        tags: ['OpenAI'],
        security: [{ bearerAuth: [] }],
        requestParams: { path: z.object({ id: z.string().meta({ description: 'Model id' }) }) },
        responses: { '200': { description: 'The model', content: json(modelSchema) }, ...errors(...AUTH_ERRORS, 'model_not_found') },
      },
    },
  };
}

function tutorialPaths(): ZodOpenApiPathsObject {
  const op = (operationId: string, summary: string, response: ZodOpenApiOperationObject['responses']): ZodOpenApiOperationObject => ({
    operationId,
    summary,
    tags: ['Tutorial'],
    security: [{ bearerAuth: [] }],
    requestBody: { required: true, content: json(tutorialChatRequestSchema) },
    responses: { ...response, ...errors(...AUTH_ERRORS, ...GEN_ERRORS) },
  });
  return {
    '/chat': { post: op('tutorialChat', 'One chat turn (the tutorial shape)', { '200': { description: 'The reply', content: json(tutorialChatResponseSchema) } }) },
    '/chat/secure': {
      post: op('tutorialChatSecure', 'One chat turn, the shorter secure shape', { '200': { description: 'The reply', content: json(tutorialSecureResponseSchema) } }),
    },
    '/chat/stream': {
      post: op('tutorialChatStream', 'One chat turn as server-sent events', {
        '200': {
          description: '`data: <text>` per piece of new text, then `data: [DONE]`; an error after the headers is `event: error` with the error object.',
          content: sseContent(null),
        },
      }),
    },
    '/chat/batch': {
      post: {
        ...op('tutorialChatBatch', 'Several chat turns; one result (or error object) per request, in order', {
          '200': { description: 'Results in request order', content: json(tutorialBatchResponseSchema) },
        }),
        // Each item is parsed by the /chat schema (the batch schema itself only checks for a non-empty array).
        requestBody: { required: true, content: json(z.array(tutorialChatRequestSchema).min(1).max(32)) },
      },
    },
  };
}

function adminPaths(): ZodOpenApiPathsObject {
  const admin = { tags: ['Admin'], security: [{ adminAuth: [] }] };
  const id = { path: z.object({ id: z.string().meta({ description: 'Key id' }) }) };
  const one = (description: string) => ({ '200': { description, content: json(keyRecordSchema) } });
  const errs = errors('invalid_api_key', 'invalid_json', 'invalid_type', 'invalid_value', 'unknown_url');
  return {
    '/admin/keys': {
      post: {
        ...admin,
        operationId: 'createKey',
        summary: 'Create an API key (the key is returned only here)',
        requestBody: { required: true, content: json(createKeyRequestSchema) },
        responses: { '201': { description: 'Created', content: json(createdKeySchema) }, ...errs },
      },
      get: { ...admin, operationId: 'listKeys', summary: 'List keys with usage', responses: { '200': { description: 'Keys', content: json(keyListSchema) }, ...errs } },
    },
    '/admin/keys/{id}': {
      get: { ...admin, operationId: 'getKey', summary: 'One key', requestParams: id, responses: { ...one('The key'), ...errs } },
      patch: {
        ...admin,
        operationId: 'updateKey',
        summary: 'Change name and limits',
        requestParams: id,
        requestBody: { required: true, content: json(updateKeyRequestSchema) },
        responses: { ...one('The key'), ...errs },
      },
      delete: { ...admin, operationId: 'revokeKey', summary: 'Revoke a key', requestParams: id, responses: { ...one('The revoked key'), ...errs } },
    },
    '/admin/jwt/revocations': {
      post: {
        ...admin,
        operationId: 'revokeJwt',
        summary: 'Revoke a JWT by its jti',
        requestBody: { required: true, content: json(revokeJwtRequestSchema) },
        responses: {
          '200': { description: 'Revoked', content: json(z.object({ jti: z.string(), revoked: z.literal(true), expires_in_s: z.number().int() })) },
          ...errs,
        },
      },
    },
  };
}

function operationsPaths(config: Config): ZodOpenApiPathsObject {
  const metricsSecurity =
    config.METRICS_AUTH === 'api_key' ? [{ bearerAuth: [] }] : config.METRICS_AUTH === 'token' ? [{ metricsAuth: [] }] : [];
  return {
    '/health': {
      get: { operationId: 'health', summary: 'The process is up', tags: ['Operations'], security: [], responses: { '200': { description: 'Up', content: json(healthSchema) } } },
    },
    '/ready': {
      get: {
        operationId: 'ready',
        summary: 'Redis answers, a live worker serves DEFAULT_MODEL and its tokenizer is built',
        tags: ['Operations'],
        security: [],
        responses: {
          '200': { description: 'Ready', content: json(readySchema) },
          '503': { description: 'Not ready (with `retry-after`)', content: json(readySchema) },
        },
      },
    },
    [config.METRICS_PATH]: {
      get: {
        operationId: 'metrics',
        summary: 'Prometheus metrics (METRICS_PATH, METRICS_AUTH; docs/OBSERVABILITY.md)',
        tags: ['Operations'],
        security: metricsSecurity,
        responses: {
          '200': { description: 'Prometheus text exposition format', content: { 'text/plain': { schema: z.string() } } },
          ...(config.METRICS_AUTH === 'none' ? {} : errors('invalid_api_key')),
        },
      },
    },
    '/openapi.json': {
      get: { operationId: 'openapi', summary: 'This document', tags: ['Operations'], security: [], responses: { '200': { description: 'OpenAPI 3.1', content: { 'application/json': { schema: z.looseObject({}) } } } } },
    },
    '/docs': {
      get: { operationId: 'docs', summary: 'This document, browsable (Swagger UI)', tags: ['Operations'], security: [], responses: { '200': { description: 'HTML page', content: { 'text/html': { schema: z.string() } } } } },
    },
  };
}

type OpenApiDocument = ReturnType<typeof createDocument>;

const HEADERS = {
  'x-request-id': { description: 'The request id (the client\'s own when sane, else ours); it is in every log line of the request', schema: { type: 'string' } },
  'retry-after': { description: 'Seconds to wait before retrying (429, 503)', schema: { type: 'integer' } },
  'retry-after-ms': { description: 'The same in milliseconds (read by the openai SDKs)', schema: { type: 'integer' } },
} as const;

/** Headers every response carries (x-request-id), and those of retryable errors, on every documented response. */
function addResponseHeaders(doc: OpenApiDocument): OpenApiDocument {
  doc.components = { ...doc.components, headers: { ...HEADERS } };
  const ref = (name: keyof typeof HEADERS) => ({ $ref: `#/components/headers/${name}` });
  for (const item of Object.values(doc.paths ?? {})) {
    for (const op of Object.values(item ?? {})) {
      const responses = (op as { responses?: Record<string, { headers?: Record<string, unknown> }> }).responses;
      for (const [status, r] of Object.entries(responses ?? {})) {
        if ('$ref' in r) continue;
        r.headers = { ...r.headers, 'x-request-id': ref('x-request-id') };
        if (status === '429' || status === '503') Object.assign(r.headers, { 'retry-after': ref('retry-after'), 'retry-after-ms': ref('retry-after-ms') });
      }
    }
  }
  return doc;
}

/** The document for a gateway built from `config` (the admin paths exist only when ADMIN_API_KEY is set). */
export function buildOpenApiDocument(config: Config): OpenApiDocument {
  return addResponseHeaders(createDocument(
    {
      openapi: '3.1.0',
      info: {
        title: 'LLM gateway',
        version: API_VERSION,
        description:
          'OpenAI-compatible gateway in front of Python workers running Hugging Face Transformers. Errors are always ' +
          '`{"error":{"message","type","param","code"}}`; every response carries `x-request-id`.',
        license: { name: 'Apache-2.0', identifier: 'Apache-2.0' },
      },
      servers: [{ url: '/', description: 'This gateway' }],
      security: [{ bearerAuth: [] }],
      tags: [
        { name: 'OpenAI', description: 'The OpenAI Chat Completions, (legacy) Completions and Models API' },
        { name: 'Tutorial', description: "The tutorial's routes, with its shapes" },
        { name: 'Admin', description: 'API keys and JWT revocations (only with ADMIN_API_KEY)' },
        { name: 'Operations', description: 'Probes, metrics and this documentation' },
      ],
      components: {
        securitySchemes: {
          bearerAuth: { type: 'http', scheme: 'bearer', description: 'An API key (API_KEYS or /admin/keys) or a JWT' },
          adminAuth: { type: 'http', scheme: 'bearer', description: 'ADMIN_API_KEY' },
          metricsAuth: { type: 'http', scheme: 'bearer', description: 'METRICS_TOKEN (METRICS_AUTH=token)' },
        },
        schemas: {
          ChatCompletionRequest: chatCompletionRequestSchema,
          ChatCompletion: chatCompletionSchema,
          ChatCompletionChunk: chatCompletionChunkSchema,
          CompletionRequest: completionRequestSchema,
          TextCompletion: textCompletionSchema,
          TextCompletionChunk: textCompletionChunkSchema,
          Model: modelSchema,
          ModelList: modelListSchema,
          Error: errorBodySchema,
          TutorialChatRequest: tutorialChatRequestSchema,
          TutorialChatResponse: tutorialChatResponseSchema,
          KeyRecord: keyRecordSchema,
        },
      },
      paths: {
        ...chatPaths(),
        ...tutorialPaths(),
        ...(config.ADMIN_API_KEY ? adminPaths() : {}),
        ...operationsPaths(config),
      },
    },
    { reused: 'inline' },
  ));
}
