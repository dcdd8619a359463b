/**
 * Entry point: config → connections → app → listen → drain on SIGTERM/SIGINT.
 * Exit codes: 0 after a clean shutdown, 2 for a bad configuration, 1 for anything else that stops start-up.
 */
import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { keyIdOf } from './auth/api-keys';
import { type Config, ConfigError, loadConfig } from './config';
import { answerClientErrors } from './errors';
import { createLogger, type Logger } from './logger';
import { buildGateway } from './wiring';

function exitOnConfigError<T>(build: () => T): T {
  try {
    return build();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`llm-gateway: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
}

const loadConfigOrExit = (): Config => exitOnConfigError(() => loadConfig());

/** With no API_KEYS a development key is generated; the start script reads the DEV_API_KEY= line. */
function resolveKeys(config: Config, logger: Logger): string[] {
  if (config.API_KEYS.length > 0) return config.API_KEYS;
  const key = `sk-dev-${randomBytes(24).toString('base64url')}`;
  process.stdout.write(`DEV_API_KEY=${key}\n`);
  logger.warn('API_KEYS is empty: generated a development key (printed above as DEV_API_KEY)', { keyId: keyIdOf(key) });
  return [key];
}

async function main(): Promise<void> {
  const config = loadConfigOrExit();
  const logger = createLogger(config.LOG_LEVEL, undefined, { service: 'llm-gateway' });
  const keys = resolveKeys(config, logger);

  const gateway = exitOnConfigError(() => buildGateway(config, logger, keys)); // a bad ROUTING_FILE
  const { app, lifecycle } = gateway;

  // Expired headers/requests are looked for at this interval (Node's default, 30 s, would let a slow-loris socket
  // outlive HEADERS_TIMEOUT_MS by up to that much).
  const connectionsCheckingInterval = Math.min(30_000, Math.max(250, Math.floor(config.HEADERS_TIMEOUT_MS / 4)));
  const server: Server = createServer({ connectionsCheckingInterval }, app).listen(config.PORT, config.HOST);
  await new Promise<void>((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  answerClientErrors(server);
  // Both bound only how long the request takes to arrive, never the response: a stream may run for REQUEST_TIMEOUT_MS.
  server.requestTimeout = config.REQUEST_RECEIVE_TIMEOUT_MS;
  server.headersTimeout = Math.min(config.HEADERS_TIMEOUT_MS, config.REQUEST_RECEIVE_TIMEOUT_MS);
  server.keepAliveTimeout = 65_000;
  logger.info('gateway listening', {
    url: `http://${config.HOST}:${config.PORT}/v1`,
    defaultModel: config.DEFAULT_MODEL,
    redis: redactUrl(config.REDIS_URL),
  });

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info('shutting down: no new requests; waiting for open ones', { signal, open: lifecycle.openRequests });
    lifecycle.draining = true;
    server.close();
    server.closeIdleConnections();
    const idle = await lifecycle.waitIdle(config.SHUTDOWN_GRACE_MS);
    if (!idle) {
      logger.warn('grace period over: ending open requests', { open: lifecycle.openRequests });
      lifecycle.abortAll('shutdown');
      await lifecycle.waitIdle(2000);
    }
    server.closeAllConnections();
    await gateway.close();
    logger.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
  // Last resort: a rejection nobody handled is a bug to log, not a reason to drop every open stream.
  process.on('unhandledRejection', (err) => logger.error('unhandled rejection', { err }));
  process.on('uncaughtException', (err) => {
    logger.error('uncaught exception: exiting', { err });
    process.exit(1);
  });
}

function redactUrl(url: string): string {
  return url.replace(/\/\/([^@/]*)@/, '//***@');
}

main().catch((err) => {
  process.stderr.write(`llm-gateway: failed to start: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
