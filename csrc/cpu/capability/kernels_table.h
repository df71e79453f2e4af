// Builds the kernel table of the capability this translation unit is compiled for. Each
// capability/*.cpp defines CPU_CAPABILITY (and its CPU_CAPABILITY_* flag, which selects ATen's
// Vectorized implementation) and gets its compiler flags from setup.py.
#pragma once

#include "../batch_norm.cpp"
#include "../convert.cpp"
#include "../group_norm.cpp"
#include "../layer_norm.cpp"

#define NK_CONCAT_(a, b) a##b
#define NK_CONCAT(a, b) NK_CONCAT_(a, b)

namespace normkernels {
namespace cpu {
const Kernels* NK_CONCAT(kernels_, CPU_CAPABILITY)() {
  static const Kernels table{
      &CPU_CAPABILITY::layer_norm_fwd,  &CPU_CAPABILITY::layer_norm_bwd,
      &CPU_CAPABILITY::group_norm_fwd,  &CPU_CAPABILITY::group_norm_bwd,
      &CPU_CAPABILITY::batch_norm_fwd,  &CPU_CAPABILITY::batch_norm_elemt,
      &CPU_CAPABILITY::batch_norm_bwd,  &CPU_CAPABILITY::convert,
  };
  return &table;
}
}  // namespace cpu
}  // namespace normkernels
