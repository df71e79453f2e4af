// Autograd for the normkernels forward ops, registered in C++ on the Autograd key.
//
// Why C++ and not torch.library.register_autograd: the Python autograd wrapper costs ~6 us a
// call (measured: 10.0 us vs 4.3 us for a 1x768 layer norm, torch's whole call being 2.9 us),
// which dominates small and batch-1 inputs. torch.compile traces these kernels like torch's own
// (AOTAutograd runs them on fake tensors), and opcheck sees them registered.
//
// Each forward's backward is our own backward op, called below the autograd keys (it has no
// autograd formula, and passing through autograd's not-implemented fallback cost 1.5-2 us a
// backward: 2x8x2x2 bf16 batch norm 27.6-28.2 -> 25.9-26.8 us, torch 25.9-26.7); mean/rstd
// (and var) outputs are non-differentiable. Double backward (a backward run with create_graph=True, as in gradient
// penalties) recomputes the forward from elementary differentiable ATen ops (mean, var,
// rsqrt; never an ATen norm op) and differentiates that, so higher-order gradients are exact;
// first-order backward always runs our kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

namespace normkernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ops::Mask;
using ops::Opt;
using ops::Three;

Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : Opt(); }
Tensor value(const Opt& t) { return t.has_value() ? *t : Tensor(); }

// Autograd numbers only the defined tensor arguments ("edges"), in argument order. `first` is
// the edge of the first optional parameter; returns {needs weight grad, needs bias grad}.
std::pair<bool, bool> param_needs(AutogradContext* ctx, size_t first, bool has_w, bool has_b) {
  size_t e = first;
  const bool w = has_w && ctx->needs_input_grad(e++);
  const bool b = has_b && ctx->needs_input_grad(e);
  return {w, b};
}

Tensor if_(bool wanted, const Tensor& t) { return wanted ? t : Tensor(); }

// What every forward here saves, in this order (undefined where absent): x, weight, the two
// statistics its backward reads, bias; and has_b and eps. `stats_out` are the forward's
// statistics outputs, non-differentiable (see no_input_grads).
void save_inputs(AutogradContext* ctx, const Tensor& x, const Opt& w, const Tensor& stat0,
                 const Tensor& stat1, const Opt& b, double eps,
                 const variable_list& stats_out) {
  ctx->save_for_backward({x, value(w), stat0, stat1, value(b)});
  ctx->saved_data["has_b"] = b.has_value() && b->defined();
  ctx->saved_data["eps"] = eps;
  if (!stats_out.empty()) {
    ctx->mark_non_differentiable(stats_out);
    ctx->set_materialize_grads(false);
  }
}

// What a backward starts from: the tensors save_inputs saved, and which of x, weight and bias
// need gradients (`w_edge`: weight's edge, see param_needs).
std::pair<variable_list, Mask> saved_inputs(AutogradContext* ctx, size_t w_edge) {
  variable_list s = ctx->get_saved_variables();
  const auto [nw, nb] = param_needs(ctx, w_edge, s[1].defined(), ctx->saved_data["has_b"].toBool());
  return {std::move(s), Mask{ctx->needs_input_grad(0), nw, nb}};
}

// The statistics outputs are non-differentiable, so their incoming gradients are always
// undefined; ctx->set_materialize_grads(false) keeps autograd from allocating a zero tensor for
// each of them on every backward (BN 2x8x2x2 bf16 backward: 31.0 -> 29-30 us; torch's own takes
// 26-27). The output's own gradient is then undefined only if nothing reached it.
variable_list no_input_grads(size_t inputs) { return variable_list(inputs); }

// Gradients of `y = forward(x, w, b)` for the inputs the mask asks for, as a differentiable
// graph: used when the backward itself is being recorded (create_graph=True).
template <typename Forward>
std::array<Tensor, 3> differentiable_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                                           const Tensor& b, const Mask& mask, Forward forward) {
  const std::array<Tensor, 3> inputs{x, w, b};
  std::vector<Tensor> wrt;
  for (int i = 0; i < 3; ++i)
    if (mask[i] && inputs[i].defined()) wrt.push_back(inputs[i]);
  std::array<Tensor, 3> out;
  if (wrt.empty()) return out;
  const Tensor y = forward(x, w, b);
  const auto grads = torch::autograd::grad({y}, wrt, {dy}, /*retain_graph=*/true,
                                           /*create_graph=*/true, /*allow_unused=*/true);
  size_t k = 0;
  for (int i = 0; i < 3; ++i)
    if (mask[i] && inputs[i].defined()) out[i] = grads[k++];
  return out;
}

