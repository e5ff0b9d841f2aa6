#!/usr/bin/env bash
# Lossless benchmark: medarchive's codecs next to the plain libraries (ANCHORS.md), plus the ingest rate.
#
#   benchmarks/run_lossless.sh [DATA_DIR] [extra `bench lossless` options, e.g. --repeat 5]
#
# DATA_DIR defaults to ../shared/data (relative to the repository root). Runs the benchmark ONCE with
# --json, keeps the JSON and prints the tables rendered from it (also kept as .txt). Results go to
# benchmarks/results/, which is git-ignored by a .gitignore this script writes inside it: they are
# machine-specific and never committed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${1:-../shared/data}"
shift || true

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
json="$results/lossless-$stamp.json"
text="$results/lossless-$stamp.txt"

"$medarchive" bench lossless "$data" --json "$@" > "$json"
COLUMNS="${COLUMNS:-100}" "$python" - "$json" <<'PY' | tee "$text"
import json
import sys

from rich.console import Console

from archive.bench import print_report

with open(sys.argv[1], encoding="utf-8") as handle:
    print_report(json.load(handle), Console(width=int(__import__("os").environ["COLUMNS"])))
PY
echo "results: $json and $text" >&2
