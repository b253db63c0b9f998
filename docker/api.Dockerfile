# syntax=docker/dockerfile:1
# The HTTP API (`ddpm api`): FastAPI + uvicorn, and no PyTorch, which the API never imports
# (DESIGN.md §2). Build from the repository root:
#
#   docker build -f docker/api.Dockerfile -t ddpm-serve-api .
#   docker run -p 8000:8000 -e DDPM_REDIS_URL=redis://HOST:6379/0 ddpm-serve-api
#
# Every setting is a DDPM_* variable (app/settings.py): DDPM_API_KEYS, DDPM_RATE_LIMIT, ...
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtual environment with the API's dependencies and the project ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The API's share of pyproject.toml's dependencies, in a layer of its own (code changes
# do not reinstall them).
COPY docker/api-requirements.txt ./
RUN pip install -r api-requirements.txt
COPY pyproject.toml README.md ./
COPY app ./app
COPY contract ./contract
COPY ddpm ./ddpm
# --no-deps: pyproject.toml's dependencies include torch, which this image must not have.
# Then prove it with the installed package, not the sources here (-I: the working directory
# is not on sys.path): the app builds, torch is nowhere.
RUN pip install --no-deps . \
 && python -I -c "import importlib.util as u, sys, app.main; app.main.create_app().openapi(); \
assert u.find_spec('torch') is None and 'torch' not in sys.modules, 'torch in the API image'"

# -- runtime: the slim base, the environment, a user without privileges ------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --create-home --uid 10001 --user-group ddpm
COPY --from=build /opt/venv /opt/venv
# By number: a runtime that must prove the user is not root (runAsNonRoot) can.
USER 10001:10001
WORKDIR /home/ddpm
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["ddpm", "api", "--host", "0.0.0.0", "--port", "8000"]
