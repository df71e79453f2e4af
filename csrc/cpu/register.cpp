// CPU implementations of the normkernels ops: argument checks, the memory layout each kernel
// walks, output allocation, then one call into the kernel table chosen for this CPU.
//
// Layout rules (mirrored by the fake kernels in normkernels/_ops.py):
//   * layer norm: rows of the contiguous input; y/dx contiguous.
//   * group/batch norm: a 4-D/5-D input that is channels_last(_3d) (and not plain contiguous)
//     is walked as [N, HW, C] and gives channels_last outputs; an input with one value per
//     plane ((N, C), or 1x1 maps) is [N, C] rows; anything else is made contiguous and walked
//     as [N, C, HW].
//   * dy is brought to x's layout (a copy only when it differs, e.g. an expanded gradient).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels.h"
#include "output_pool.h"

namespace normkernels {

namespace {

struct Chosen {
  const cpu::Kernels* table;
  const char* name;
};

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The best build this CPU runs, capped like ATen by ATEN_CPU_CAPABILITY (or by
// NORMKERNELS_CPU_CAPABILITY, which caps ours alone) = default | avx2 | avx512.
Chosen choose() {
  int cap = 0;
  if (cpu_has_avx2() && cpu::kernels_AVX2() != nullptr) cap = 1;
  if (cpu_has_avx512() && cpu::kernels_AVX512() != nullptr) cap = 2;
  for (const char* var : {"ATEN_CPU_CAPABILITY", "NORMKERNELS_CPU_CAPABILITY"}) {
    const char* v = std::getenv(var);
    if (v == nullptr) continue;
    if (std::strcmp(v, "default") == 0) cap = 0;
    if (std::strcmp(v, "avx2") == 0 && cap > 1) cap = 1;
  }
  if (cap == 2) return {cpu::kernels_AVX512(), "AVX512"};
  if (cap == 1) return {cpu::kernels_AVX2(), "AVX2"};
  return {cpu::kernels_DEFAULT(), "DEFAULT"};
}

const Chosen& chosen() {
  static const Chosen c = choose();
  return c;
}

const cpu::Kernels& K() { return *chosen().table; }

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float(const at::Tensor& x, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kFloat8_e4m3fn &&
                  x.scalar_type() != at::kFloat8_e5m2,
              op, ": expected a float32, float64, float16 or bfloat16 input, got ",
              x.scalar_type());
}

// The kernels read parameters and statistics as flat arrays of a length the input decides, so a
// wrong-sized one would be read past its end: every op checks them before any kernel runs.
// (normkernels.functional checks its arguments first, with torch's messages; these guard direct
// calls of torch.ops.normkernels.* and TorchScript, which call the ops themselves.)
void check_param(const std::optional<at::Tensor>& p, at::IntArrayRef shape, const char* op,
                 const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ",
              p->sizes());
  TORCH_CHECK(p->is_floating_point(), op, ": expected a floating-point ", name, ", got ",
              p->scalar_type());
}

// A contiguous copy of a small tensor (a parameter, a parameter's gradient) in `dtype`, or the
// tensor itself when it already is one. Converted by the kernel table's `convert` (see
// csrc/cpu/convert.cpp): ATen's to() costs ~3-4 us a call (dispatch, TensorIterator), and a
// bf16 batch norm step does five of them, a twentieth of a whole 16x512x7x7 forward and
// backward. Rounds like to() (nearest even).
at::Tensor converted(const at::Tensor& p, at::ScalarType dtype) {
  if (p.scalar_type() == dtype && p.is_contiguous()) return p;
  if (!p.is_contiguous()) return p.to(dtype).contiguous();
  at::Tensor out = at::empty(p.sizes(), p.options().dtype(dtype));
  K().convert(p, out);
  return out;
}

// Whether a parameter is given, contiguous and of x's own dtype: the layer-norm kernels read
// such a one as it is.
bool of_x_dtype(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  return p.has_value() && p->defined() && p->scalar_type() == x.scalar_type() &&
         p->is_contiguous();
}

// weight/bias as contiguous tensors of the accumulation dtype (a no-op when they already are).
at::Tensor param(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return converted(*p, acc_type(x));
}

// Statistics a backward op reads: `numel` values, as a contiguous tensor of the accumulation
// dtype (the tensor itself when it is one, as the forward ops return them).
at::Tensor stats_arg(const at::Tensor& t, int64_t numel, const at::Tensor& x, const char* op,
                     const char* name) {
  TORCH_CHECK(t.numel() == numel, op, ": expected ", name, " of ", numel, " values, got ",
              t.numel());
  TORCH_CHECK(t.is_floating_point(), op, ": expected a floating-point ", name, ", got ",
              t.scalar_type());
  return converted(t, acc_type(x));
}

// out[c] = p[c] for a per-channel parameter or statistic of any floating dtype and stride
// (`absent` where p is undefined).
template <typename A>
void read_channels(const at::Tensor& p, A absent, A* out, int64_t C) {
  if (!p.defined()) {
    std::fill(out, out + C, absent);
    return;
  }
  const at::Tensor flat = p.dim() == 1 ? p : p.reshape({-1});
  const int64_t stride = flat.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "read_channels",
                                  [&] {
                                    const scalar_t* d = flat.const_data_ptr<scalar_t>();
                                    for (int64_t c = 0; c < C; ++c) {
                                      out[c] = static_cast<A>(d[c * stride]);
                                    }
                                  });
}

