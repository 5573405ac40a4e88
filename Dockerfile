# One image for every segtrain service; the command picks the service:
#   python -m services.pipeline_svc | python -m services.metrics_svc | python -m services.trainer_svc
# The `segtrain` CLI is installed too (e.g. `docker compose exec pipeline segtrain pipelines list`).
#
# torch/torchvision are pinned in requirements.txt. To take CPU-only wheels instead of the default
# CUDA build: docker compose build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app

# Dependencies first: this layer is the slow one and changes least. grpcio-tools generates the
# protobuf code below (the same pin as requirements-dev.txt).
ARG PIP_EXTRA_INDEX_URL=""
COPY requirements.txt ./
RUN pip install -r requirements.txt grpcio-tools==1.85.1

# Generated code (gen/) from the protos, exactly as `make gen` does.
COPY protos ./protos
COPY scripts/gen_protos.py ./scripts/
RUN python scripts/gen_protos.py

# The code, installed editable (as `make setup` does) so `segtrain` and `python -m services.*` work.
COPY pyproject.toml ./
COPY segcore ./segcore
COPY services ./services
COPY clients ./clients
COPY scripts ./scripts
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 segtrain \
    && mkdir -p /app/.segtrain \
    && chown segtrain /app/.segtrain

USER segtrain
# pipeline, metrics, trainer
EXPOSE 50051 50052 50053
CMD ["python", "-m", "services.pipeline_svc"]
