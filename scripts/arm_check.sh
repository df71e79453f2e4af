#!/usr/bin/env bash
# The portable (Arm) build checked on an x86-64 Debian machine, by cross-compiling and emulating:
# Debian's aarch64 cross compiler builds the C++ parts against PyPI's aarch64 CPU wheel of torch
# (its headers and libraries, unpacked, not installed), and Debian's aarch64 Python runs the
# tests under qemu-user with it. ATen's DEFAULT vectors are NEON's there (four fp32 lanes, where
# x86-64's DEFAULT build has eight), so this is the one place the 128-bit paths are exercised.
# No Triton, no torch.compile (inductor would compile for the host): the C++ kernels' tests.
# Needs root for apt (g++-aarch64-linux-gnu, qemu-user-static), Debian's and PyPI's archives.
#   ARM_TORCH   the torch release whose aarch64 wheel builds and runs it (default 2.9.1)
#   ARM_TESTS   the test files (default: parity, ops, functional, transforms, api)
#   WORK        where the sysroot, wheels and build go (default /tmp/arm-check)
set -euo pipefail
cd "$(dirname "$0")/.."
ARM_TORCH=${ARM_TORCH:-2.9.1}
ARM_TESTS=${ARM_TESTS:-tests/test_parity.py tests/test_ops.py tests/test_functional.py tests/test_transforms.py tests/test_api.py}
WORK=${WORK:-/tmp/arm-check}
PY=${PYTHON:-python3}
mkdir -p "$WORK/deb" "$WORK/root" "$WORK/build"

apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static >/dev/null
# Debian's aarch64 Python and the libraries it and torch load, unpacked into a sysroot (installed
# beside the host's Python as multiarch packages they would conflict with it)
dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -q >/dev/null; }
(cd "$WORK/deb" && apt-get download -q libc6:arm64 libpython3.11-minimal:arm64 \
  libpython3.11-stdlib:arm64 python3.11-minimal:arm64 libpython3.11:arm64 libpython3.11-dev:arm64 \
  libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 \
  libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 \
  libgcc-s1:arm64 libstdc++6:arm64 libgomp1:arm64 libdb5.3:arm64 libcrypt1:arm64 libnsl2:arm64 \
  libtirpc3:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 \
  libkrb5support0:arm64 libcom-err2:arm64 libkeyutils1:arm64 media-types 2>/dev/null)
for deb in "$WORK"/deb/*.deb; do dpkg -x "$deb" "$WORK/root"; done
ARM_PY="$WORK/root/usr/bin/python3.11"

# torch for aarch64 (no dependencies: pip would judge their markers by the host), then the
# pure-Python packages it and the tests import
SITE="$WORK/site"
"$PY" -m pip install -q --no-deps --target "$SITE" --platform manylinux_2_28_aarch64 \
  --python-version 3.11 --implementation cp --only-binary=:all: "torch==$ARM_TORCH" numpy
"$PY" -m pip install -q --target "$SITE" typing_extensions sympy networkx jinja2 fsspec filelock \
  pytest

# The ops library and normkernels._C, cross-compiled as setup.py compiles them (every source; the
# x86-64 capability units compile to stubs there): the library from all but python_entry.cpp,
# without libtorch_python, and the module linked against it
TI="$SITE/torch/include"
FLAGS=(-O3 -fno-math-errno -ffp-contract=off -fopenmp -fPIC -Wall
       -I"$TI" -I"$TI/torch/csrc/api/include"
       -I"$WORK/root/usr/include/python3.11" -I"$WORK/root/usr/include"
       -DTORCH_API_INCLUDE_EXTENSION_H)
# the standard torch's own builder would pick (as setup.py leaves it to)
STD=$(grep -o "cpp_flag_prefix + 'c++[0-9]*'" "$SITE/torch/utils/cpp_extension.py" | grep -o "c++[0-9]*" | head -1)
objects=()
for src in csrc/*.cpp csrc/cpu/register.cpp csrc/cpu/output_pool.cpp csrc/cpu/stream_stores.cpp \
           csrc/cpu/capability/*.cpp; do
  obj="$WORK/build/$(echo "$src" | tr / _).o"
  name=libnormkernels_ops
  [ "$src" = csrc/python_entry.cpp ] && name=_C
  aarch64-linux-gnu-g++ -std="$STD" "${FLAGS[@]}" -DTORCH_EXTENSION_NAME=$name -c "$src" -o "$obj" &
  [ "$src" = csrc/python_entry.cpp ] || objects+=("$obj")
done
wait
PKG="$WORK/pkg"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r normkernels tests "$PKG/"
rm -f "$PKG"/normkernels/*.so
aarch64-linux-gnu-g++ -shared -fopenmp "${objects[@]}" -L"$SITE/torch/lib" -lc10 -ltorch_cpu \
  -Wl,-soname,libnormkernels_ops.so -o "$PKG/normkernels/libnormkernels_ops.so"
aarch64-linux-gnu-g++ -shared "$WORK/build/csrc_python_entry.cpp.o" -L"$SITE/torch/lib" -lc10 \
  -ltorch -ltorch_cpu -ltorch_python "$PKG/normkernels/libnormkernels_ops.so" '-Wl,-rpath,$ORIGIN' \
  -o "$PKG/normkernels/_C.cpython-311-aarch64-linux-gnu.so"

# Some tests start sys.executable in a subprocess: have the kernel run aarch64 ELF files through
# qemu (binfmt_misc) where it does not yet; QEMU_LD_PREFIX points every such run at the sysroot.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  [ -e "$BINFMT/register" ] || mount binfmt_misc -t binfmt_misc "$BINFMT"
  echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
    > "$BINFMT/register"
fi
export QEMU_LD_PREFIX="$WORK/root" LD_LIBRARY_PATH="$SITE/torch/lib" PYTHONPATH="$PKG:$SITE"
cd "$PKG"
"$ARM_PY" -c "import platform, torch, normkernels
print(platform.machine(), 'torch', torch.__version__, 'normkernels kernels:', normkernels.cpu_capability())"
# shellcheck disable=SC2086
exec "$ARM_PY" -m pytest $ARM_TESTS -q -p no:cacheprovider -rf
