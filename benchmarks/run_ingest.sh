#!/usr/bin/env bash
# Ingest benchmark: `medarchive ingest` (1 process and one per core) next to a bare single-core Python loop doing
# the same codec work, on the same files, in one run; on the embedded SQLite and, when it answers, on PostgreSQL.
#
#   benchmarks/run_ingest.sh [DATA_DIR] [extra `medarchive bench ingest` options, e.g. --repeat 3 --jobs 2]
#
# DATA_DIR defaults to ../shared/data (relative to the repository root). The PostgreSQL server is
# $MEDARCHIVE_BENCH_POSTGRES_URL, else $MEDARCHIVE_TEST_POSTGRES_URL (as the tests), else
# postgresql+psycopg://postgres@127.0.0.1:5432/postgres; each run creates its own database there and drops it.
# Each run's JSON is kept under benchmarks/results/ (git-ignored: machine-specific) and its table printed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${1:-../shared/data}"
shift || true
postgres="${MEDARCHIVE_BENCH_POSTGRES_URL:-${MEDARCHIVE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}}"

if [[ -x .venv/bin/medarchive ]]; then
    medarchive=.venv/bin/medarchive
    python=.venv/bin/python
else
    medarchive=medarchive
    python=python3
fi

results=benchmarks/results
mkdir -p "$results"
[[ -f "$results/.gitignore" ]] || printf '*\n' > "$results/.gitignore"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"

run() {  # run NAME [options...]: JSON kept, table printed from it
    local json="$results/ingest-$1-$stamp.json"
    shift
    "$medarchive" bench ingest "$data" --json "$@" > "$json"
    COLUMNS="${COLUMNS:-110}" "$python" - "$json" <<'PY' | tee "${json%.json}.txt"
import json
import os
import sys

from rich.console import Console

from archive.bench import print_ingest_benchmark

with open(sys.argv[1], encoding="utf-8") as handle:
    print_ingest_benchmark(json.load(handle), Console(width=int(os.environ["COLUMNS"])))
PY
    echo "results: $json" >&2
}

run sqlite "$@"

if "$python" - "$postgres" <<'PY'
import sys

import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1], connect_args={"connect_timeout": 3})
try:
    with engine.connect():
        pass
except Exception as exc:
    print(f"PostgreSQL not reachable ({type(exc).__name__}): SQLite only", file=sys.stderr)
    sys.exit(1)
finally:
    engine.dispose()
PY
then
    echo
    run postgresql --database-url "$postgres" "$@"
fi
