// Jest projects. `gateway`: the gateway's unit tests (npx jest gateway/test). The lead adds tests/e2e here.
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
      roots: ['<rootDir>/gateway/test'],
      testMatch: ['**/*.test.ts'],
      transform,
    },
  ],
};
