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
// Each forward's backward is our own backward op; mean/rstd (and var) outputs are
// non-differentiable: they get no history. An ordinary backward calls it below the autograd
// keys (passing through an autograd kernel cost 1.5-2 us a backward: 2x8x2x2 bf16 batch norm
// 27.6-28.2 -> 25.9-26.8 us, torch 25.9-26.7). A backward whose result is differentiated again
// (create_graph=True, as in gradient penalties; the torch.func transforms; forward-mode
// tangents) calls it through its own autograd, registered here too, as torch's native backward
// ops have theirs: it records NormDoubleBackward, whose closed form (csrc/norm_graphs.h,
// elementary ATen ops, never an ATen norm op) autograd differentiates again to any order, and
// gives forward-mode tangents in closed form. Forward-mode AD of the forward ops: y's tangent
// from our kernels (set_tangent). Under the torch.func transforms every level runs these
// autograd kernels on its own wrapped tensors and our kernels run once, on the innermost ones.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <memory>
#include <type_traits>
#include <utility>

#include "norm_graphs.h"
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

// Node::compiled_args is const from torch 2.7; 2.6 declares it non-const, where a const
// override would not override (and fail to build).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
#define NORMKERNELS_COMPILED_ARGS_CONST const
#else
#define NORMKERNELS_COMPILED_ARGS_CONST
#endif

Tensor value(const Opt& t) { return t ? *t : Tensor(); }

bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

// t without its forward-mode tangent, and that tangent (undefined where t is)
Tensor primal(const Tensor& t) { return t.defined() ? t._fw_primal(/*level=*/0) : t; }
Tensor tangent(const Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : t; }

// Whether a backward op's result on (dy, x, weight) is differentiated again: a tangent to carry,
// or a graph to record (grad mode on and something requiring grad).
bool has_tangents(const Tensor& dy, const Tensor& x, const Tensor& w) {
  return has_tangent(dy) || has_tangent(x) || has_tangent(w);
}
bool records_graph(const Tensor& dy, const Tensor& x, const Tensor& w) {
  return at::GradMode::is_enabled() && (requires_grad(dy) || requires_grad(x) || requires_grad(w));
}

// The backward of our backward ops, recorded where one runs on something that requires grad
// (create_graph=True: gradient penalties, Hessian-vector products; every torch.func.grad):
// next edges to dy, x and weight; apply() is Norm::double_backward, elementary ops,
// differentiable again in turn.
struct NormDoubleBackward : Node {
  Norm norm_;
  // the statistics the backward op was given: mean and rstd (running: mean and invstd)
  SavedVariable dy_, x_, w_, mean_, rstd_;
  std::string name() const override { return "normkernels::NormDoubleBackward"; }
  void release_variables() override {
    for (SavedVariable* v : {&dy_, &x_, &w_, &mean_, &rstd_}) v->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(3);
    const Norm::Mask mask{should_compute_output(0), should_compute_output(1),
                          should_compute_output(2)};
    auto [g_dy, g_x, g_w] = norm_.double_backward(grads[0], grads[1], grads[2], dy_.unpack(),
                                                  x_.unpack(), w_.unpack(), mean_.unpack(),
                                                  rstd_.unpack(), mask);
    return {g_dy, g_x, g_w};
  }
};

// The node of every forward here: the tensors its backward reads (x, weight, the two
// statistics) and the normalization (norm_: family, eps, ...); which of x, weight and bias
// need gradients is which of its three next edges are valid. apply() returns dx, dweight, dbias
// in that order, from our backward op (kernel_grads): below the autograd keys, or, where its
// result is differentiated again (create_graph=True, torch.func transforms, forward-mode
// tangents), through the backward op's own autograd (record_backward).
struct NormNode : Node {
  SavedVariable x_, w_, stat0_, stat1_;
  Norm norm_;

  void save(const Tensor& x, const Opt& w, const Tensor& stat0, const Tensor& stat1, double eps) {
    x_ = SavedVariable(x, false);
    w_ = SavedVariable(w, false);
    stat0_ = SavedVariable(stat0, false);
    stat1_ = SavedVariable(stat1, false);
    norm_.eps = eps;
  }
  // Every saved tensor, for the uses that treat them alike (release, compiled autograd); const
  // or not as the node is.
  template <typename Self>
  static auto saved_variables(Self& self) {
    return std::array{&self.x_, &self.w_, &self.stat0_, &self.stat1_};
  }
  void release_variables() override {
    for (SavedVariable* v : saved_variables(*this)) v->reset_data();
  }

