"""Builds normkernels and its C++ parts against the installed torch: the library of the ops
(normkernels/libnormkernels_ops.so: schemas, CPU kernels, autograd; libtorch only, no Python, so
a C++ process such as AOTInductor's package loader can load it) and the Python module
normkernels._C, which links against it.

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
LINUX = platform.system() == "Linux"
# at::parallel_for is an inline template that only runs in parallel when the including file is
# compiled with OpenMP; the libgomp we link resolves to the one torch already loaded (same
# SONAME), so torch.set_num_threads governs our kernels too.
OPENMP = ["-fopenmp"] if LINUX else []

# Extra flags for the per-capability translation units, keyed by file name.
CAPABILITY_FLAGS = {
    "avx2.cpp": ["-mavx2", "-mfma", "-mf16c"] if X86 else [],
    "avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    if X86
    else [],
}


class BuildWithCapabilities(BuildExtension):
    """BuildExtension that adds per-file SIMD flags and compiles the files in parallel."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def _compiler_accepts(self, flags):
        """Whether the C++ compiler builds an AVX512_BF16 conversion with these flags."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("#include <immintrin.h>\n"
                        "__m512i f(__m512 a, __m512 b) {"
                        " return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(a, b)); }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                return True
            except Exception:  # distutils' CompileError, or a compiler that is not there
                return False

    def get_ext_filename(self, fullname):
        # The ops library is a plain shared library (lib*.so), not a Python module. (distutils
        # asks with the full dotted name, and with its last part alone.)
        if fullname in (OPS_LIBRARY, OPS_LIBRARY.split(".")[-1]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name == OPS_LIBRARY:
            # Without libtorch_python (CppExtension adds it), whose symbols only a Python
            # process has.
            ext.libraries = [lib for lib in ext.libraries if lib != "torch_python"]
            if LINUX:  # the soname is what the module records as its dependency
                ext.extra_link_args = ext.extra_link_args + [
                    "-Wl,-soname," + os.path.basename(self.get_ext_filename(OPS_LIBRARY))]
        elif ext.name == "normkernels._C" and LINUX:
            # Linked against the ops library built just before it, found beside it at run time.
            # (Elsewhere, e.g. macOS, where extensions are bundles that cannot be linked against,
            # the module leaves the library's symbols to the dynamic loader and
            # normkernels/__init__.py loads the library first, with RTLD_GLOBAL.)
            ext.extra_link_args = ext.extra_link_args + [
                self.get_ext_fullpath(OPS_LIBRARY), "-Wl,-rpath,$ORIGIN"]
        super().build_extension(ext)

    def build_extensions(self):
        # AVX512_BF16 (one-instruction fp32 -> bf16) where the compiler has it; the kernels
        # check the CPU for it at run time (csrc/cpu/reductions.h).
        bf16 = ["-mavx512bf16"]
        if X86 and self._compiler_accepts(CAPABILITY_FLAGS["avx512.cpp"] + bf16):
            CAPABILITY_FLAGS["avx512.cpp"] = CAPABILITY_FLAGS["avx512.cpp"] + bf16
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = CAPABILITY_FLAGS.get(os.path.basename(src), [])
            return compile_one(obj, src, ext, cc_args, list(extra_postargs) + extra, pp_opts)

        self.compiler._compile = _compile
        self._compile_sources_in_parallel()
        # One extension after the other (each compiles its sources in parallel): the module
        # links against the ops library, which must be built first.
        self.parallel = 0
        super().build_extensions()

    def _compile_sources_in_parallel(self):
        """distutils compiles an extension's sources one after another (its --parallel builds
        whole extensions side by side, and there is one here), and each capability unit takes a
        minute or more: compile all the sources at once, `parallel` at a time (threads, each
        waiting on its compiler process)."""
        from concurrent.futures import ThreadPoolExecutor

        compiler, jobs = self.compiler, max(1, int(self.parallel or 1))

        def compile_all(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                        extra_preargs=None, extra_postargs=None, depends=None):
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

            def one(obj):
                src, ext = build[obj]
                compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(one, [obj for obj in objects if obj in build]))
            return objects

        compiler.compile = compile_all


OPS_LIBRARY = "normkernels.libnormkernels_ops"
ops_sources = sorted(glob.glob("csrc/*.cpp") + ["csrc/cpu/register.cpp", "csrc/cpu/output_pool.cpp",
                                                "csrc/cpu/stream_stores.cpp"]
                     + glob.glob("csrc/cpu/capability/*.cpp"))
ops_sources.remove("csrc/python_entry.cpp")
# The kernel files and headers are #included by the capability units, so they must be declared:
# otherwise editing them does not trigger a rebuild.
depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/cpu/*.cpp"))
# -ffp-contract=off: a multiply and an add fuse only where the source says so (at::vec::fmadd,
# std::fma), so the kernels' bits follow from their source, not from the compiler's choice
# (GCC contracts by default, and chose differently as unrelated code around changed).
compile_args = {"cxx": ["-O3", "-fno-math-errno", "-ffp-contract=off"] + OPENMP}

setup(
    name="normkernels",
    version="0.1.0",
    description="Fused forward and backward kernels for BatchNorm, GroupNorm, LayerNorm, "
    "InstanceNorm and RMSNorm (C++ on CPU, Triton on GPU), drop-in for torch.nn",
    packages=find_packages(include=["normkernels", "normkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    ext_modules=[
        CppExtension(OPS_LIBRARY, ops_sources, depends=depends, extra_compile_args=compile_args,
                     extra_link_args=OPENMP),
        CppExtension("normkernels._C", ["csrc/python_entry.cpp"], depends=depends,
                     extra_compile_args=compile_args),
    ],
    cmdclass={"build_ext": BuildWithCapabilities.with_options(use_ninja=False)},
    zip_safe=False,
)
