#!/usr/bin/env bash
# Installs Debian's chromium for the headless /docs check (tests/e2e/docs.test.ts) when it is missing. Idempotent:
# does nothing when /usr/bin/chromium exists. Never downloads a browser build of its own (playwright-core is driven
# with executablePath), only Debian's package.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
/usr/bin/chromium --version
