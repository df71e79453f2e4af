// Every normkernels op schema, defined once. The ops are functional (they return new tensors and
// mutate nothing); running-statistics updates happen in normkernels.functional.
//
// Statistics are fp32 (fp64 for fp64 inputs). Backward ops take an output mask and return an
// empty tensor for every output not asked for.
//
// This file and the kernels (csrc/cpu/, csrc/autograd.cpp) make the library of the ops,
// normkernels/libnormkernels_ops.so, which needs libtorch and nothing of Python: a process
// without Python (AOTInductor's C++ package loader) loads it to run our ops. The Python module
// normkernels._C (csrc/python_entry.cpp) links against it.
#include <torch/library.h>

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
