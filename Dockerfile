# syntax=docker/dockerfile:1
#
# The MIDX sampling service image: `midx-sampler serve` as a non-root user, with a health check.
#
#   docker build -t midx-sampler .                         CPU build of torch (the default)
#   docker build -t midx-sampler:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                                                          CUDA build of torch on a CUDA base image
#   docker build --target loadtest -t midx-sampler:loadtest .
#                                                          the same plus locust and the load test
#
# The install steps are the commands `make install` runs (and so CI, which calls make): a venv, an
# upgraded pip, then `pip install -c constraints.txt '.[EXTRAS]'`. The differences are the extras
# (`server` instead of `dev,loadtest`), a non-editable install, and torch installed first from
# TORCH_INDEX_URL, because PyPI's Linux wheel of torch is the CUDA build. constraints.txt still fixes
# torch's version. There is no Docker engine on the development machines or in CI, so this file
# itself is never built there; tests/deploy/test_manifests.py parses it and lints it with hadolint.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# The PyTorch wheel index to take torch from: .../whl/cpu for the CPU build, .../whl/cuXXX for a CUDA
# build that matches the base image's CUDA version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# A CUDA base image has no Python of its own, so take Debian's or Ubuntu's.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY constraints.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/venv/bin/python -m pip install --quiet -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch
COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
RUN /opt/venv/bin/python -m pip install --quiet -c constraints.txt '.[server]'


FROM ${BASE_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/midx --create-home midx
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MIDX_HOST=0.0.0.0 \
    MIDX_HTTP_PORT=8000 \
    MIDX_GRPC_PORT=50051 \
    MIDX_DEVICE=auto
USER 10001:10001
# State stays in memory unless MIDX_REDIS_URL or MIDX_DATA_DIR is set. For local snapshots without
# Redis, mount a volume at /var/lib/midx and set MIDX_DATA_DIR=/var/lib/midx.
WORKDIR /var/lib/midx
EXPOSE 8000 50051
# The slim image has no curl, so the check uses the venv's Python. It probes loopback because the
# server listens on every interface (MIDX_HOST=0.0.0.0) inside the container.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MIDX_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["midx-sampler"]
CMD ["serve"]


# The load-test image: the runtime plus locust, the GloVe table and the locust scenarios. The
# docker-compose.yml `loadtest` profile runs a locust master and worker from it.
FROM runtime AS loadtest
USER 0:0
COPY --from=build /src /src
COPY loadtest /opt/loadtest
RUN python -m pip install --quiet --no-cache-dir -c /src/constraints.txt '/src[server,loadtest,data]' \
    && rm -rf /src
USER 10001:10001
ENTRYPOINT ["locust", "-f", "/opt/loadtest/locustfile.py"]
CMD ["--help"]
