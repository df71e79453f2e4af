#!/usr/bin/env bash
# The GPU checks as one prepared run, for a machine with a CUDA GPU (a lent one has 15 minutes in
# all, so every stage has a time cap and writes its log as it goes): build the extension in place
# against the installed torch (no pip: such a machine may have no network), record the GPU, run
# the tests that need CUDA (tests/test_triton.py, and the parity suite on CUDA tensors: the
# Triton kernels compiled for real against torch's CUDA kernels, autocast, torch.compile), the
# benchmark suite on the GPU, then a kernel-by-kernel profile of a few cases. Writes under $OUT
# (default bench/results), eight files at most: gpu.txt, build.log, cuda-tests.log,
# cuda-bench.log, the bench's cuda.{json,md,png} and profile.txt.
#   BENCH_ARGS  extra arguments of `python -m bench` (default: no torch.compile column, whose
#               per-case compilation would not fit the time, and 9 rounds a case)
#   TEST_JOBS   pytest-xdist workers for the tests (default 8; 0 runs them in one process)
#   DEVICE      cuda (default); cpu only to try this script where there is no GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS---no-compile --rounds 9}
TEST_JOBS=${TEST_JOBS:-8}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
start=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - start)) s] $*"; }

stamp "build (in place, against the installed torch)"
timeout 300 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
stamp "built"
{
  "$PY" - <<'EOF'
import torch, triton, normkernels
print("torch", torch.__version__, "triton", triton.__version__, "normkernels", normkernels.__version__,
      "cpu kernels", normkernels.cpu_capability())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs", f"sm_{p.major}{p.minor}")
else:
    print("no CUDA device")
EOF
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

stamp "tests that need CUDA"
jobs=()
if [ "$TEST_JOBS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then jobs=(-n "$TEST_JOBS"); fi
timeout 300 "$PY" -m pytest tests/test_triton.py tests/test_parity.py -k "cuda or test_triton" \
  -q -rs -p no:cacheprovider "${jobs[@]}" > "$OUT/cuda-tests.log" 2>&1
tests_rc=$?
grep -E "FAILED|ERROR|passed|failed" "$OUT/cuda-tests.log" | tail -25

stamp "benchmark suite on $DEVICE ($BENCH_ARGS)"
# shellcheck disable=SC2086
timeout 330 "$PY" -m bench --device "$DEVICE" $BENCH_ARGS --out "$OUT/$DEVICE" > "$OUT/$DEVICE-bench.log" 2>&1
bench_rc=$?
tail -45 "$OUT/$DEVICE-bench.log"

if [ "$DEVICE" = cuda ]; then
  stamp "profile"
  timeout 90 "$PY" scripts/gpu_profile.py > "$OUT/profile.txt" 2>&1
  head -c 6000 "$OUT/profile.txt"
fi
stamp "done: tests rc $tests_rc, bench rc $bench_rc"
exit $(( tests_rc || bench_rc ))
