# syntax=docker/dockerfile:1
# The one statefn image: `statefn operator`, `statefn gateway`, `statefn sidecar` and
# `statefn serve APP` (the Helm chart and the operator always give an explicit command).
# nats-server and etcd are not in it: they are separate images (or existing clusters).
#
#   docker build -t ghcr.io/statefn/statefn:0.1.0 .
#   docker run --rm ghcr.io/statefn/statefn:0.1.0 --help

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: install the package and its pinned dependencies into a virtualenv ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/statefn
WORKDIR /src
# Only what `pip install .` reads: the project metadata and the five packages' sources.
COPY pyproject.toml README.md ./
COPY core/ core/
COPY sdk/ sdk/
COPY sidecar/ sidecar/
COPY operator/ operator/
COPY cli/ cli/
RUN /opt/statefn/bin/pip install '.[all]' \
 && /opt/statefn/bin/statefn --help > /dev/null
# The examples are importable as `examples.*` (e.g. `statefn serve examples.counter.app:app`).
COPY examples/ /app/examples/
# Byte-compile now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app/examples

# ---- runtime: the virtualenv and the examples, run as an unprivileged user ----------------
FROM ${PYTHON_IMAGE}
# uid/gid 65532 ("nonroot" in distroless images): the chart's and the operator's pod templates
# run as this user (Pod Security "restricted"), so files here must be readable by it.
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/statefn /opt/statefn
COPY --from=build /app /app
ENV PATH=/opt/statefn/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /app
USER 65532:65532
ENTRYPOINT ["statefn"]
CMD ["--help"]
