// The normalizations as elementary differentiable ATen ops (mean, rsqrt, sums; never an ATen
// norm op), for what our kernels do not compute: a backward op's own derivatives (its double
// backward, its outputs' forward-mode tangents). Used by the autograd kernels in
// csrc/autograd.cpp. Where these graphs are themselves differentiated, the
// statistics in them are recomputed from x, so autograd differentiates them to any order.
//
// Notation, per normalized group of M values (a row, a (sample, group), a channel):
//   x-hat = (x - mean(x)) * rstd, rstd = 1 / sqrt(var(x) + eps)  (RMS norm: no mean)
//   y = x-hat * weight + bias, g = dy * weight
//   dx = rstd * (g - mean(g) - x-hat * mean(g * x-hat))   (J^T g; J is symmetric)
//   dweight = sum(dy * x-hat), dbias = sum(dy)            (over the parameter's dims)
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <array>
#include <utility>
#include <vector>

namespace normkernels {

// fp32 for half tensors: the graphs compute in the precision of our kernels' statistics, and
// cast their results back.
inline at::Tensor upcast(const at::Tensor& t) {
  const bool half =
      t.defined() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
  return half ? t.to(at::kFloat) : t;
}

// t * p, or t where p is undefined (an absent weight)
inline at::Tensor scaled(const at::Tensor& t, const at::Tensor& p) { return p.defined() ? t * p : t; }

// sum += t, where an undefined sum is zero
inline void accumulate(at::Tensor& sum, const at::Tensor& t) { sum = sum.defined() ? sum + t : t; }

// t summed over `dims` (none: t itself; at::sum would sum every dim).
inline at::Tensor sum_over(const at::Tensor& t, const std::vector<int64_t>& dims) {
  return dims.empty() ? t : t.sum(dims);
}

inline std::vector<int64_t> channel_dims(const at::Tensor& x) {  // every dim but dim 1
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

inline at::Tensor channel_view(const at::Tensor& p, const at::Tensor& x) {  // [C] -> [1, C, 1..]
  if (!p.defined()) return p;
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return p.view(shape);
}

// One normalization: which family, its parameters, and the graphs. Batch norm in inference
// normalizes with the running statistics, constants.
struct Norm {
  enum class Kind : int64_t { kLayer, kGroup, kBatch, kBatchInfer };
  Kind kind = Kind::kLayer;
  int64_t ndim = 0;     // layer norm: how many trailing dims are normalized
  bool rms = false;     // layer norm without the mean
  int64_t groups = 0;   // group norm
  double eps = 0;

  using Tensor = at::Tensor;
  using Three = std::array<Tensor, 3>;
  using Mask = std::array<bool, 3>;

  // t (of x's shape) as the statistics see it: group norm's [N, groups, -1], else as it is
  Tensor stats_view(const Tensor& t) const {
    return kind == Kind::kGroup ? t.reshape({t.size(0), groups, -1}) : t;
  }
  std::vector<int64_t> stats_dims(const Tensor& xs) const {  // the dims the statistics reduce
    if (kind == Kind::kGroup) return {2};
    if (kind != Kind::kLayer) return channel_dims(xs);
    std::vector<int64_t> dims;
    for (int64_t d = xs.dim() - ndim; d < xs.dim(); ++d) dims.push_back(d);
    return dims;
  }
  // t's mean over the dims the statistics reduce, kept (t in the statistics view)
  Tensor stats_mean(const Tensor& t) const { return t.mean(stats_dims(t), /*keepdim=*/true); }
  // a weight or bias as it broadcasts against x, and the dims of x its gradient sums over
  Tensor param_view(const Tensor& p, const Tensor& x) const {
    return kind == Kind::kLayer ? p : channel_view(p, x);
  }
  std::vector<int64_t> param_dims(const Tensor& x) const {
    if (kind != Kind::kLayer) return channel_dims(x);
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim() - ndim; ++d) dims.push_back(d);
    return dims;
  }
  bool centered() const { return !(kind == Kind::kLayer && rms); }
  bool batch_statistics() const { return kind != Kind::kBatchInfer; }

  // J^T g for the normalization alone (statistics view): rstd * (g - mean(g) - x-hat *
  // mean(g * x-hat)); with running statistics, rstd * g.
  Tensor normalized_vjp(const Tensor& g, const Tensor& xhat, const Tensor& rstd) const {
    if (!batch_statistics()) return g * rstd;
    Tensor out = g - xhat * stats_mean(g * xhat);
    if (centered()) out = out - stats_mean(g);
    return out * rstd;
  }

  // x-hat and rstd in the statistics view from the statistics a backward op is given: the
  // forward's mean (undefined or empty for RMS norm) and rstd, or, with running statistics, the
  // running mean and its invstd. Where the graph being built is itself recorded (grad mode on:
  // a third derivative), x-hat and rstd must be functions of x: the batch statistics are then
  // recomputed from x, with eps recovered from the given rstd (eps = rstd^-2 - var(x), held
  // constant), so the values agree. Backward ops are not given eps.
  std::pair<Tensor, Tensor> statistics(const Tensor& xs, const Tensor& mean,
                                       const Tensor& rstd) const {
    std::vector<int64_t> shape = xs.sizes().vec();
    for (int64_t d : stats_dims(xs)) shape[d] = 1;
    const Tensor r = rstd.to(xs.scalar_type()).view(shape);
    if (!batch_statistics() || !at::GradMode::is_enabled())
      return {centered() ? (xs - mean.to(xs.scalar_type()).view(shape)) * r : xs * r, r};
    const Tensor xc = centered() ? xs - stats_mean(xs) : xs;
    const Tensor var = stats_mean(xc.pow(2));
    const Tensor r_of_x = (var + (r.pow(-2) - var).detach()).rsqrt();
    return {xc * r_of_x, r_of_x};
  }

  // The gradients of backward() (for its outputs' gradients ggx, ggw, ggb, any undefined) with
  // respect to dy, x and weight, as `mask` asks, in closed form. With per-group means
  // c = mean(g * x-hat), c' = mean(ggx * x-hat), m = mean(g), m' = mean(ggx) (m, m' = 0 without
  // the mean, as in RMS norm) and q = mean(ggx * (g - m - x-hat * c)):
  //   ggx: dy gets weight * h and weight gets sum(dy * h), h = J^T ggx = rstd * (ggx - m' -
  //        x-hat * c'); x gets dx = rstd * (g - m - x-hat * c) differentiated through rstd,
  //        x-hat and c: -rstd^2 * (c * ggx + c' * g + x-hat * (q - 2 c c') - c m' - c' m);
  //   ggw: dy gets ggw * x-hat, x gets J^T (dy * ggw);
  //   ggb: dy gets ggb.
  // With running statistics dx = rstd * g does not depend on x. The statistics as the backward
  // op was given them (see statistics()).
  Three double_backward(const Tensor& ggx, const Tensor& ggw, const Tensor& ggb,
                        const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                        const Tensor& rstd_given, const Mask& mask) const {
    const Tensor dy_acc = upcast(dy);
    const auto [xhat, rstd] = statistics(stats_view(upcast(x)), mean, rstd_given);
    const Tensor wv = param_view(upcast(w), x);
    Tensor g_dy, g_x, g_w;  // g_x in the statistics view
    if (ggx.defined()) {
      const Tensor ggs = stats_view(upcast(ggx));
      Tensor h = ggs * rstd;  // J^T ggx
      if (batch_statistics()) {
        const Tensor g = stats_view(scaled(dy_acc, wv));
        const Tensor c = stats_mean(g * xhat), c2 = stats_mean(ggs * xhat);
        Tensor q = stats_mean(ggs * g) - c * c2;
        const Tensor r2 = rstd * rstd;
        Tensor gx = ggs * (-r2 * c) + g * (-r2 * c2) + xhat * (-r2 * (q - 2 * c * c2));
        h = (ggs - xhat * c2) * rstd;
        if (centered()) {
          const Tensor m = stats_mean(g), m2 = stats_mean(ggs);
          gx = gx + r2 * (c * m2 + c2 * m) + xhat * (r2 * m * m2);  // q's - m m' term
          h = h - m2 * rstd;
        }
        accumulate(g_x, gx);
      }
      h = h.reshape(x.sizes());
      accumulate(g_dy, scaled(h, wv));
      if (w.defined()) g_w = sum_over(dy_acc * h, param_dims(x)).reshape(w.sizes());
    }
    if (ggw.defined() && w.defined()) {
      const Tensor ggw_v = param_view(upcast(ggw), x);
      accumulate(g_dy, ggw_v * xhat.reshape(x.sizes()));
      accumulate(g_x, normalized_vjp(stats_view(dy_acc * ggw_v), xhat, rstd));
    }
    if (ggb.defined()) accumulate(g_dy, param_view(upcast(ggb), x).expand(x.sizes()));
    Three out;
    if (mask[0] && g_dy.defined()) out[0] = g_dy.to(dy.scalar_type());
    if (mask[1] && g_x.defined()) out[1] = g_x.reshape(x.sizes()).to(x.scalar_type());
    if (mask[2] && g_w.defined()) out[2] = g_w.to(w.scalar_type());
    return out;
  }

  // Forward-mode tangents of backward()'s outputs along the tangents tdy, tx, tw (any
  // undefined: zero), in the accumulation dtype and the shapes of x and of the parameter; an
  // undefined result is a zero tangent. With tg the tangent of g and, from tx, x-hat's tangent
  // J tx and rstd's -rstd^2 * mean(x-hat * tx):
  //   dx: rstd' * (g - m - x-hat * c) + rstd * (tg - mean(tg) - x-hat' * c - x-hat * c'),
  //       c' = mean(tg * x-hat + g * x-hat')   (with running statistics: rstd * tg)
  //   dweight: sum(tdy * x-hat + dy * x-hat'), dbias: sum(tdy).
  Three backward_jvp(const Tensor& tdy, const Tensor& tx, const Tensor& tw, const Tensor& dy,
                     const Tensor& x, const Tensor& w, const Tensor& mean,
                     const Tensor& rstd_given, const Mask& mask) const {
    const Tensor dy_acc = upcast(dy);
    const auto [xhat, rstd] = statistics(stats_view(upcast(x)), mean, rstd_given);
    const Tensor wv = param_view(upcast(w), x);
    Tensor tg, txhat, trstd;  // tg as x; txhat, trstd in the statistics view
    if (tdy.defined()) tg = scaled(upcast(tdy), wv);
    if (tw.defined() && w.defined()) accumulate(tg, dy_acc * param_view(upcast(tw), x));
    if (tx.defined()) {
      const Tensor txs = stats_view(upcast(tx));
      txhat = normalized_vjp(txs, xhat, rstd);  // J tx: J is symmetric
      if (batch_statistics()) trstd = -(rstd * rstd) * stats_mean(xhat * txs);
    }
    Three out;
    if (mask[0]) {
      Tensor t;
      if (!batch_statistics()) {
        if (tg.defined()) t = stats_view(tg) * rstd;
      } else {
        const Tensor g = stats_view(scaled(dy_acc, wv));
        const Tensor c = stats_mean(g * xhat);
        Tensor inner, tc;
        if (tg.defined()) {
          const Tensor tgs = stats_view(tg);
          inner = centered() ? tgs - stats_mean(tgs) : tgs;
          tc = stats_mean(tgs * xhat);
        }
        if (txhat.defined()) {
          accumulate(inner, -txhat * c);
          accumulate(tc, stats_mean(g * txhat));
        }
        if (tc.defined()) accumulate(inner, -xhat * tc);
        if (inner.defined()) t = inner * rstd;
        if (trstd.defined()) {
          Tensor gc = g - xhat * c;
          if (centered()) gc = gc - stats_mean(g);
          accumulate(t, trstd * gc);
        }
      }
      if (t.defined()) out[0] = t.reshape(x.sizes());
    }
    const auto pdims = param_dims(x);
    if (mask[1] && w.defined()) {
      Tensor t;
      if (tdy.defined()) t = upcast(tdy) * xhat.reshape(x.sizes());
      if (txhat.defined()) accumulate(t, dy_acc * txhat.reshape(x.sizes()));
      if (t.defined()) out[1] = sum_over(t, pdims);
    }
    if (mask[2] && tdy.defined()) out[2] = sum_over(upcast(tdy), pdims);
    return out;
  }
};

}  // namespace normkernels
