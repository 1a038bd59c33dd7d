# The consumers-graphql server, as README.md "Running in production" describes it.
# Build: docker build -t consumers-graphql .   Run it with compose.yaml (PostgreSQL, pgbouncer,
# a one-shot migration), or on its own with CONSUMERS_DATABASE_URL and CONSUMERS_KEY_PEPPER set.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONSUMERS_ENV=production

# Optional extras, e.g. --build-arg EXTRAS=otel for OpenTelemetry tracing.
ARG EXTRAS=""
WORKDIR /srv/consumers-graphql
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin consumers

# Never root: the server needs no privilege, and a non-root user cannot write the image.
USER consumers

EXPOSE 8000
# Liveness only (no database I/O): readiness (/readyz) is for the load balancer, which should
# stop sending traffic during an outage without the orchestrator restarting a healthy process.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]

ENTRYPOINT ["consumers-graphql"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
