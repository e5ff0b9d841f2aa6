#!/usr/bin/env bash
# Lossless benchmark: medarchive's codecs next to the plain libraries (ANCHORS.md), plus the ingest rate.
#
#   benchmarks/run_lossless.sh [DATA_DIR] [extra lossless_bench.py options, e.g. --repeat 5]
#
# DATA_DIR defaults to ../shared/data (relative to the repository root). Runs benchmarks/lossless_bench.py ONCE
# with --json, keeps the JSON and prints the tables rendered from it (also kept as .txt). The reference figures
# come from benchmarks/anchors.toml. Results go to benchmarks/results/, which is git-ignored by a .gitignore this
# script writes inside it: they are machine-specific and never committed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${1:-../shared/data}"
shift || true

if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

results=benchmarks/results
mkdir -p "$results"
[[ -f "$results/.gitignore" ]] || printf '*\n' > "$results/.gitignore"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
json="$results/lossless-$stamp.json"
text="$results/lossless-$stamp.txt"

"$python" benchmarks/lossless_bench.py "$data" --json "$@" > "$json"
COLUMNS="${COLUMNS:-100}" "$python" benchmarks/lossless_bench.py --render "$json" | tee "$text"
echo "results: $json and $text" >&2
