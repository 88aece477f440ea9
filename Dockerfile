# One image for both processes of a pod: `embedding-jobs worker` (the default) and `embedding-jobs exporter`.
# Build: `make image` (podman or docker). Run it, and the chart as a pod: README, "Container image and pod".
# Both stages must use the same base: the venv built in the first one points at its Python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The dependencies first, in a layer of their own: a change to the source leaves it cached. requirements.lock
# (`make lock`) pins every package, the build backend included, with its hashes, so two builds install the
# same files; pip refuses any file whose hash differs.
COPY requirements.lock ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r requirements.lock
# Only what the wheel is built from (.dockerignore keeps the rest of the repo out of the context).
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY worker ./worker
COPY exporter ./exporter
COPY embedding_jobs ./embedding_jobs
# The wheel is built with the locked backend already in the venv (no isolated build fetching an unpinned
# one), installed without its dependencies (the lock has them: `pip check` proves it), and the backend is
# removed again. Every dependency has a binary wheel for this platform, so neither stage needs a compiler.
# pip compiles .pyc files into the venv here, because the read-only runtime filesystem cannot take them later.
RUN /opt/venv/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /dist . \
 && /opt/venv/bin/pip install --no-deps "$(ls /dist/embedding_jobs-*.whl)[azure]" \
 && /opt/venv/bin/pip uninstall --yes setuptools wheel \
 && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE} AS runtime
# The version of pyproject.toml (a test keeps them equal); REVISION: the commit, given at build time.
ARG VERSION=0.1.0
ARG REVISION=""
LABEL org.opencontainers.image.title="embedding-jobs" \
      org.opencontainers.image.description="Embedding worker and its metrics/API exporter" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://git.r-seed-ee91058c.example/embedding-jobs/embedding-jobs" \
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
