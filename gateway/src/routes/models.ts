/** GET /v1/models and /v1/models/{id}: the models that live workers serve right now. */
import { Router } from 'express';
import { ApiError } from '../errors';
import { type Model, type ModelList, MODEL_OWNER } from '../protocol/models';
import type { ModelView, WorkerRegistry } from '../services/worker-registry';

const toModel = (m: ModelView): Model => ({
  id: m.id,
  object: 'model',
  created: Math.floor(m.createdMs / 1000),
  owned_by: MODEL_OWNER,
});

export function modelRoutes(registry: WorkerRegistry): Router {
  const router = Router();
  router.get('/v1/models', async (_req, res) => {
    const body: ModelList = { object: 'list', data: (await registry.models()).map(toModel) };
    res.json(body);
  });
  // Model ids may contain '/' (e.g. "Qwen/Qwen2.5-7B-Instruct"), sent encoded or not.
  router.get('/v1/models/*id', async (req, res) => {
    const raw = (req.params as { id: string | string[] }).id;
    const id = Array.isArray(raw) ? raw.join('/') : raw;
    const model = await registry.model(id);
    if (!model) {
      throw new ApiError('model_not_found', `The model '${id}' does not exist`, { param: 'model' });
    }
    res.json(toModel(model));
  });
  return router;
}
