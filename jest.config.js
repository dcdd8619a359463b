// Jest projects. `gateway`: the gateway's unit tests (npx jest gateway/test); `e2e`: tests/e2e, run by `npm test`.
// ts-jest transpiles each file on its own (isolatedModules: fast, no type check); `npm run typecheck` checks types.
const { compilerOptions } = require('./tsconfig.json');

/** @type {import('jest').Config['transform']} */
const transform = { '^.+\\.ts$': ['ts-jest', { tsconfig: { ...compilerOptions, isolatedModules: true } }] };

/** @type {import('jest').Config} */
module.exports = {
  // Many tests start gateways, fake workers, a redis-server or a real worker; jest's 5 s default fails them on a slow or
  // loaded machine. Waits inside tests are on conditions with their own deadlines; this is only the outer bound (a
  // global option: jest ignores it inside `projects`). e2e files set longer ones for themselves.
  testTimeout: 60_000,
  projects: [
    {
      displayName: 'gateway',
      testEnvironment: 'node',
      roots: ['<rootDir>/gateway/test'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
    {
      // End to end: the official openai Node SDK against the stack `npm test` starts (real Redis, worker, gateway).
      displayName: 'e2e',
      testEnvironment: 'node',
      roots: ['<rootDir>/tests/e2e'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
    {
      // The reliability suite (issue 12): private stacks of real processes, run by scripts/test-reliability.mjs
      // (`npm run test:reliability`, and `--short` inside `npm test`), never beside the shared stack.
      displayName: 'reliability',
      testEnvironment: 'node',
      roots: ['<rootDir>/tests/reliability'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
    {
      // Redis Cluster (issue 17): run by scripts/test-cluster.mjs (`npm run test:cluster`, `--short` inside `npm test`)
      // against a stack it starts on a 3-master cluster.
      displayName: 'cluster',
      testEnvironment: 'node',
      roots: ['<rootDir>/tests/cluster'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
  ],
};
