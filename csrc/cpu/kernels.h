// The CPU kernel table. Each kernel file (layer_norm.cpp, group_norm.cpp, batch_norm.cpp) is
// compiled once per CPU capability (capability/*.cpp); register.cpp picks one table at load time
// from what the CPU supports, the way ATen's DispatchStub does.
//
// Kernels take tensors already in the layout they walk (register.cpp decides that) and never
// allocate their outputs: a kernel knows nothing of modules, autograd or layout policy.
//   x, dy, y, dx : the input's dtype; contiguous rows of N elements for layer norm; [N, C, HW] (NCHW) or
//                  [N, HW, C] (channels_last) for group and batch norm.
//   weight, bias : accumulation dtype (fp32, or fp64 for fp64 inputs), contiguous, or undefined;
//                  layer_norm_fwd also takes them in x's own dtype (both the same), and
//                  layer_norm_bwd a weight of x's dtype.
//   dweight/dbias: accumulation dtype; layer_norm_bwd also writes them in x's (both the same).
//   statistics   : accumulation dtype.
// An undefined output tensor means "not requested".
#pragma once

#include <ATen/core/Tensor.h>

namespace normkernels {
namespace cpu {

struct NormShape {  // batch/group norm view of an (N, C, *spatial) tensor
  int64_t N, C, HW;
  bool channels_last;  // memory walks [N, HW, C] instead of [N, C, HW]
};

struct Kernels {
  void (*layer_norm_fwd)(const at::Tensor& x, int64_t N, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, bool rms, at::Tensor& y,
                         at::Tensor& mean, at::Tensor& rstd);
  void (*layer_norm_bwd)(const at::Tensor& dy, const at::Tensor& x, int64_t N,
                         const at::Tensor& mean,
                         const at::Tensor& rstd, const at::Tensor& weight, bool rms,
                         at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias);
  void (*group_norm_fwd)(const at::Tensor& x, const NormShape& s, int64_t num_groups,
                         const at::Tensor& weight, const at::Tensor& bias, double eps,
                         at::Tensor& y, at::Tensor& mean, at::Tensor& rstd);
  void (*group_norm_bwd)(const at::Tensor& dy, const at::Tensor& x, const NormShape& s,
                         int64_t num_groups, const at::Tensor& mean, const at::Tensor& rstd,
                         const at::Tensor& weight, at::Tensor& dx, at::Tensor& dweight,
                         at::Tensor& dbias);
  // Training forward: batch statistics (mean, 1/sqrt(var + eps), biased var), then y.
  void (*batch_norm_fwd)(const at::Tensor& x, const NormShape& s, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor& mean,
                         at::Tensor& invstd, at::Tensor& var);
  // y = (x - center[c]) * scale[c] + shift[c] with given per-channel coefficients (inference):
  // coef is [3, C] of the accumulation type, rows center, scale, shift.
  void (*batch_norm_elemt)(const at::Tensor& x, const NormShape& s, const at::Tensor& coef,
                           at::Tensor& y);
  // train=false: statistics were constants (inference), so dx has no mean/variance terms.
  void (*batch_norm_bwd)(const at::Tensor& dy, const at::Tensor& x, const NormShape& s,
                         const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& weight, bool train, at::Tensor& dx,
                         at::Tensor& dweight, at::Tensor& dbias);
  // out = in converted to out's dtype, element by element (both contiguous, same numel).
  void (*convert)(const at::Tensor& in, at::Tensor& out);
};

// Whether an elementwise pass touching `bytes` of memory (what it reads plus what it writes)
// writes its output with streaming (non-temporal) stores: each output line then costs one write
// to memory instead of a read for ownership and a write (a third of a forward pass's traffic),
// and the output does not push the pass's inputs out of the cache. Yes past seven eighths of the
// last-level cache for a forward pass, past half of it for a backward pass (see
// stream_stores.cpp); passes that fit store plainly, so the next layer finds their output in
// cache.
// NORMKERNELS_STREAM_STORES=0/1 forces it off/on (read once); the cache size comes from the OS,
// counted at most 32 MiB, and a backward pass's half no less than that cap where the OS reports
// far more (none known: never).
enum class Pass { kForward, kBackward };
bool stream_stores(int64_t bytes, Pass pass);

// One table per capability; the ones not compiled for this platform return nullptr.
const Kernels* kernels_DEFAULT();
const Kernels* kernels_AVX2();
const Kernels* kernels_AVX512();

}  // namespace cpu
}  // namespace normkernels
