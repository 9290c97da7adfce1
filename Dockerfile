# swift-api: the API server, with ms-swift installed in its own virtualenv (/app/.swift-venv).
# Build with a CUDA torch for GPU hosts (the default), or a CPU one: --build-arg TORCH_SPEC="torch==2.13.0"
# and --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG MS_SWIFT_VERSION=4.6.0
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends curl procps git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY install_all.sh ./
RUN MS_SWIFT_VERSION="$MS_SWIFT_VERSION" TORCH_SPEC="$TORCH_SPEC" SWIFT_VENV=/app/.swift-venv ./install_all.sh

COPY pyproject.toml README.md ./
COPY application ./application
COPY start.py ./
COPY env ./env
RUN pip install .

ENV ENVIRONMENT=prod SWIFT_BIN=/app/.swift-venv/bin/swift OUTPUT_ROOT=/app/output LOG_DIR=/app/logs
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD curl -fsS http://localhost:8000/api/v1/training/health || exit 1
CMD ["python", "start.py"]
