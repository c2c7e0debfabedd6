# CredScope server and telemetry sidecar, one image:
#   docker build -t credscope .
#   docker run -p 50051:50051 credscope                                    # the server
#   docker run -p 9464:9464 credscope credscope-telemetry --host 0.0.0.0    # the sidecar
# The model is trained at build time on synthetic data (deterministic: same version every build);
# mount a model store on /app/models to serve another.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
COPY setup.cfg pyproject.toml README.md ./
COPY credscope ./credscope
COPY server ./server
COPY client ./client
COPY telemetry ./telemetry
COPY tools ./tools
RUN pip install . && credscope-train --model-dir /app/models --quiet
RUN useradd --system --uid 10001 credscope && mkdir -p /app/data /app/spool /app/metrics \
    && chown -R credscope /app/data /app/spool /app/metrics
USER credscope
ENV CREDSCOPE_MODEL__MODEL_DIR=/app/models \
    CREDSCOPE_AUTH__KEY_STORE_URL=sqlite:////app/data/credscope.db \
    CREDSCOPE_AUDIT__URL=sqlite:////app/data/credscope.db \
    CREDSCOPE_AUDIT__SPOOL_DIR=/app/spool
EXPOSE 50051 9464
CMD ["credscope-server", "--host", "0.0.0.0", "--port", "50051"]