Tensor affine(Tensor y, const Tensor& w, const Tensor& b) {
  if (w.defined()) y = y * w;
  if (b.defined()) y = y + b;
  return y;
}

// Biased variance and its reciprocal square root over `dims`, from elementary ops.
std::pair<Tensor, Tensor> centered_rstd(const Tensor& x, at::IntArrayRef dims, double eps,
                                        bool center) {
  const Tensor xc = center ? x - x.mean(dims, /*keepdim=*/true) : x;
  return {xc, (xc.pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt()};
}

std::vector<int64_t> channel_dims(const Tensor& x) {  // every dim but the channel dim 1
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

Tensor channel_view(const Tensor& p, const Tensor& x) {  // [C] -> [1, C, 1, ...]
  if (!p.defined()) return p;
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return p.view(shape);
}

// True when this call records no graph: then the kernels below call the op directly, skipping
// the autograd node and its saved state (the inference fast path, ~1.5 us a call).
bool no_graph(std::initializer_list<const Tensor*> ts, std::initializer_list<const Opt*> opts) {
  if (!at::GradMode::is_enabled()) return true;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return false;
  for (const Opt* t : opts)
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) return false;
  return true;
}

// ---------------------------------------------------------------- layer norm / RMS norm

class LayerNormFn : public torch::autograd::Function<LayerNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t ndim, const Opt& w,
                               const Opt& b, double eps, bool rms) {
    const auto& fwd = ops::layer_norm_fwd();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = fwd.call(x, ndim, w, b, eps, rms);
    save_inputs(ctx, x, w, mean, rstd, b, eps, {mean, rstd});
    ctx->saved_data["ndim"] = ndim;
    ctx->saved_data["rms"] = rms;
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return no_input_grads(6);
    const auto& bwd = ops::layer_norm_bwd();
    const auto [s, mask] = saved_inputs(ctx, 1);
    const int64_t ndim = ctx->saved_data["ndim"].toInt();
    const bool rms = ctx->saved_data["rms"].toBool();
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      std::vector<int64_t> dims;
      for (int64_t d = s[0].dim() - ndim; d < s[0].dim(); ++d) dims.push_back(d);
      auto g = differentiable_grads(grads[0], s[0], s[1], s[4], mask,
                                    [&](const Tensor& x, const Tensor& w, const Tensor& b) {
                                      auto [xc, rstd] = centered_rstd(x, dims, eps, !rms);
                                      return affine(xc * rstd, w, b);
                                    });
      return {g[0], Tensor(), g[1], g[2], Tensor(), Tensor()};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = bwd.call(grads[0], s[0], s[2], s[3], opt(s[1]), ndim, rms, mask);
    return {if_(mask[0], dx), Tensor(), if_(mask[1], dw), if_(mask[2], db), Tensor(), Tensor()};
  }
};

Three layer_norm_fwd(const Tensor& x, int64_t ndim, const Opt& w, const Opt& b, double eps,
                     bool rms) {
  if (no_graph({&x}, {&w, &b})) {
    const auto& fwd = ops::layer_norm_fwd();
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd.call(x, ndim, w, b, eps, rms);
  }
  auto out = LayerNormFn::apply(x, ndim, w, b, eps, rms);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------- group norm / instance norm

class GroupNormFn : public torch::autograd::Function<GroupNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t groups,
                               const Opt& w, const Opt& b, double eps) {
    const auto& fwd = ops::group_norm_fwd();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = fwd.call(x, groups, w, b, eps);
    save_inputs(ctx, x, w, mean, rstd, b, eps, {mean, rstd});
    ctx->saved_data["groups"] = groups;
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return no_input_grads(5);
    const auto& bwd = ops::group_norm_bwd();
    const auto [s, mask] = saved_inputs(ctx, 1);
    const int64_t groups = ctx->saved_data["groups"].toInt();
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      auto g = differentiable_grads(grads[0], s[0], s[1], s[4], mask,
                                    [&](const Tensor& x, const Tensor& w, const Tensor& b) {
                                      const Tensor xg = x.reshape({x.size(0), groups, -1});
                                      auto [xc, rstd] = centered_rstd(xg, {2}, eps, true);
                                      return affine((xc * rstd).view(x.sizes()),
                                                    channel_view(w, x), channel_view(b, x));
                                    });
      return {g[0], Tensor(), g[1], g[2], Tensor()};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = bwd.call(grads[0], s[0], s[2], s[3], opt(s[1]), groups, mask);
    return {if_(mask[0], dx), Tensor(), if_(mask[1], dw), if_(mask[2], db), Tensor()};
  }
};

