# Stand-in for redis:7.x (see README.md): Debian bookworm's redis-server (7.0). Like the official image: user redis
# (uid 999) owns /data, the working directory and a volume, and protected mode is off (the official build compiles it
# off: clients come from other containers, and Debian's default would refuse them).
ARG ROOTFS
FROM ${ROOTFS}
RUN groupadd --system --gid 999 redis && useradd --system --uid 999 --gid redis --home-dir /data --no-create-home redis \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data \
    && redis-server --version
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
VOLUME /data
USER 999:999
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
