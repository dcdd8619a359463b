// Jest projects. `gateway`: the gateway's unit tests (npx jest gateway/test); `e2e`: tests/e2e, run by `npm test`.
// ts-jest transpiles each file on its own (isolatedModules: fast, no type check); `npm run typecheck` checks types.
const { compilerOptions } = require('./tsconfig.json');

/** @type {import('jest').Config['transform']} */
const transform = { '^.+\\.ts$': ['ts-jest', { tsconfig: { ...compilerOptions, isolatedModules: true } }] };

/** @type {import('jest').Config} */
module.exports = {
  projects: [
    {
      displayName: 'gateway',
      testEnvironment: 'node',
      // Many of these tests start gateways, fake workers and a redis-server; jest's 5 s default fails them on a slow or
      // loaded machine. Waits inside tests are on conditions with their own deadlines; this is only the outer bound.
      testTimeout: 60_000,
      roots: ['<rootDir>/gateway/test'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
    {
      // End to end: the official openai Node SDK against the stack `npm test` starts (real Redis, worker, gateway).
      displayName: 'e2e',
      testEnvironment: 'node',
      testTimeout: 180_000,
      roots: ['<rootDir>/tests/e2e'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
  ],
};
