# One image for every role of the batch service (watcher, worker, beat, Flower, migrations).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MEDARCHIVE_HOME=/data
COPY pyproject.toml README.md alembic.ini ./
COPY archive archive
COPY workers workers
COPY migrations migrations
# editable: Alembic's migrations/ stays beside the package it belongs to; torch from its CPU index
# (PyPI's default Linux wheel brings CUDA; an image for a GPU worker uses TORCH_INDEX=.../whl/cu128)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -e '.[flower]'
VOLUME ["/data"]
ENTRYPOINT ["medarchive"]
