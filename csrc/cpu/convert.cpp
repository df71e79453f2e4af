// Elementwise dtype conversion of small contiguous tensors (parameters and their gradients),
// CPU. Compiled per capability like the norm kernels: there fp16 <-> fp32 is one F16C
// instruction an element (and the loops vectorize), where the baseline build register.cpp is
// compiled for converts fp16 in software. A 1x768 fp16 layer-norm backward with fp16 weight
// converts three such vectors (weight in, dweight and dbias out): 12.6 us a call against 5.2 us
// with fp32 weight, before this kernel. Rounds as to() does (nearest even).
// Included by capability/*.cpp, never compiled on its own.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace normkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

void convert(const at::Tensor& in, at::Tensor& out) {
  const int64_t n = in.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "convert", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "convert", [&] {
      const scalar_t* p = in.const_data_ptr<scalar_t>();
      // through fp32 (fp64 where either side is fp64): exact for every pair but fp64 -> 16-bit,
      // which rounds once from fp64 to fp32 first, as to() does
      using wide_t = std::conditional_t<std::is_same_v<scalar_t, double> ||
                                            std::is_same_v<out_t, double>,
                                        double, float>;
      if constexpr (std::is_same_v<wide_t, float>) {
        at::vec::convert(p, o, n);  // vectorized for fp32 -> fp16/bf16 (dweight, dbias)
      } else {
        for (int64_t i = 0; i < n; ++i) o[i] = static_cast<out_t>(static_cast<wide_t>(p[i]));
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace normkernels