Three group_norm_fwd(const Tensor& x, int64_t groups, const Opt& w, const Opt& b, double eps) {
  if (no_graph({&x}, {&w, &b})) {
    const auto& fwd = ops::group_norm_fwd();
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd.call(x, groups, w, b, eps);
  }
  auto out = GroupNormFn::apply(x, groups, w, b, eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------- batch norm

class BatchNormFn : public torch::autograd::Function<BatchNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Opt& w, const Opt& b,
                               double eps) {
    const auto& fwd = ops::batch_norm_fwd();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd, var] = fwd.call(x, w, b, eps);
    save_inputs(ctx, x, w, mean, invstd, b, eps, {mean, invstd, var});
    return {y, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return no_input_grads(4);
    const auto& bwd = ops::batch_norm_bwd();
    const auto [s, mask] = saved_inputs(ctx, 1);
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      auto g = differentiable_grads(grads[0], s[0], s[1], s[4], mask,
                                    [&](const Tensor& x, const Tensor& w, const Tensor& b) {
                                      auto [xc, rstd] = centered_rstd(x, channel_dims(x), eps, true);
                                      return affine(xc * rstd, channel_view(w, x),
                                                    channel_view(b, x));
                                    });
      return {g[0], g[1], g[2], Tensor()};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = bwd.call(grads[0], s[0], s[2], s[3], opt(s[1]), /*train=*/true, mask);
    return {if_(mask[0], dx), if_(mask[1], dw), if_(mask[2], db), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_fwd(const Tensor& x, const Opt& w,
                                                          const Opt& b, double eps) {
  if (no_graph({&x}, {&w, &b})) {
    const auto& fwd = ops::batch_norm_fwd();
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd.call(x, w, b, eps);
  }
  auto out = BatchNormFn::apply(x, w, b, eps);
  return {out[0], out[1], out[2], out[3]};
}

// Inference statistics are constants: no gradient flows to mean/var.
class BatchNormInferFn : public torch::autograd::Function<BatchNormInferFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean,
                               const Tensor& var, const Opt& w, const Opt& b, double eps) {
    const auto& fwd = ops::batch_norm_infer();
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = fwd.call(x, mean, var, w, b, eps);
    save_inputs(ctx, x, w, mean, var, b, eps, {});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& bwd = ops::batch_norm_bwd();
    const auto [s, mask] = saved_inputs(ctx, 3);
    const auto stats = s[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor invstd = s[3].to(stats).add(ctx->saved_data["eps"].toDouble()).rsqrt_();
    if (at::GradMode::is_enabled()) {
      const Tensor m = channel_view(s[2].to(stats), s[0]), r = channel_view(invstd, s[0]);
      auto g = differentiable_grads(grads[0], s[0], s[1], s[4], mask,
                                    [&](const Tensor& x, const Tensor& w, const Tensor& b) {
                                      return affine((x - m) * r, channel_view(w, x),
                                                    channel_view(b, x));
                                    });
      return {g[0], Tensor(), Tensor(), g[1], g[2], Tensor()};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = bwd.call(grads[0], s[0], s[2], invstd, opt(s[1]), /*train=*/false, mask);
    return {if_(mask[0], dx), Tensor(), Tensor(), if_(mask[1], dw), if_(mask[2], db), Tensor()};
  }
};

Tensor batch_norm_infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Opt& w,
                        const Opt& b, double eps) {
  if (no_graph({&x}, {&w, &b})) {
    const auto& fwd = ops::batch_norm_infer();
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd.call(x, mean, var, w, b, eps);
  }
  return BatchNormInferFn::apply(x, mean, var, w, b, eps)[0];
}

}  // namespace
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, Autograd, m) {
  m.impl("layer_norm_fwd", &normkernels::layer_norm_fwd);
  m.impl("group_norm_fwd", &normkernels::group_norm_fwd);
  m.impl("batch_norm_fwd", &normkernels::batch_norm_fwd);
  m.impl("batch_norm_infer", &normkernels::batch_norm_infer);
}
