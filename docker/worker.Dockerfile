# syntax=docker/dockerfile:1
# The worker (`ddpm worker`), and `ddpm train` / `ddpm eval` with the same image. Build from
# the repository root:
#
#   docker build -f docker/worker.Dockerfile -t ddpm-serve-worker .          # CUDA
#   docker build -f docker/worker.Dockerfile -t ddpm-serve-worker:cpu \
#       --build-arg BASE=python:3.11-slim .                                   # CPU only
#
#   docker run --gpus 1 -e DDPM_REDIS_URL=redis://HOST:6379/0 \
#       -v "$PWD/checkpoints:/models:ro" ddpm-serve-worker
#   docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/data:/data:ro" \
#       -v "$PWD/runs:/runs" ddpm-serve-worker \
#       train --data /data/mnist --preset mnist --out /runs/mnist
#
# BASE is any image with Python >= 3.11. The CUDA default ships PyTorch, which is kept as
# it is; a base without torch gets TORCH (the CUDA base's version, pinned) from
# TORCH_INDEX_URL (PyTorch's CPU wheels by default; the plain PyPI build is
# --build-arg TORCH_INDEX_URL=https://pypi.org/simple; another torch: --build-arg TORCH=...).
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# -- build: the project's wheel ----------------------------------------------------------
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY contract ./contract
COPY worker ./worker
COPY models ./models
COPY training ./training
COPY ddpm ./ddpm
RUN pip wheel --no-deps --wheel-dir /wheels .

# -- runtime: the base's Python and torch, the project and its other dependencies ---------
FROM ${BASE} AS runtime
ARG TORCH=torch==2.5.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# DL3013 (unpinned pip install) does not apply: the requirement is the TORCH build
# argument, pinned above (torch==...); hadolint cannot see through the variable.
# hadolint ignore=DL3013
RUN python -c "import torch" 2>/dev/null \
 || pip install --index-url "$TORCH_INDEX_URL" "$TORCH"
COPY --from=build /wheels /wheels
# Pin the torch that is there, so resolving the project's dependencies never replaces it.
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /tmp/keep-torch.txt \
 && pip install --constraint /tmp/keep-torch.txt /wheels/*.whl \
 && rm -rf /wheels /tmp/keep-torch.txt \
 && python -I -c "import torch, worker.main, training.trainer; print('torch', torch.__version__)"
RUN useradd --create-home --uid 10001 --user-group ddpm
# The shipped checkpoints are the default models; compose mounts the models folder over them.
COPY checkpoints /models
ENV DDPM_MODELS_DIR=/models DDPM_METRICS_PORT=9100
# By number: a runtime that must prove the user is not root (runAsNonRoot) can.
USER 10001:10001
WORKDIR /home/ddpm
EXPOSE 9100
# The metrics port answers from start-up; /readyz is 200 once the models are loaded, the
# heartbeat is fresh and the worker is not draining (worker/probes.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DDPM_METRICS_PORT', '9100'), timeout=4)"]
ENTRYPOINT ["ddpm"]
CMD ["worker"]
