# Stand-in for python:3.11-slim-bookworm (see README.md): Debian bookworm's own Python is 3.11.
ARG ROOTFS
FROM ${ROOTFS}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python --version
# This machine's CA bundle (README.md), apart from the system one that ca-certificates rewrites; pip reads PIP_CERT.
COPY host-ca.crt /etc/ssl/host-ca-bundle.crt
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/host-ca-bundle.crt
CMD ["python3"]
