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
// (and var) outputs are non-differentiable: they get no history. Double backward (a backward
// run with create_graph=True, as in gradient penalties) recomputes the forward from elementary
// differentiable ATen ops (mean, var, rsqrt; never an ATen norm op) and differentiates that, so
// higher-order gradients are exact; first-order backward always runs our kernels.
#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
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

// The node of every forward here: the tensors its backward reads (x, weight, the two
// statistics, bias) and eps; which of x, weight and bias need gradients is which of its three
// next edges are valid. apply() returns dx, dweight, dbias in that order: from our backward op
// (kernel_grads), or, where the backward is itself recorded (create_graph=True), by
// differentiating the forward rebuilt from elementary ops (graph_forward).
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
  // y from x, weight and bias by differentiable ATen ops (never an ATen norm op)
  virtual Tensor graph_forward(const Tensor& x, const Tensor& w, const Tensor& b) = 0;

  variable_list apply(variable_list&& grads) final {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    const Mask mask{should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    const Tensor x = x_.unpack(), w = w_.unpack(), b = b_.unpack();
    if (at::GradMode::is_enabled()) {
      auto g = differentiable_grads(dy, x, w, b, mask, [this](const Tensor& x, const Tensor& w,
                                                              const Tensor& b) {
        return graph_forward(x, w, b);
      });
      return {g[0], g[1], g[2]};
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

// Runs the forward `call()` below the autograd keys and, where this call records a graph, the
// node N that differentiates it: next edges to x, weight and bias; save(node, outputs) keeps
// what its backward reads; the history is set on y (the first output) alone, the statistics
// outputs being non-differentiable. Refused first, as by torch's C++ autograd::Function: a
// functorch transform, and forward-mode AD (not implemented).
template <typename N, typename Call, typename Save>
auto record(const Tensor& x, const Opt& w, const Opt& b, const char* op, Call call, Save save) {
  if (no_graph(x, w, b)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
  }
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor())
    functorch_tls->checkSupportsCppAutogradFunction();
  const auto has_tangent = [](const Opt& t) { return t && t->defined() && t->_fw_grad(0).defined(); };
  TORCH_CHECK(!has_tangent(x) && !has_tangent(w) && !has_tangent(b), op,
              ": forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not implemented");
  const NodePtr node = make_node<N>();
  auto& n = static_cast<N&>(*node);
  n.set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  decltype(call()) out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call();
  }
  save(n, out);
  torch::autograd::set_history(first(out), node);
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
  Tensor graph_forward(const Tensor& x, const Tensor& w, const Tensor& b) override {
    std::vector<int64_t> dims;
    for (int64_t d = x.dim() - ndim_; d < x.dim(); ++d) dims.push_back(d);
    auto [xc, rstd] = centered_rstd(x, dims, eps_, !rms_);
    return affine(xc * rstd, w, b);
  }
};

Three layer_norm_fwd(const Tensor& x, int64_t ndim, const Opt& w, const Opt& b, double eps,
                     bool rms) {
  return record<LayerNormBackward>(
      x, w, b, "layer_norm", [&] { return ops::layer_norm_fwd().call(x, ndim, w, b, eps, rms); },
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
  Tensor graph_forward(const Tensor& x, const Tensor& w, const Tensor& b) override {
    auto [xc, rstd] = centered_rstd(x.reshape({x.size(0), groups_, -1}), {2}, eps_, true);
    return affine((xc * rstd).view(x.sizes()), channel_view(w, x), channel_view(b, x));
  }
};

Three group_norm_fwd(const Tensor& x, int64_t groups, const Opt& w, const Opt& b, double eps) {
  return record<GroupNormBackward>(
      x, w, b, "group_norm", [&] { return ops::group_norm_fwd().call(x, groups, w, b, eps); },
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
  Tensor graph_forward(const Tensor& x, const Tensor& w, const Tensor& b) override {
    auto [xc, rstd] = centered_rstd(x, channel_dims(x), eps_, true);
    return affine(xc * rstd, channel_view(w, x), channel_view(b, x));
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_fwd(const Tensor& x, const Opt& w,
                                                          const Opt& b, double eps) {
  using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
  return record<BatchNormBackward>(
      x, w, b, "batch_norm", [&] { return ops::batch_norm_fwd().call(x, w, b, eps); },
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
  Tensor graph_forward(const Tensor& x, const Tensor& w, const Tensor& b) override {
    const Tensor r = invstd(x);
    const Tensor m = stat0_.unpack().to(r.scalar_type());
    return affine((x - channel_view(m, x)) * channel_view(r, x), channel_view(w, x),
                  channel_view(b, x));
  }
};

Tensor batch_norm_infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Opt& w,
                        const Opt& b, double eps) {
  return record<BatchNormInferBackward>(
      x, w, b, "batch_norm",
      [&] { return ops::batch_norm_infer().call(x, mean, var, w, b, eps); },
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
