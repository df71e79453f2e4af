// Autograd for the normkernels forward ops, registered in C++ on the Autograd key.
//
// Why C++ and not torch.library.register_autograd: the Python autograd wrapper costs ~6 us a
// call (measured: 10.0 us vs 4.3 us for a 1x768 layer norm, torch's whole call being 2.9 us),
// which dominates small and batch-1 inputs. Why our own autograd::Node and not a C++
// torch::autograd::Function: that class's apply (input and output bookkeeping, a string-keyed
// saved_data map, output wrapping) cost ~2 us more a recorded call than torch's generated nodes
// (1x768 layer norm forward with parameters that require grad: 6.6 us with it, 4.3 us with the
// nodes below, torch's 5.3; the same script, one run each). A node here is built as torch's
// generated ones are: next edges from x, weight and bias, the
// tensors its backward reads saved as SavedVariables (version-checked, freed after backward
// unless retain_graph), the output's history set on y alone. torch.compile traces these kernels
// like torch's own (AOTAutograd runs them on fake tensors), and opcheck sees them registered.
//
// Each forward's backward is our own backward op, called below the autograd keys (it has no
// autograd formula, and passing through autograd's not-implemented fallback cost 1.5-2 us a
// backward: 2x8x2x2 bf16 batch norm 27.6-28.2 -> 25.9-26.8 us, torch 25.9-26.7); mean/rstd
// (and var) outputs are non-differentiable: they get no history. A backward that must itself
// be differentiable (create_graph=True, as in gradient penalties and every torch.func.grad, or
// with forward-mode tangents) is computed in closed form from elementary ATen ops (mean, rsqrt,
// sums; never an ATen norm op), so higher-order gradients are exact; an ordinary backward runs
// our kernels. Forward-mode AD: y's tangent is that of the same math in elementary ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <type_traits>
#include <utility>

#include "op_handles.h"

namespace normkernels {
namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using ops::Mask;
using ops::Opt;
using ops::Three;

Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

Tensor if_(bool wanted, const Tensor& t) { return wanted ? t : Tensor(); }

Tensor affine(Tensor y, const Tensor& w, const Tensor& b) {
  if (w.defined()) y = y * w;
  if (b.defined()) y = y + b;
  return y;
}

// fp32 for half tensors: the elementary-op graphs below compute in the precision of our
// kernels' statistics, and cast their results back.
Tensor upcast(const Tensor& t) {
  const bool half = t.defined() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
  return half ? t.to(at::kFloat) : t;
}

// t summed over `dims` (none: t itself; at::sum would sum every dim).
Tensor sum_over(const Tensor& t, const std::vector<int64_t>& dims) {
  return dims.empty() ? t : t.sum(dims);
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

// What owns a Node: c10::intrusive_ptr from torch 2.13, std::shared_ptr before. (Before 2.13
// torch gave its own nodes a deleter that defers the teardown of deep graphs; a plain delete
// here adds one level of recursion, ours, before the next node's own deleter takes over.)
using NodePtr = decltype(std::declval<torch::autograd::Edge>().function);

template <typename N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<N>(new N());
  } else {
    return c10::make_intrusive<N>();
  }
}

bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const Opt& t) { return t && has_tangent(*t); }

// The node of every forward here: the tensors its backward reads (x, weight, the two
// statistics, bias) and eps; which of x, weight and bias need gradients is which of its three
// next edges are valid. apply() returns dx, dweight, dbias in that order: from our backward op
// (kernel_grads), or, where the backward must itself be differentiable (graph_backward), from
// elementary ATen ops.
struct NormNode : Node {
  SavedVariable x_, w_, stat0_, stat1_, b_;
  double eps_ = 0;

  void save(const Tensor& x, const Opt& w, const Tensor& stat0, const Tensor& stat1,
            const Opt& b, double eps) {
    x_ = SavedVariable(x, false);
    w_ = SavedVariable(w, false);
    stat0_ = SavedVariable(stat0, false);
    stat1_ = SavedVariable(stat1, false);
    b_ = SavedVariable(b, false);
    eps_ = eps;
  }
  // Every saved tensor, for the uses that treat them alike (release, compiled autograd); const
  // or not as the node is.
  template <typename Self>
  static auto saved_variables(Self& self) {
    return std::array{&self.x_, &self.w_, &self.stat0_, &self.stat1_, &self.b_};
  }
  void release_variables() override {
    for (SavedVariable* v : saved_variables(*this)) v->reset_data();
  }

