# One image for both processes of a pod: `embedding-jobs worker` (the default) and `embedding-jobs exporter`.
# Build: docker build -t embedding-jobs .   Run locally: docker run -p 8080:8080 embedding-jobs up
# Both stages must use the same base: the venv built in the first one points at its Python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the repo out of the context).
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY worker ./worker
COPY exporter ./exporter
COPY embedding_jobs ./embedding_jobs
# Every dependency has a binary wheel for this platform, so neither stage needs a compiler.
# pip compiles .pyc files into the venv here, because the read-only runtime filesystem cannot take them later.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /dist . \
 && /opt/venv/bin/pip install "$(ls /dist/embedding_jobs-*.whl)[azure]"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="embedding-jobs" \
      org.opencontainers.image.description="Embedding worker and its metrics/API exporter" \
      org.opencontainers.image.licenses="MIT"
# A numeric user, so Kubernetes can verify runAsNonRoot; the chart runs as the same ids.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 /var/lib/embedding-jobs
COPY --from=build /opt/venv /opt/venv
# HOME=/tmp: the one writable place when the root filesystem is read-only (the chart mounts an emptyDir there).
# The local SQLite store lives in a fixed folder that the chart mounts a volume on. The exporter listens on
# every interface, because a published container port cannot reach 127.0.0.1 inside the container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    EMBEDDING_JOBS_DATA_DIR=/var/lib/embedding-jobs \
    EMBEDDING_JOBS_EXPORTER_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["embedding-jobs"]
CMD ["worker"]
