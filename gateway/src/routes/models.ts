/** GET /v1/models and /v1/models/{id}: the models that live workers serve right now and the caller may use. */
import { Router } from 'express';
import type { Principal } from '../auth/api-keys';
import { ApiError } from '../errors';
import { type Model, type ModelList, MODEL_OWNER } from '../protocol/models';
import type { ModelView, WorkerRegistry } from '../services/worker-registry';

const toModel = (m: ModelView): Model => ({
  id: m.id,
  object: 'model',
  created: Math.floor(m.createdMs / 1000),
  owned_by: MODEL_OWNER,
});

/** The models a caller may use (null: all), from its key's or token's limits. */
export type AllowedModels = (principal: Principal | undefined) => readonly string[] | null;

export function modelRoutes(registry: WorkerRegistry, allowedModels: AllowedModels = () => null): Router {
  const router = Router();
  const mayUse = (principal: Principal | undefined, id: string) => {
    const allowed = allowedModels(principal);
    return allowed === null || allowed.includes(id);
  };
  router.get('/v1/models', async (_req, res) => {
    const principal = res.locals.principal as Principal | undefined;
    const models = (await registry.models()).filter((m) => mayUse(principal, m.id));
    const body: ModelList = { object: 'list', data: models.map(toModel) };
    res.json(body);
  });
  // Model ids may contain '/' (e.g. "Qwen/Qwen2.5-7B-Instruct"), sent encoded or not.
  router.get('/v1/models/*id', async (req, res) => {
    const raw = (req.params as { id: string | string[] }).id;
    const id = Array.isArray(raw) ? raw.join('/') : raw;
    const model = mayUse(res.locals.principal as Principal | undefined, id) ? await registry.model(id) : null;
    if (!model) {
      throw new ApiError('model_not_found', `The model '${id}' does not exist`, { param: 'model' });
    }
    res.json(toModel(model));
  });
  return router;
}