  // Compiled autograd (torch._dynamo.compiled_autograd) builds one graph of a whole backward:
  // compiled_args hands it what the traced graph depends on (the saved tensors; eps and each
  // node's own parameters, by collect_params), and apply_with_saved runs apply() on the proxy
  // tensors it swaps in for the saved ones, which records our backward op (whose fake kernel
  // gives the shapes) into that graph, as torch's own nodes record their ATen ops.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : saved_variables(*this)) args.collect(*v, false);
    args.collect(eps_);
    collect_params(args);
  }
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (SavedVariable* v : saved_variables(*this)) saved.before(*v);
    variable_list out = apply(variable_list(inputs));
    for (SavedVariable* v : saved_variables(*this)) saved.after(*v);
    return out;
  }
  // the node's own non-tensor state beyond eps (compiled_args)
  virtual void collect_params(torch::dynamo::autograd::CompiledNodeArgs& args) const {}

  // dx, dweight, dbias by our backward op (called below the autograd keys), as `mask` asks
  virtual Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                             const Mask& mask) = 0;

  // What the node normalizes, for the elementary-op graphs: a tensor of x's shape as the
  // statistics see it (layer and batch norm: as it is; group norm: [N, groups, -1]) and the dims
  // they reduce there; a weight or bias as it broadcasts against x, and the dims of x its
  // gradient sums over; whether the mean is subtracted (not for RMS norm).
  virtual Tensor stats_view(const Tensor& t) const { return t; }
  virtual std::vector<int64_t> stats_dims(const Tensor& xs) const = 0;
  virtual Tensor param_view(const Tensor& p, const Tensor& x) const { return channel_view(p, x); }
  virtual std::vector<int64_t> param_dims(const Tensor& x) const { return channel_dims(x); }
  virtual bool centered() const { return true; }
  // x-hat and rstd in the statistics view, both functions of x: the statistics recomputed from
  // it. Batch norm in inference overrides this (and batch_statistics) with the running
  // statistics, constants.
  virtual std::pair<Tensor, Tensor> normalized(const Tensor& xs) const {
    const auto dims = stats_dims(xs);
    const Tensor xc = centered() ? xs - xs.mean(dims, /*keepdim=*/true) : xs;
    const Tensor rstd = (xc.pow(2).mean(dims, /*keepdim=*/true) + eps_).rsqrt();
    return {xc * rstd, rstd};
  }
  virtual bool batch_statistics() const { return true; }

  // y from x, weight and bias by elementary ATen ops (never an ATen norm op): what forward-mode
  // AD differentiates (set_tangent).
  Tensor graph_forward(const Tensor& x, const Tensor& w, const Tensor& b) const {
    const Tensor xhat = normalized(stats_view(x)).first.reshape(x.sizes());
    return affine(xhat, param_view(w, x), param_view(b, x));
  }

  // dx, dweight, dbias by elementary ATen ops, the statistics recomputed from x: a graph that
  // autograd, forward-mode AD and the torch.func transforms differentiate again like any other
  // (gradient penalties, Hessians, forward-over-reverse). With g = dy * weight,
  //   dx = rstd * (g - mean(g) - x-hat * mean(g * x-hat))    (means over the statistics' dims)
  //   dweight = sum(dy * x-hat), dbias = sum(dy)              (over the parameter's dims)
  // Closed form rather than autograd of graph_forward: a backward run inside this one would
  // need x's history, which a torch.func.vjp pullback, called after its transform has exited,
  // no longer tracks.
  Three graph_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& b,
                       const Mask& mask) const {
    const Tensor dy_acc = upcast(dy);
    const auto [xhat_s, rstd] = normalized(stats_view(upcast(x)));
    Tensor dx, dw, db;
    if (mask[0]) {
      const Tensor g = stats_view(w.defined() ? dy_acc * param_view(upcast(w), x) : dy_acc);
      Tensor dx_s = g;
      if (batch_statistics()) {
        const auto dims = stats_dims(g);
        dx_s = g - xhat_s * (g * xhat_s).mean(dims, /*keepdim=*/true);
        if (centered()) dx_s = dx_s - g.mean(dims, /*keepdim=*/true);
      }
      dx = (dx_s * rstd).reshape(x.sizes()).to(x.scalar_type());
    }
    const auto dims = param_dims(x);
    if (mask[1] && w.defined())
      dw = sum_over(dy_acc * xhat_s.reshape(x.sizes()), dims).reshape(w.sizes()).to(w.scalar_type());
    if (mask[2] && b.defined())
      db = sum_over(dy_acc, dims).reshape(b.sizes()).to(b.scalar_type());
    return {dx, dw, db};
  }

  variable_list apply(variable_list&& grads) final {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    const Mask mask{should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    const Tensor x = x_.unpack(), w = w_.unpack(), b = b_.unpack();
    // Differentiable where what it returns can itself be differentiated: recorded
    // (create_graph=True, every torch.func.grad/vjp) from something that requires grad, or
    // carrying forward-mode tangents. Otherwise our kernel.
    const auto requires = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
    if ((at::GradMode::is_enabled() && (requires(dy) || requires(x) || requires(w))) ||
        has_tangent(dy) || has_tangent(x) || has_tangent(w)) {
      auto [dx, dw, db] = graph_backward(dy, x, w, b, mask);
      return {dx, dw, db};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = kernel_grads(dy, x, w, mask);
    return {if_(mask[0], dx), if_(mask[1], dw), if_(mask[2], db)};
  }
};

// True when this call records no graph: then the op is called directly, with no node and no
// saved state (the inference fast path, ~1.5 us a call).
bool no_graph(const Tensor& x, const Opt& w, const Opt& b) {
  const auto requires = [](const Opt& t) { return t && t->defined() && t->requires_grad(); };
  return !at::GradMode::is_enabled() || !(x.requires_grad() || requires(w) || requires(b));
}

const Tensor& first(const Tensor& y) { return y; }
template <typename... Ts>
const Tensor& first(const std::tuple<Ts...>& outputs) { return std::get<0>(outputs); }

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): y's tangent, the derivative of
// the node's differentiable forward (graph_forward, elementary ATen ops) along the tangents of x,
// weight and bias, as torch's own norms compute theirs from elementary ops. Half inputs are
// differentiated in fp32, the precision of our statistics, and the tangent rounded to y's dtype.
template <typename N>
void set_tangent(const N& n, const Tensor& x, const Opt& w, const Opt& b, const Tensor& y) {
  const Tensor dual = n.graph_forward(upcast(x), upcast(w ? *w : Tensor()), upcast(b ? *b : Tensor()));
  y._set_fw_grad(dual._fw_grad(/*level=*/0).to(y.scalar_type()), /*level=*/0,
                 /*is_inplace_op=*/false);
}

