/**
 * GET /openapi.json (the OpenAPI 3.1 document, generated once from the zod schemas: src/openapi/document.ts) and
 * GET /docs (Swagger UI over it). The viewer's files come from the swagger-ui-dist package in node_modules, never a
 * CDN, so the page works on a machine with no internet; its online validator badge is turned off for the same reason.
 * No auth: the document holds no secret, and "Authorize" in the page takes a key for trying requests.
 */
import { join } from 'node:path';
import express, { Router } from 'express';
import type { Config } from '../config';
import { buildOpenApiDocument } from '../openapi/document';

/** The only files of swagger-ui-dist the page loads (the package also ships a demo initializer we do not want served). */
const ASSETS = new Set(['swagger-ui.css', 'swagger-ui-bundle.js', 'favicon-32x32.png']);
// Resolved at start-up: a missing package fails the boot, not the first visitor.
const ASSET_DIR = join(require.resolve('swagger-ui-dist/package.json'), '..');

const PAGE = `<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>LLM gateway API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: '/openapi.json',
      dom_id: '#swagger-ui',
      deepLinking: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis],
      layout: 'BaseLayout',
    });
  </script>
</body>
</html>
`;

export function docsRoutes(config: Config): Router {
  const router = Router();
  const document = JSON.stringify(buildOpenApiDocument(config));

  router.get('/openapi.json', (_req, res) => {
    res.type('application/json').send(document);
  });
  router.get('/docs', (_req, res) => {
    res.type('html').setHeader('cache-control', 'no-cache').send(PAGE);
  });
  router.use('/docs/assets', (req, res, next) => {
    if (!ASSETS.has(req.path.slice(1))) return next('router');
    res.locals.route = '/docs/assets'; // the metrics' route label (no Express route serves these files)
    next();
  });
  router.use('/docs/assets', express.static(ASSET_DIR, { index: false, fallthrough: false, maxAge: '1h' }));
  return router;
}
