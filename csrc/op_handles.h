// One typed dispatcher handle per normkernels op, looked up once; the signatures mirror the
// schemas in csrc/ops.cpp. Shared by the autograd kernels (csrc/autograd.cpp) and the Python
// entry points (csrc/python_entry.cpp), which call the ops through the full dispatcher.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace normkernels {
namespace ops {

using at::Tensor;
using Opt = std::optional<Tensor>;
using Mask = std::array<bool, 3>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline const auto& layer_norm_fwd() {
  static auto h = find<Three(const Tensor&, int64_t, const Opt&, const Opt&, double, bool)>(
      "normkernels::layer_norm_fwd");
  return h;
}
inline const auto& layer_norm_bwd() {
  static auto h = find<Three(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Opt&, int64_t, bool, Mask)>("normkernels::layer_norm_bwd");
  return h;
}
inline const auto& group_norm_fwd() {
  static auto h = find<Three(const Tensor&, int64_t, const Opt&, const Opt&, double)>(
      "normkernels::group_norm_fwd");
  return h;
}
inline const auto& group_norm_bwd() {
  static auto h = find<Three(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Opt&, int64_t, Mask)>("normkernels::group_norm_bwd");
  return h;
}
inline const auto& batch_norm_fwd() {
  static auto h = find<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Opt&,
                                                                 const Opt&, double)>(
      "normkernels::batch_norm_fwd");
  return h;
}
inline const auto& batch_norm_infer() {
  static auto h = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Opt&,
                              const Opt&, double)>("normkernels::batch_norm_infer");
  return h;
}
inline const auto& batch_norm_bwd() {
  static auto h = find<Three(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Opt&, bool, Mask)>("normkernels::batch_norm_bwd");
  return h;
}

}  // namespace ops
}  // namespace normkernels