// Runs the forward `call()` below the autograd keys and, where this call records a graph, the
// node N that differentiates it: next edges to x, weight and bias; save(node, outputs) keeps
// what its backward reads; the history is set on y (the first output) alone, the statistics
// outputs being non-differentiable. Where x, weight or bias carries a forward-mode tangent, y
// gets its own (set_tangent), graph or not. Under the torch.func transforms these run on
// their wrapped tensors as torch's own autograd kernels do (unlike a C++
// torch::autograd::Function, which refuses them).
template <typename N, typename Call, typename Save>
auto record(const Tensor& x, const Opt& w, const Opt& b, Call call, Save save) {
  const bool tangents = has_tangent(x) || has_tangent(w) || has_tangent(b);
  const bool graph = !no_graph(x, w, b);
  if (!graph && !tangents) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
  }
  const NodePtr node = make_node<N>();
  auto& n = static_cast<N&>(*node);
  if (graph) n.set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  decltype(call()) out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call();
  }
  save(n, out);
  if (graph) torch::autograd::set_history(first(out), node);
  if (tangents) set_tangent(n, x, w, b, first(out));
  return out;
}

// ---------------------------------------------------------------- layer norm / RMS norm

struct LayerNormBackward : NormNode {
  int64_t ndim_ = 0;
  bool rms_ = false;
  std::string name() const override { return "normkernels::LayerNormBackward"; }
  void collect_params(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(ndim_);
    args.collect(rms_);
  }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    return ops::layer_norm_bwd().call(dy, x, stat0_.unpack(), stat1_.unpack(), opt(w), ndim_,
                                      rms_, mask);
  }
  std::vector<int64_t> stats_dims(const Tensor& xs) const override {  // the last ndim
    std::vector<int64_t> dims;
    for (int64_t d = xs.dim() - ndim_; d < xs.dim(); ++d) dims.push_back(d);
    return dims;
  }
  Tensor param_view(const Tensor& p, const Tensor&) const override { return p; }
  std::vector<int64_t> param_dims(const Tensor& x) const override {  // the leading ones
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim() - ndim_; ++d) dims.push_back(d);
    return dims;
  }
  bool centered() const override { return !rms_; }
};