  // Compiled autograd (torch._dynamo.compiled_autograd) builds one graph of a whole backward:
  // compiled_args hands it what the traced graph depends on (the saved tensors and the
  // normalization's parameters), and apply_with_saved runs apply() on the proxy tensors it
  // swaps in for the saved ones, which records our backward op (whose fake kernel gives the
  // shapes) into that graph, as torch's own nodes record their ATen ops.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args)
      NORMKERNELS_COMPILED_ARGS_CONST override {
    for (const SavedVariable* v : saved_variables(*this)) args.collect(*v, false);
    args.collect(static_cast<int64_t>(norm_.kind));
    args.collect(norm_.ndim);
    args.collect(norm_.rms);
    args.collect(norm_.groups);
    args.collect(norm_.eps);
  }
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (SavedVariable* v : saved_variables(*this)) saved.before(*v);
    variable_list out = apply(variable_list(inputs));
    for (SavedVariable* v : saved_variables(*this)) saved.after(*v);
    return out;
  }

  // dx, dweight, dbias by our backward op, as `mask` asks
  virtual Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                             const Mask& mask) = 0;
  // y by our forward op, with this weight and bias (set_tangent)
  virtual Tensor affine_of(const Tensor& x, const Tensor& w, const Tensor& b) = 0;

  variable_list apply(variable_list&& grads) final {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    const Mask mask{should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    const Tensor x = x_.unpack(), w = w_.unpack();
    Three out;
    if (has_tangents(dy, x, w) || records_graph(dy, x, w)) {
      // through the backward op's own autograd (which records its double backward and
      // tangents, at every torch.func level)
      out = kernel_grads(dy, x, w, mask);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = kernel_grads(dy, x, w, mask);
    }
    return {if_(mask[0], std::get<0>(out)), if_(mask[1], std::get<1>(out)),
            if_(mask[2], std::get<2>(out))};
  }
};

// True when this call records no graph: then the op is called directly, with no node and no
// saved state (the inference fast path, ~1.5 us a call).
bool no_graph(const Tensor& x, const Opt& w, const Opt& b) {
  return !at::GradMode::is_enabled() ||
         !(x.requires_grad() || requires_grad(value(w)) || requires_grad(value(b)));
}

const Tensor& first(const Tensor& y) { return y; }
template <typename... Ts>
const Tensor& first(const std::tuple<Ts...>& outputs) { return std::get<0>(outputs); }

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): y's tangent from our kernels,
// as torch's own norms compute theirs in closed form. The normalization's Jacobian J is
// symmetric, so J tx is our backward op run on dy = tx without a weight; then
//   ty = weight * J tx + x-hat * tweight + tbias,
// the last two terms our forward op run with tweight and tbias as its weight and bias. Both ops
// are called through their own autograd, so nested transforms (jvp of jvp, jacfwd of jacrev)
// differentiate this in turn.
void set_tangent(NormNode& n, const Tensor& x, const Opt& w_opt, const Opt& b_opt,
                 const Tensor& y) {
  const Tensor xp = primal(x), w = primal(value(w_opt));
  const Tensor tx = tangent(x), tw = tangent(value(w_opt)), tb = tangent(value(b_opt));
  Tensor ty;
  if (tx.defined())
    ty = scaled(std::get<0>(n.kernel_grads(tx, xp, Tensor(), {true, false, false})),
                n.norm_.param_view(w, xp));
  if (tw.defined()) {
    const Tensor affine = n.affine_of(xp, tw, tb);
    ty = ty.defined() ? ty + affine : affine;
  } else if (tb.defined()) {
    const Tensor shift = n.norm_.param_view(tb, xp);
    ty = ty.defined() ? ty + shift : shift.expand(y.sizes());
  }
  y._set_fw_grad(ty.to(y.scalar_type()), /*level=*/0, /*is_inplace_op=*/false);
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
  const bool tangents = has_tangent(x) || has_tangent(value(w)) || has_tangent(value(b));
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
  std::string name() const override { return "normkernels::LayerNormBackward"; }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    return ops::layer_norm_bwd().call(dy, x, stat0_.unpack(), stat1_.unpack(), opt(w),
                                      norm_.ndim, norm_.rms, mask);
  }
  Tensor affine_of(const Tensor& x, const Tensor& w, const Tensor& b) override {
    return std::get<0>(ops::layer_norm_fwd().call(x, norm_.ndim, opt(w), opt(b), norm_.eps, norm_.rms));
  }
};

