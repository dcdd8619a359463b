# syntax=docker/dockerfile:1
# The OpenAI-compatible gateway (TypeScript, Express 5). Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t llm-gateway:0.1.0 .
# Stage 1 compiles with the full dev toolchain; stage 2 keeps only production dependencies and the compiled JS,
# and runs as an unprivileged numeric user (Kubernetes' runAsNonRoot can only verify a numeric USER).
# The label marks every stage's images as this project's, so that scripts/test-compose.mjs can remove the dangling ones
# an earlier build left (and nothing else on the machine).
ARG NODE_IMAGE=node:20.19-bookworm-slim

FROM ${NODE_IMAGE} AS build
LABEL io.llm-gateway.image=gateway
WORKDIR /app
COPY package.json package-lock.json tsconfig.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY gateway/ ./gateway/
# Compile only the gateway sources (tsconfig.json also includes tests and benchmarks, which are not in the image).
# The Lua scripts are read at run time from beside their module (gateway/src/redis-scripts/index.ts).
RUN npx tsc -p tsconfig.json && cp gateway/src/redis-scripts/*.lua dist/gateway/src/redis-scripts/ \
    && test -f dist/gateway/src/main.js

FROM ${NODE_IMAGE} AS deps
LABEL io.llm-gateway.image=gateway
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force

FROM ${NODE_IMAGE} AS runtime
LABEL io.llm-gateway.image=gateway
ENV NODE_ENV=production \
    PORT=8000 \
    HOST=0.0.0.0
WORKDIR /app
COPY --from=deps --chown=1000:1000 /app/node_modules ./node_modules
COPY --from=build --chown=1000:1000 /app/dist ./dist
COPY --chown=1000:1000 package.json ./
# uid 1000 is the image's `node` user.
USER 1000:1000
EXPOSE 8000
# node:*-slim has no curl; Node's own fetch probes the same /health the orchestrators use, on whatever PORT is set.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.PORT||8000)+'/health').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
# Exec form: node is PID 1 and receives SIGTERM itself (the gateway drains open streams, then exits 0).
CMD ["node", "dist/gateway/src/main.js"]