Three layer_norm_fwd(const Tensor& x, int64_t ndim, const Opt& w, const Opt& b, double eps,
                     bool rms) {
  return record<LayerNormBackward>(
      x, w, b, [&] { return ops::layer_norm_fwd().call(x, ndim, w, b, eps, rms); },
      [&](LayerNormBackward& n, const Three& out) {
        n.save(x, w, std::get<1>(out), std::get<2>(out), b, eps);
        n.ndim_ = ndim;
        n.rms_ = rms;
      });
}

// ---------------------------------------------------------------- group norm / instance norm

struct GroupNormBackward : NormNode {
  int64_t groups_ = 0;
  std::string name() const override { return "normkernels::GroupNormBackward"; }
  void collect_params(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(groups_);
  }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    return ops::group_norm_bwd().call(dy, x, stat0_.unpack(), stat1_.unpack(), opt(w), groups_,
                                      mask);
  }
  Tensor stats_view(const Tensor& t) const override { return t.reshape({t.size(0), groups_, -1}); }
  std::vector<int64_t> stats_dims(const Tensor&) const override { return {2}; }
};

Three group_norm_fwd(const Tensor& x, int64_t groups, const Opt& w, const Opt& b, double eps) {
  return record<GroupNormBackward>(
      x, w, b, [&] { return ops::group_norm_fwd().call(x, groups, w, b, eps); },
      [&](GroupNormBackward& n, const Three& out) {
        n.save(x, w, std::get<1>(out), std::get<2>(out), b, eps);
        n.groups_ = groups;
      });
}

// ---------------------------------------------------------------- batch norm

// Training: the statistics saved are the batch's mean and invstd.
struct BatchNormBackward : NormNode {
  std::string name() const override { return "normkernels::BatchNormBackward"; }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    return ops::batch_norm_bwd().call(dy, x, stat0_.unpack(), stat1_.unpack(), opt(w),
                                      /*train=*/true, mask);
  }
  std::vector<int64_t> stats_dims(const Tensor& xs) const override { return channel_dims(xs); }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_fwd(const Tensor& x, const Opt& w,
                                                          const Opt& b, double eps) {
  using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
  return record<BatchNormBackward>(
      x, w, b, [&] { return ops::batch_norm_fwd().call(x, w, b, eps); },
      [&](BatchNormBackward& n, const Four& out) {
        n.save(x, w, std::get<1>(out), std::get<2>(out), b, eps);
      });
}

// Inference: the statistics saved are the given (running) mean and var, constants: no
// gradient flows to them, as with torch's batch norm.
struct BatchNormInferBackward : NormNode {
  std::string name() const override { return "normkernels::BatchNormInferBackward"; }
  Tensor invstd(const Tensor& x) const {
    const auto stats = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return stat1_.unpack().to(stats).add(eps_).rsqrt_();
  }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    return ops::batch_norm_bwd().call(dy, x, stat0_.unpack(), invstd(x), opt(w),
                                      /*train=*/false, mask);
  }
  std::vector<int64_t> stats_dims(const Tensor& xs) const override { return channel_dims(xs); }
  std::pair<Tensor, Tensor> normalized(const Tensor& xs) const override {
    const Tensor r = channel_view(invstd(xs), xs);
    return {(xs - channel_view(stat0_.unpack().to(r.scalar_type()), xs)) * r, r};
  }
  bool batch_statistics() const override { return false; }
};

Tensor batch_norm_infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Opt& w,
                        const Opt& b, double eps) {
  return record<BatchNormInferBackward>(
      x, w, b, [&] { return ops::batch_norm_infer().call(x, mean, var, w, b, eps); },
      [&](BatchNormInferBackward& n, const Tensor&) { n.save(x, w, mean, var, b, eps); });
}

}  // namespace
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, Autograd, m) {
  m.impl("layer_norm_fwd", &normkernels::layer_norm_fwd);
  m.impl("group_norm_fwd", &normkernels::group_norm_fwd);
  m.impl("batch_norm_fwd", &normkernels::batch_norm_fwd);
  m.impl("batch_norm_infer", &normkernels::batch_norm_infer);
}
