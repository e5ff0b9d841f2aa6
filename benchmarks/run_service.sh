#!/usr/bin/env bash
# Service throughput (studies/hour, instances/s; Redis and embedded broker; 1 and 2 worker processes): see benchmarks/README.md.
cd "$(dirname "${BASH_SOURCE[0]}")/.." && exec .venv/bin/python benchmarks/service_bench.py "$@"
