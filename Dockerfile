# CredScope server and telemetry sidecar, one image:
#   docker build -t credscope .
#   docker volume create credscope-data; docker volume create credscope-metrics
#   docker run -d --name credscope -p 50051:50051 \
#     -v credscope-data:/app/data -v credscope-metrics:/app/metrics credscope                 # the server
#   docker run -d --name credscope-telemetry -p 9464:9464 \
#     -v credscope-data:/app/data -v credscope-metrics:/app/metrics \
#     credscope credscope-telemetry serve --host 0.0.0.0 --no-prune                          # the sidecar
#   docker exec credscope credscope-keys create --name demo --tier free                    # an API key
# The two containers share the metrics directory (the sidecar serves what the server workers record) and,
# with the default embedded backends, the SQLite database in /app/data (keys, audit trail). --no-prune:
# the sidecar cannot see the server's process ids from its own container. In production point
# CREDSCOPE_AUTH__KEY_STORE_URL / CREDSCOPE_AUDIT__URL at PostgreSQL and CREDSCOPE_REDIS_URL at Redis.
# TLS: mount certificates and set CREDSCOPE_TLS__CERT_FILE, CREDSCOPE_TLS__KEY_FILE (and
# CREDSCOPE_TLS__CLIENT_CA_FILE for mutual TLS).
# The model is trained at build time on synthetic data (deterministic: the same version every build);
# mount a model store on /app/models to serve another.

FROM python:3.11-slim AS build
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY credscope ./credscope
COPY server ./server
COPY client ./client
COPY telemetry ./telemetry
COPY tools ./tools
RUN pip install . && credscope-train --model-dir /app/models --quiet

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app credscope \
    && mkdir -p /app/data /app/metrics \
    && chown credscope /app/data /app/metrics
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=credscope /app/models /app/models
WORKDIR /app/data
USER credscope
ENV CREDSCOPE_MODEL__MODEL_DIR=/app/models \
    CREDSCOPE_AUTH__KEY_STORE_URL=sqlite:////app/data/credscope.db \
    CREDSCOPE_AUDIT__URL=sqlite:////app/data/credscope.db \
    CREDSCOPE_AUDIT__SPOOL_DIR=/app/data/spool \
    CREDSCOPE_RATE_LIMIT__LOCAL_PATH=/app/data/credscope-ratelimit.buckets \
    CREDSCOPE_TELEMETRY__METRICS_DIR=/app/metrics \
    CREDSCOPE_TELEMETRY__REPORT_DIR=/app/data/reports \
    NUMBA_CACHE_DIR=/app/data/numba-cache
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
CMD ["credscope-server", "--host", "0.0.0.0", "--port", "50051"]
