#!/bin/sh
# As the official image's entrypoint: leading options are redis-server's; protected mode off (see redis.Dockerfile).
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = "redis-server" ]; then shift; set -- redis-server --protected-mode no "$@"; fi
exec "$@"
