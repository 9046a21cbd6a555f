# persona runner: `python -m runner` as a non-root user, journal on a volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RUNNER_STATE_PATH=/data/runner.db \
    LOG_FORMAT=json \
    PORT=3070

WORKDIR /app
# Dependencies first, from the lock, so a code change does not reinstall them.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY runner ./runner
RUN pip install --no-cache-dir --no-deps .
# The dated price table stays data beside the code (the installed package does not carry config/).
COPY config/model-prices.json ./config/
ENV MODEL_PRICES_FILE=/app/config/model-prices.json

RUN useradd --system --uid 10001 --home-dir /app runner \
    && mkdir -p /data && chown runner /data
USER runner
VOLUME ["/data"]
# The runner binds loopback by default; in a container the network namespace is the boundary,
# and probes and Prometheus come from outside it, so listen on all of the container's interfaces.
ENV HTTP_HOST=0.0.0.0
EXPOSE 3070

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3070'), timeout=4)"]

# SIGTERM drains in-flight ticks (DRAIN_TIMEOUT_S) and flushes the outbox before exit.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "runner"]
