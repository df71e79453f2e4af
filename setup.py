"""Builds normkernels and its C++ extension normkernels._C against the installed torch.

The CPU kernels are compiled once per SIMD capability (csrc/cpu/capability/*.cpp), each with its
own flags, and the best one the CPU supports is chosen when the library loads, as ATen does.
Nothing is built with -march=native, so a wheel built here runs on any x86-64 or Arm CPU.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

X86 = platform.machine().lower() in ("x86_64", "amd64")
# at::parallel_for is an inline template that only runs in parallel when the including file is
# compiled with OpenMP; the libgomp we link resolves to the one torch already loaded (same
# SONAME), so torch.set_num_threads governs our kernels too.
OPENMP = ["-fopenmp"] if platform.system() == "Linux" else []

# Extra flags for the per-capability translation units, keyed by file name.
CAPABILITY_FLAGS = {
    "avx2.cpp": ["-mavx2", "-mfma", "-mf16c"] if X86 else [],
    "avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    if X86
    else [],
}


class BuildWithCapabilities(BuildExtension):
    """BuildExtension that adds per-file SIMD flags and compiles files in parallel."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = CAPABILITY_FLAGS.get(os.path.basename(src), [])
            return compile_one(obj, src, ext, cc_args, list(extra_postargs) + extra, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


sources = sorted(glob.glob("csrc/*.cpp") + ["csrc/cpu/register.cpp", "csrc/cpu/output_pool.cpp",
                                            "csrc/cpu/stream_stores.cpp"]
                 + glob.glob("csrc/cpu/capability/*.cpp"))

setup(
    name="normkernels",
    version="0.1.0",
    description="Fused forward and backward kernels for BatchNorm, GroupNorm, LayerNorm, "
    "InstanceNorm and RMSNorm (C++ on CPU, Triton on GPU), drop-in for torch.nn",
    packages=find_packages(include=["normkernels", "normkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    ext_modules=[
        CppExtension(
            "normkernels._C",
            sources,
            # The kernel files and headers are #included by the capability units, so they must
            # be declared: otherwise editing them does not trigger a rebuild.
            depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fno-math-errno"] + OPENMP},
            extra_link_args=OPENMP,
        )
    ],
    cmdclass={"build_ext": BuildWithCapabilities.with_options(use_ninja=False)},
    zip_safe=False,
)