// Batch-norm inference as one per-channel affine map: [3, C] rows center = mean,
// scale = weight / sqrt(var + eps), shift = bias, in x's accumulation type, read straight from
// the statistics and parameters of whatever dtype. (Converting each of the four through ATen
// first cost ~6 us a call, a tenth of a 16x512x7x7 inference.)
at::Tensor inference_coefficients(const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, double eps) {
  const int64_t C = x.size(1);
  at::Tensor coef = at::empty({3, C}, x.options().dtype(acc_type(x)));
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "inference_coefficients", [&] {
    using A = scalar_t;
    A* center = coef.data_ptr<A>();
    A* scale = center + C;
    A* shift = scale + C;
    read_channels(mean, A(0), center, C);
    read_channels(var, A(0), scale, C);
    read_channels(weight.value_or(at::Tensor()), A(1), shift, C);  // shift holds weight a while
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = shift[c] / std::sqrt(scale[c] + static_cast<A>(eps));
    }
    read_channels(bias.value_or(at::Tensor()), A(0), shift, C);
  });
  return coef;
}

at::Tensor not_requested(const at::Tensor& x) { return at::empty({0}, x.options()); }

// The dtype a backward op returns dweight/dbias in: the weight's, or x's without a weight.
at::ScalarType param_grad_dtype(const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
}

// The outputs of a backward op, each only where the mask asks: dx in the layout x is walked in,
// dweight/dbias (`params` long) in `param_dtype`, the dtype the kernel writes them in (the
// accumulation type, unless the kernel also writes x's own); result() hands the parameter
// gradients back in the parameter's dtype and shape, and an empty tensor for each output not
// asked for.
struct GradOutputs {
  at::Tensor dx, dw, db;
  GradOutputs(const at::Tensor& x, at::MemoryFormat format, int64_t params, bool has_weight,
              std::array<bool, 3> mask, at::ScalarType param_dtype) {
    const auto popt = x.options().dtype(param_dtype);
    if (mask[0]) dx = cpu::empty_output(x.sizes(), x.options(), format);
    if (mask[1] && has_weight) dw = at::empty({params}, popt);
    if (mask[2]) db = at::empty({params}, popt);
  }
  GradOutputs(const at::Tensor& x, at::MemoryFormat format, int64_t params, bool has_weight,
              std::array<bool, 3> mask)
      : GradOutputs(x, format, params, has_weight, mask, acc_type(x)) {}
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(const at::Tensor& x,
                                                       const std::optional<at::Tensor>& weight,
                                                       at::IntArrayRef param_shape) const {
    const auto pdtype = param_grad_dtype(x, weight);
    const auto param_grad = [&](const at::Tensor& g) {
      if (!g.defined()) return not_requested(x);
      return converted(g.sizes() == param_shape ? g : g.view(param_shape), pdtype);
    };
    return {dx.defined() ? dx : not_requested(x), param_grad(dw), param_grad(db)};
  }
};

