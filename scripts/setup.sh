#!/usr/bin/env bash
# Set up a fresh machine: torch (2.13.0 by default: here it resolves to a local CPU build; an
# unpinned torch pulls the CUDA build), the test/bench tools, then normkernels itself, built in
# place against whatever torch is installed. Set TORCH_SPEC="" to keep an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q numpy pytest pytest-xdist pytest-benchmark scikit-learn matplotlib setuptools \
  wheel
# ONNX export (normkernels.onnx) and its tests: the exporter's packages and a runtime to check
# with. Optional: where they cannot be fetched (a GPU machine with no network), the ONNX tests skip.
ONNX_PACKAGES=(onnx onnxscript onnxruntime)
# torch 2.6's exporter was written against onnxscript 0.2: with 0.3-0.6 its version-converter
# pass fails, with 0.7 its translation of an inference batch norm (torch's own BatchNorm2d as
# ours); and onnxscript 0.2 writes boolean attributes that protobuf 7 (beside onnx 1.23) refuses,
# while onnx 1.23, generated for protobuf 6, does not load under protobuf 5. So that torch gets
# the stack of its time: with it all 243 ONNX tests pass there, with the newest 13 failed.
if "$PY" -c "import sys, torch
sys.exit(tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 7))"; then
  ONNX_PACKAGES=(onnx==1.17.0 onnxscript==0.2.7 "protobuf<6" onnxruntime)
fi
"$PY" -m pip install -q "${ONNX_PACKAGES[@]}" \
  || echo "setup.sh: could not install onnx, onnxscript, onnxruntime; the ONNX export tests will skip" >&2
# Triton: the GPU kernels; without a GPU the tests run them under its interpreter.
"$PY" -m pip install -q triton
# Triton's interpreter before 3.7 (the one torch 2.6-2.11's CUDA wheels bring) takes program ids
# as one-element arrays, which NumPy 2.4 no longer turns into ints: every interpreted kernel
# with a loop bound from a program id raises TypeError. Keep NumPy below 2.4 where that
# interpreter is what runs the Triton kernels (no CUDA GPU); where it cannot be fetched (a GPU
# machine with no network needs it not), say so and go on.
if ! "$PY" -c "import sys, torch, triton
sys.exit(not (torch.cuda.is_available() or tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 7)))"; then
  "$PY" -m pip install -q "numpy<2.4" || echo "setup.sh: could not install numpy<2.4, which Triton's interpreter before 3.7 needs" >&2
fi
# --no-build-isolation: build against the installed torch, never a freshly downloaded one.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import normkernels; print('normkernels', normkernels.__version__, 'CPU kernels:', normkernels.cpu_capability())"
