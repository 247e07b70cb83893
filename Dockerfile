# One stream-counter worker replica. Configure it with STREAM_COUNTER_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY worker ./worker
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin counter

USER 10001:10001
# Healthy while this container's replica says it is alive (its loop goes round): no port
# needed. With STREAM_COUNTER_METRICS_PORT set, probes can use /healthz and /readyz instead.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["stream-counter", "check"]
# Exec form: the worker is PID 1 and receives SIGTERM itself (graceful stop, exit 0).
ENTRYPOINT ["stream-counter", "run"]