// ---------------------------------------------------------------- layer norm

// A value normalized alone (a layer norm row or a group of one value) is its mean, so its output
// is the bias whatever x is, and its gradient 0. The kernels' closed form for dx (dy * rstd * w
// less the row's mean of it, each rounded its own way) leaves a residue there of about
// rstd = 1 / sqrt(eps) times an ulp of dy * w: 2.5e-5 in fp32 at eps 1e-5 (torch's closed forms
// leave such residues too, 1e-4 in its fp32 layer norm dx at eps 1e-6). Times 0 the residue is
// 0, and a NaN or inf (from a non-finite x, dy or weight, or eps 0) still gives NaN, as torch's.
void zero_lone_values_grad(at::Tensor& dx) {
  if (dx.numel() > 0) dx.mul_(0);
}

// x as layer norm's rows: {rows (its leading dims), values a row (its last normalized_ndim)}
std::pair<int64_t, int64_t> rows_and_width(const at::Tensor& x, int64_t normalized_ndim) {
  const int64_t lead = x.dim() - normalized_ndim;
  return {c10::multiply_integers(x.sizes().slice(0, lead)),
          c10::multiply_integers(x.sizes().slice(lead))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, int64_t normalized_ndim, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  check_float(x, "layer_norm");
  TORCH_CHECK(normalized_ndim >= 1 && normalized_ndim <= x.dim(),
              "layer_norm: normalized_ndim out of range");
  const at::IntArrayRef pshape = x.sizes().slice(x.dim() - normalized_ndim);
  check_param(weight, pshape, "layer_norm", "weight");
  check_param(bias, pshape, "layer_norm", "bias");
  const at::Tensor xc = x.contiguous();
  const auto [M, N] = rows_and_width(x, normalized_ndim);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options());
  const auto sopt = x.options().dtype(acc_type(x));
  // statistics shaped as torch's native_layer_norm shapes them: x's leading dims, then ones
  std::vector<int64_t> sshape(x.sizes().begin(), x.sizes().end() - normalized_ndim);
  sshape.resize(x.dim(), 1);
  at::Tensor mean = rms ? at::empty({0}, sopt) : at::empty(sshape, sopt);
  at::Tensor rstd = at::empty(sshape, sopt);
  if (N == 0) {  // rows of no values: torch's statistics (mean 0, rstd nan), nothing to normalize
    if (!rms) mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  at::Tensor mean_arg = rms ? at::Tensor() : mean;
  // With few rows, half-type parameters are read as they are: converting them to fp32 tensors
  // would cost more than the rows themselves (a one-token decode step). With many rows the
  // one conversion is cheaper than widening them again on every row.
  constexpr int64_t kFewRows = 64;
  auto like_x = [&](const std::optional<at::Tensor>& p) {
    return !p.has_value() || !p->defined() || of_x_dtype(p, x);
  };
  if (M <= kFewRows && like_x(weight) && like_x(bias)) {
    K().layer_norm_fwd(xc, N, weight.has_value() ? *weight : at::Tensor(),
                       bias.has_value() ? *bias : at::Tensor(), eps, rms, y, mean_arg, rstd);
  } else {
    K().layer_norm_fwd(xc, N, param(weight, x), param(bias, x), eps, rms, y, mean_arg, rstd);
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, int64_t normalized_ndim, bool rms,
    std::array<bool, 3> output_mask) {
  check_float(x, "layer_norm_bwd");
  TORCH_CHECK(normalized_ndim >= 1 && normalized_ndim <= x.dim(),
              "layer_norm_bwd: normalized_ndim out of range");
  TORCH_CHECK(dy.sizes() == x.sizes(), "layer_norm_bwd: dy and x differ in shape");
  const at::IntArrayRef pshape = x.sizes().slice(x.dim() - normalized_ndim);
  check_param(weight, pshape, "layer_norm_bwd", "weight");
  const auto [M, N] = rows_and_width(x, normalized_ndim);
  // RMS norm has no mean (the forward returns an empty one; the kernel never reads it)
  const at::Tensor mean_c = rms ? mean : stats_arg(mean, M, x, "layer_norm_bwd", "mean");
  const at::Tensor rstd_c = stats_arg(rstd, M, x, "layer_norm_bwd", "rstd");
  // The kernel reads a contiguous weight of x's dtype as it is, and writes dweight/dbias in
  // x's dtype when that is what is returned: three conversions fewer (each an allocation and
  // a pass) in a one-row half-precision backward, a fifth of its cost.
  const at::Tensor w = of_x_dtype(weight, x) ? *weight : param(weight, x);
  const auto pdtype = param_grad_dtype(x, weight);
  GradOutputs out(x, at::MemoryFormat::Contiguous, N, w.defined(), output_mask,
                  pdtype == x.scalar_type() ? pdtype : acc_type(x));
  K().layer_norm_bwd(dy.contiguous(), x.contiguous(), N, mean_c, rstd_c, w, rms, out.dx, out.dw,
                     out.db);
  if (!rms && N == 1) zero_lone_values_grad(out.dx);
  return out.result(x, weight, pshape);
}

// ---------------------------------------------------------------- group / batch norm layouts

struct Walk {
  cpu::NormShape shape;
  at::MemoryFormat format;  // of x as walked, and of the outputs
};

Walk plan(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  // One value per plane ((N, C) inputs, 1x1 maps): contiguous memory is already [N, C] rows.
  if (hw == 1) return {{N, C, 1, true}, at::MemoryFormat::Contiguous};
  if (!x.is_contiguous()) {
    if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
      return {{N, C, hw, true}, at::MemoryFormat::ChannelsLast};
    if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
      return {{N, C, hw, true}, at::MemoryFormat::ChannelsLast3d};
  }
  return {{N, C, hw, false}, at::MemoryFormat::Contiguous};
}

void check_nc(const at::Tensor& x, const char* op) {
  check_float(x, op);
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of at least 2 dims (N, C, ...), got ",
              x.dim());
}

// ---------------------------------------------------------------- group norm

void check_groups(const at::Tensor& x, int64_t num_groups, const char* op) {
  check_nc(x, op);
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0,
              op, ": expected number of channels in input to be divisible by num_groups, "
              "but got input of shape ", x.sizes(), " and num_groups=", num_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_groups(x, num_groups, "group_norm");
  check_param(weight, {x.size(1)}, "group_norm", "weight");
  check_param(bias, {x.size(1)}, "group_norm", "bias");
  const Walk w = plan(x);
  const at::Tensor xc = x.contiguous(w.format);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options(), w.format);
  const auto sopt = x.options().dtype(acc_type(x));
  at::Tensor mean = at::empty({x.size(0), num_groups}, sopt);
  at::Tensor rstd = at::empty({x.size(0), num_groups}, sopt);
  K().group_norm_fwd(xc, w.shape, num_groups, param(weight, x), param(bias, x), eps, y, mean,
                     rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, int64_t num_groups,
    std::array<bool, 3> output_mask) {
  check_groups(x, num_groups, "group_norm_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_bwd: dy and x differ in shape");
  check_param(weight, {x.size(1)}, "group_norm_bwd", "weight");
  const int64_t stats = x.size(0) * num_groups;
  const at::Tensor mean_c = stats_arg(mean, stats, x, "group_norm_bwd", "mean");
  const at::Tensor rstd_c = stats_arg(rstd, stats, x, "group_norm_bwd", "rstd");
  const Walk w = plan(x);
  const at::Tensor wt = param(weight, x);
  GradOutputs out(x, w.format, x.size(1), wt.defined(), output_mask);
  K().group_norm_bwd(dy.contiguous(w.format), x.contiguous(w.format), w.shape, num_groups,
                     mean_c, rstd_c, wt, out.dx, out.dw, out.db);
  if (x.numel() == stats) zero_lone_values_grad(out.dx);  // one value a group
  return out.result(x, weight, {x.size(1)});
}

// ---------------------------------------------------------------- batch norm

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_nc(x, "batch_norm");
  check_param(weight, {x.size(1)}, "batch_norm", "weight");
  check_param(bias, {x.size(1)}, "batch_norm", "bias");
  const Walk w = plan(x);
  const at::Tensor xc = x.contiguous(w.format);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options(), w.format);
  const auto sopt = x.options().dtype(acc_type(x));
  at::Tensor mean = at::empty({x.size(1)}, sopt);
  at::Tensor invstd = at::empty({x.size(1)}, sopt);
  at::Tensor var = at::empty({x.size(1)}, sopt);
  K().batch_norm_fwd(xc, w.shape, param(weight, x), param(bias, x), eps, y, mean, invstd, var);
  return {y, mean, invstd, var};
}

