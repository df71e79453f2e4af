#!/usr/bin/env bash
# The GPU checks as one prepared run, for a machine with a CUDA GPU (a lent one has 15 minutes in
# all): build against the installed torch, record the GPU, run the tests that need CUDA (the
# Triton kernels compiled for real against torch, autocast, torch.compile), then the benchmark
# suite on the GPU. Writes under $OUT (default bench/results): gpu.txt, cuda-tests.log,
# cuda-bench.log and the bench's cuda.{json,md,png}.
#   BENCH_ARGS  extra arguments of `python -m bench` (default: no torch.compile column, whose
#               per-case compilation would not fit the time; "" to include it)
#   DEVICE      cuda (default); cpu only to try this script where there is no GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS---no-compile}
mkdir -p "$OUT"
start=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - start)) s] $*"; }

stamp "set-up (build against the installed torch)"
TORCH_SPEC="" bash scripts/setup.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
python3 - > "$OUT/gpu.txt" <<'EOF'
import torch, triton, normkernels
print("torch", torch.__version__, "triton", triton.__version__, "normkernels", normkernels.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs", f"sm_{p.major}{p.minor}")
else:
    print("no CUDA device")
EOF
cat "$OUT/gpu.txt"

stamp "tests that need CUDA (tests/test_triton.py)"
python3 -m pytest tests/test_triton.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/cuda-tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

stamp "benchmark suite on $DEVICE ($BENCH_ARGS)"
# shellcheck disable=SC2086
python3 -m bench --device "$DEVICE" $BENCH_ARGS --out "$OUT/$DEVICE" 2>&1 | tee "$OUT/$DEVICE-bench.log" | tail -40
bench_rc=${PIPESTATUS[0]}
stamp "done: tests rc $tests_rc, bench rc $bench_rc"
exit $(( tests_rc || bench_rc ))
