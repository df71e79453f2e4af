// Every normkernels op schema, defined once. The ops are functional (they return new tensors and
// mutate nothing); running-statistics updates happen in normkernels.functional.
//
// Statistics are fp32 (fp64 for fp64 inputs). Backward ops take an output mask and return an
// empty tensor for every output not asked for.
//
// Also the Python module normkernels._C itself: importing it loads this library (and so these
// registrations); it exposes cpu_capability(), the output pool's controls and the eager fast
// path of normkernels.functional (csrc/python_entry.cpp).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/output_pool.h"

namespace normkernels {
const char* cpu_capability_name();     // register.cpp
int add_python_entries(PyObject* module);  // python_entry.cpp
}

TORCH_LIBRARY(normkernels, m) {
  // Layer norm over the last `normalized_ndim` dims; rms=True is RMSNorm (no centering; mean
  // comes back empty). Returns (y, mean, rstd), the statistics shaped as torch's native_layer_norm
  // shapes them: x's leading dims, then a 1 for each normalized dim.
  m.def(
      "layer_norm_fwd(Tensor x, int normalized_ndim, Tensor? weight, Tensor? bias, float eps, "
      "bool rms) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "int normalized_ndim, bool rms, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Group norm of an (N, C, *) tensor; InstanceNorm is num_groups == C. Returns (y, mean, rstd),
  // statistics shaped [N, num_groups].
  m.def(
      "group_norm_fwd(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "int num_groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Batch norm with batch statistics (training). Returns (y, mean, invstd, var), var biased;
  // statistics shaped [C].
  m.def(
      "batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // Batch norm with given per-channel statistics (inference, or InstanceNorm with running
  // statistics): (x - mean) / sqrt(var + eps) * w + b.
  m.def(
      "batch_norm_infer(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "float eps) -> Tensor");
  // train=False: mean/invstd were constants (inference statistics).
  m.def(
      "batch_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "bool train, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

static PyObject* nk_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(normkernels::cpu_capability_name());
}

static PyObject* nk_empty_cpu_cache(PyObject*, PyObject*) {
  size_t freed = 0;
  Py_BEGIN_ALLOW_THREADS freed = normkernels::cpu::empty_cpu_cache();
  Py_END_ALLOW_THREADS return PyLong_FromSize_t(freed);
}

static PyObject* nk_cached_cpu_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(normkernels::cpu::cached_cpu_bytes());
}

static PyMethodDef nk_methods[] = {
    {"cpu_capability", nk_cpu_capability, METH_NOARGS,
     "The SIMD build of the CPU kernels chosen for this CPU: DEFAULT, AVX2 or AVX512."},
    {"empty_cpu_cache", nk_empty_cpu_cache, METH_NOARGS,
     "Frees the idle blocks of the CPU output pool; returns the bytes given back."},
    {"cached_cpu_bytes", nk_cached_cpu_bytes, METH_NOARGS,
     "Bytes of freed outputs the CPU pool holds for reuse."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef nk_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nk_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&nk_module);
  if (module != nullptr && normkernels::add_python_entries(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
