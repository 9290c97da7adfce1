# swift-api: the API server and the scheduler (`python start.py [all|api|scheduler]`), with ms-swift installed in
# its own virtualenv (/app/.swift-venv) by ./install_all.sh.
#
# Build arguments:
#   DEVICE=cuda (default) | cpu   cuda: torch from PyPI (its Linux wheels are CUDA builds, the driver comes from the
#                                 NVIDIA Container Toolkit); cpu: the CPU build from TORCH_INDEX's default below
#   TORCH_INDEX=<url>             an extra package index for torch (default: none for cuda, the PyTorch CPU index
#                                 for cpu); install_all.sh's pip sees it as PIP_EXTRA_INDEX_URL
#   TORCH_SPEC="torch==2.13.0"    the torch requirement install_all.sh installs first
#   MS_SWIFT_VERSION=4.6.0        the ms-swift version install_all.sh installs
#   APP_UID=1000 APP_GID=1000     the user the server runs as: make them the owner of the host's ./output and ./logs
#                                 (`--build-arg APP_UID=$(id -u) --build-arg APP_GID=$(id -g)`)
# e.g. docker build --build-arg DEVICE=cpu -t swift-api:cpu .
FROM python:3.11-slim

ARG DEVICE=cuda
ARG TORCH_INDEX=""
ARG TORCH_SPEC="torch==2.13.0"
ARG MS_SWIFT_VERSION=4.6.0
# Not UID/GID: bash's own read-only $UID would win over a build argument of that name.
ARG APP_UID=1000
ARG APP_GID=1000

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian's current curl/procps/git of the base image's release: pinning exact versions breaks the build at every
# Debian point release, and the base image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends curl procps git \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --non-unique --gid "$APP_GID" swift \
    && useradd --non-unique --uid "$APP_UID" --gid "$APP_GID" --create-home --shell /bin/bash swift

WORKDIR /app
COPY install_all.sh ./
RUN case "$DEVICE" in \
      cuda) index="$TORCH_INDEX" ;; \
      cpu) index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 1 ;; \
    esac \
    && if [ -n "$index" ]; then export PIP_EXTRA_INDEX_URL="$index"; fi \
    && TORCH_INDEX_URL="$index" MS_SWIFT_VERSION="$MS_SWIFT_VERSION" TORCH_SPEC="$TORCH_SPEC" \
       SWIFT_VENV=/app/.swift-venv ./install_all.sh

COPY pyproject.toml README.md ./
COPY application ./application
COPY start.py ./
COPY env ./env
RUN pip install . \
    && mkdir -p /app/output /app/logs /app/data /app/uploads /cache/modelscope /cache/huggingface \
    && chown -R "$APP_UID:$APP_GID" /app/output /app/logs /app/data /app/uploads /cache

# Hub downloads (a job whose model or data set is a hub id) go to /cache: mount a volume there to keep them.
# Runners cannot outlive their container, so a scheduler stopping in one ends its runs itself, gracefully (back
# in the queue, resumed from their checkpoints): give it the time (`docker stop -t 60`, compose stop_grace_period).
ENV ENVIRONMENT=prod SWIFT_BIN=/app/.swift-venv/bin/swift OUTPUT_ROOT=/app/output LOG_DIR=/app/logs \
    DATA_DIR=/app/data MODELSCOPE_CACHE=/cache/modelscope HF_HOME=/cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility STOP_RUNS_ON_SHUTDOWN=true
USER ${APP_UID}:${APP_GID}
EXPOSE 8000
# The API's health route, under API_PREFIX when it is set in the container's environment (the server's default
# /api/v1 otherwise; an empty API_PREFIX means no prefix). Needs no API key.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["sh", "-c", "p=\"${API_PREFIX-/api/v1}\"; curl -fsS -o /dev/null \"http://127.0.0.1:${APP_PORT:-8000}${p%/}/training/health\" || exit 1"]
CMD ["python", "start.py"]
