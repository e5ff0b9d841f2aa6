# One image for every role of the batch service (watcher, worker, beat, Flower, migrations).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MEDARCHIVE_HOME=/data
COPY pyproject.toml README.md alembic.ini ./
COPY archive archive
COPY workers workers
COPY migrations migrations
# editable: Alembic's migrations/ stays beside the package it belongs to
RUN pip install --no-cache-dir -e '.[flower]'
VOLUME ["/data"]
ENTRYPOINT ["medarchive"]
