# Stand-in for python:3.11-slim-bookworm (see README.md): Debian bookworm's own Python is 3.11.
ARG ROOTFS
FROM ${ROOTFS}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python --version
ENV LANG=C.UTF-8
CMD ["python3"]
