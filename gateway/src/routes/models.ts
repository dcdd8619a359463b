/**
 * GET /v1/models and /v1/models/{id}: the models the caller may use: those live workers serve right now (owned_by
 * "llm-gateway", also under the public names the routing table gives their pools) and the routing table's upstream
 * models (owned_by their upstream's `owned_by`, "upstream" by default), always listed: their liveness is the upstream's.
 */
import { Router } from 'express';
import type { Principal } from '../auth/api-keys';
import { ApiError } from '../errors';
import { type Model, type ModelList, MODEL_OWNER } from '../protocol/models';
import type { RoutingTable } from '../routing/table';
import type { WorkerRegistry } from '../services/worker-registry';

/** Upstream models have no start time of ours: listed as created when this gateway started. */
const STARTED_S = Math.floor(Date.now() / 1000);

/** The models a caller may use (null: all), from its key's or token's limits. */
export type AllowedModels = (principal: Principal | undefined) => readonly string[] | null;

async function listModels(registry: WorkerRegistry, routing: RoutingTable): Promise<Model[]> {
  const live = await registry.models();
  const out: Model[] = live.map((m) => ({ id: m.id, object: 'model', created: Math.floor(m.createdMs / 1000), owned_by: MODEL_OWNER }));
  for (const alias of routing.poolAliases()) {
    const pool = live.find((m) => m.id === alias.queue);
    if (pool && !out.some((m) => m.id === alias.publicName)) {
      out.push({ id: alias.publicName, object: 'model', created: Math.floor(pool.createdMs / 1000), owned_by: MODEL_OWNER });
    }
  }
  for (const r of routing.upstreamRoutes()) {
    if (!out.some((m) => m.id === r.publicName)) out.push({ id: r.publicName, object: 'model', created: STARTED_S, owned_by: r.upstream.ownedBy });
  }
  return out;
}

/** One model: a live pool (registry.model refreshes once for a worker that registered a moment ago), else the table's. */
async function findModel(registry: WorkerRegistry, routing: RoutingTable, id: string): Promise<Model | undefined> {
  const route = routing.route(id);
  if (route.kind === 'pool') {
    const pool = await registry.model(route.queue);
    return pool ? { id, object: 'model', created: Math.floor(pool.createdMs / 1000), owned_by: MODEL_OWNER } : undefined;
  }
  return { id, object: 'model', created: STARTED_S, owned_by: route.upstream.ownedBy };
}

export function modelRoutes(registry: WorkerRegistry, routing: RoutingTable, allowedModels: AllowedModels = () => null): Router {
  const router = Router();
  const mayUse = (principal: Principal | undefined, id: string) => {
    const allowed = allowedModels(principal);
    return allowed === null || allowed.includes(id);
  };
  router.get('/v1/models', async (_req, res) => {
    const principal = res.locals.principal as Principal | undefined;
    const models = (await listModels(registry, routing)).filter((m) => mayUse(principal, m.id));
    const body: ModelList = { object: 'list', data: models };
    res.json(body);
  });
  // Model ids may contain '/' (e.g. "Qwen/Qwen2.5-7B-Instruct"), sent encoded or not.
  router.get('/v1/models/*id', async (req, res) => {
    const raw = (req.params as { id: string | string[] }).id;
    const id = Array.isArray(raw) ? raw.join('/') : raw;
    const model = mayUse(res.locals.principal as Principal | undefined, id) ? await findModel(registry, routing, id) : undefined;
    if (!model) {
      throw new ApiError('model_not_found', `The model '${id}' does not exist`, { param: 'model' });
    }
    res.json(model);
  });
  return router;
}
