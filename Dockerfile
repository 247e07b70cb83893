# stream-counter: one worker replica per container. Configure it with STREAM_COUNTER_*
# variables; `docker run IMAGE status` (or produce, get, dlq...) runs another command.

# -- build: the locked dependencies and build backend (every file checked against its hash),
#    then the project, built with that backend (no other download)
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /venv \
    && /venv/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY config ./config
COPY worker ./worker
RUN /venv/bin/pip install --no-deps --no-build-isolation . \
    && /venv/bin/pip uninstall --yes setuptools

# -- final: the virtual environment only, no build tools, no pip cache, a non-root user
FROM python:3.11-slim
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /venv /venv
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin counter
USER 10001:10001
# Healthy while this container's replica says it is alive (its loop goes round): no port
# needed. With STREAM_COUNTER_METRICS_PORT set, probes can use /healthz and /readyz instead.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["stream-counter", "check"]
# Exec form: the worker is PID 1 and receives SIGTERM itself (graceful stop, exit 0).
ENTRYPOINT ["stream-counter"]
CMD ["run"]