at::Tensor batch_norm_infer(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
  check_nc(x, "batch_norm");
  TORCH_CHECK(mean.numel() == x.size(1), "batch_norm: expected mean of ", x.size(1),
              " values, got ", mean.numel());
  TORCH_CHECK(var.numel() == x.size(1), "batch_norm: expected var of ", x.size(1),
              " values, got ", var.numel());
  check_param(weight, {x.size(1)}, "batch_norm", "weight");
  check_param(bias, {x.size(1)}, "batch_norm", "bias");
  const Walk w = plan(x);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options(), w.format);
  K().batch_norm_elemt(x.contiguous(w.format), w.shape,
                       inference_coefficients(x, mean, var, weight, bias, eps), y);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, bool train, std::array<bool, 3> output_mask) {
  check_nc(x, "batch_norm_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes(), "batch_norm_bwd: dy and x differ in shape");
  const int64_t C = x.size(1);
  check_param(weight, {C}, "batch_norm_bwd", "weight");
  const at::Tensor mean_c = stats_arg(mean, C, x, "batch_norm_bwd", "mean");
  const at::Tensor invstd_c = stats_arg(invstd, C, x, "batch_norm_bwd", "invstd");
  const Walk w = plan(x);
  const at::Tensor wt = param(weight, x);
  GradOutputs out(x, w.format, C, wt.defined(), output_mask);
  K().batch_norm_bwd(dy.contiguous(w.format), x.contiguous(w.format), w.shape, mean_c, invstd_c,
                     wt, train, out.dx, out.dw, out.db);
  return out.result(x, weight, {C});
}

}  // namespace

const char* cpu_capability_name() { return chosen().name; }

}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CPU, m) {
  m.impl("layer_norm_fwd", &normkernels::layer_norm_fwd);
  m.impl("layer_norm_bwd", &normkernels::layer_norm_bwd);
  m.impl("group_norm_fwd", &normkernels::group_norm_fwd);
  m.impl("group_norm_bwd", &normkernels::group_norm_bwd);
  m.impl("batch_norm_fwd", &normkernels::batch_norm_fwd);
  m.impl("batch_norm_infer", &normkernels::batch_norm_infer);
  m.impl("batch_norm_bwd", &normkernels::batch_norm_bwd);
}
