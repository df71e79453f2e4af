#!/usr/bin/env bash
# The main job, from a fresh machine: set up (torch, tools, normkernels built in place), then run
# the benchmark suite: table on stdout; JSON, markdown and PNG under bench/results/.
# Arguments go to `python -m bench` (e.g. --quick, --dtype bfloat16, --filter layer_norm).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m bench "$@"