Three layer_norm_fwd(const Tensor& x, int64_t ndim, const Opt& w, const Opt& b, double eps,
                     bool rms) {
  return record<LayerNormBackward>(
      x, w, b, [&] { return ops::layer_norm_fwd().call(x, ndim, w, b, eps, rms); },
      [&](LayerNormBackward& n, const Three& out) {
        // An inference tensor (made under torch.inference_mode) cannot be saved for backward.
        // torch's rms_norm is a composite of elementwise ops that saves no x where x needs no
        // gradient (an inference tensor cannot), so features made under inference_mode and a
        // trainable weight work there: save an ordinary copy of x (the copy is made outside
        // inference mode). layer_norm saves x in torch as here, and raises as it does.
        n.save(rms && x.is_inference() ? x.clone() : x, w, std::get<1>(out), std::get<2>(out),
               eps);
        n.norm_.kind = Norm::Kind::kLayer;
        n.norm_.ndim = ndim;
        n.norm_.rms = rms;
      });
}

// ---------------------------------------------------------------- group norm / instance norm

struct GroupNormBackward : NormNode {
  std::string name() const override { return "normkernels::GroupNormBackward"; }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    return ops::group_norm_bwd().call(dy, x, stat0_.unpack(), stat1_.unpack(), opt(w),
                                      norm_.groups, mask);
  }
  Tensor affine_of(const Tensor& x, const Tensor& w, const Tensor& b) override {
    return std::get<0>(ops::group_norm_fwd().call(x, norm_.groups, opt(w), opt(b), norm_.eps));
  }
};

Three group_norm_fwd(const Tensor& x, int64_t groups, const Opt& w, const Opt& b, double eps) {
  return record<GroupNormBackward>(
      x, w, b, [&] { return ops::group_norm_fwd().call(x, groups, w, b, eps); },
      [&](GroupNormBackward& n, const Three& out) {
        n.save(x, w, std::get<1>(out), std::get<2>(out), eps);
        n.norm_.kind = Norm::Kind::kGroup;
        n.norm_.groups = groups;
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
  Tensor affine_of(const Tensor& x, const Tensor& w, const Tensor& b) override {
    return std::get<0>(ops::batch_norm_fwd().call(x, opt(w), opt(b), norm_.eps));
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_fwd(const Tensor& x, const Opt& w,
                                                          const Opt& b, double eps) {
  using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
  return record<BatchNormBackward>(
      x, w, b, [&] { return ops::batch_norm_fwd().call(x, w, b, eps); },
      [&](BatchNormBackward& n, const Four& out) {
        n.save(x, w, std::get<1>(out), std::get<2>(out), eps);
        n.norm_.kind = Norm::Kind::kBatch;
      });
}

// Inference: the statistics saved are the given (running) mean and var, constants: no
// gradient flows to them, as with torch's batch norm.
struct BatchNormInferBackward : NormNode {
  std::string name() const override { return "normkernels::BatchNormInferBackward"; }
  Three kernel_grads(const Tensor& dy, const Tensor& x, const Tensor& w,
                     const Mask& mask) override {
    const auto stats = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor invstd = stat1_.unpack().to(stats).add(norm_.eps).rsqrt_();
    return ops::batch_norm_bwd().call(dy, x, stat0_.unpack(), invstd, opt(w), /*train=*/false,
                                      mask);
  }
  Tensor affine_of(const Tensor& x, const Tensor& w, const Tensor& b) override {
    return ops::batch_norm_infer().call(x, stat0_.unpack(), stat1_.unpack(), opt(w), opt(b),
                                        norm_.eps);
  }
};

Tensor batch_norm_infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Opt& w,
                        const Opt& b, double eps) {
  return record<BatchNormInferBackward>(
      x, w, b, [&] { return ops::batch_norm_infer().call(x, mean, var, w, b, eps); },
      [&](BatchNormInferBackward& n, const Tensor&) {
        n.save(x, w, mean, var, eps);
        n.norm_.kind = Norm::Kind::kBatchInfer;
      });
}

// ---------------------------------------------------------------- the backward ops

// The backward ops' own autograd, as torch's native backward ops have theirs: a call on
// something that requires grad records a NormDoubleBackward on the outputs it was asked for; a
// call whose inputs carry forward-mode tangents gives those outputs theirs
// (Norm::backward_jvp). Under the torch.func transforms each level runs this on its own
// wrapped tensors, the kernel itself running once, on the innermost ones.
template <typename Call>
Three record_backward(const Norm& norm, const Tensor& dy, const Tensor& x, const Tensor& mean,
                      const Tensor& rstd, const Opt& w_opt, const Mask& mask, Call call) {
  const Tensor w = value(w_opt);
  const bool tangents = has_tangents(dy, x, w);
  const bool recorded = records_graph(dy, x, w);
  Three out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call();
  }
  if (!tangents && !recorded) return out;
  const std::array<Tensor, 3> outputs{std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  const Mask given{mask[0], mask[1] && w.defined(), mask[2]};  // outputs that are not empty
  if (recorded) {
    const NodePtr node = make_node<NormDoubleBackward>();
    auto& n = static_cast<NormDoubleBackward&>(*node);
    n.norm_ = norm;
    n.dy_ = SavedVariable(dy, false);
    n.x_ = SavedVariable(x, false);
    n.w_ = SavedVariable(w, false);
    n.mean_ = SavedVariable(mean, false);
    n.rstd_ = SavedVariable(rstd, false);
    n.set_next_edges(torch::autograd::collect_next_edges(dy, x, w));
    for (int i = 0; i < 3; ++i) torch::autograd::set_history(given[i] ? outputs[i] : Tensor(), node);
  }
  if (tangents) {
    const auto t = norm.backward_jvp(tangent(dy), tangent(x), tangent(w), primal(dy), primal(x),
                                     primal(w), mean, rstd, given);
    for (int i = 0; i < 3; ++i)
      if (given[i] && t[i].defined())
        outputs[i]._set_fw_grad(t[i].reshape(outputs[i].sizes()).to(outputs[i].scalar_type()),
                                /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

Three layer_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                     const Opt& w, int64_t ndim, bool rms, Mask mask) {
  Norm norm;
  norm.kind = Norm::Kind::kLayer;
  norm.ndim = ndim;
  norm.rms = rms;
  return record_backward(norm, dy, x, mean, rstd, w, mask, [&] {
    return ops::layer_norm_bwd().call(dy, x, mean, rstd, w, ndim, rms, mask);
  });
}

Three group_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                     const Opt& w, int64_t groups, Mask mask) {
  Norm norm;
  norm.kind = Norm::Kind::kGroup;
  norm.groups = groups;
  return record_backward(norm, dy, x, mean, rstd, w, mask, [&] {
    return ops::group_norm_bwd().call(dy, x, mean, rstd, w, groups, mask);
  });
}

Three batch_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                     const Opt& w, bool train, Mask mask) {
  Norm norm;
  norm.kind = train ? Norm::Kind::kBatch : Norm::Kind::kBatchInfer;
  return record_backward(norm, dy, x, mean, invstd, w, mask, [&] {
    return ops::batch_norm_bwd().call(dy, x, mean, invstd, w, train, mask);
  });
}

}  // namespace
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, Autograd, m) {
  m.impl("layer_norm_fwd", &normkernels::layer_norm_fwd);
  m.impl("group_norm_fwd", &normkernels::group_norm_fwd);
  m.impl("batch_norm_fwd", &normkernels::batch_norm_fwd);
  m.impl("batch_norm_infer", &normkernels::batch_norm_infer);
  m.impl("layer_norm_bwd", &normkernels::layer_norm_bwd);
  m.impl("group_norm_bwd", &normkernels::group_norm_bwd);
  m.impl("batch_norm_bwd", &normkernels::batch_norm_bwd);
}
