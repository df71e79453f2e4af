// Layer norm and RMS norm over the last dims, CPU: x is [M, N] contiguous rows.
//   forward : two-pass mean/variance per row (the row stays in L1/L2 between passes), then one
//             fused normalize + affine pass.
//   backward: per row, one pass accumulating sum(g * xhat), sum(g) and this block's dweight/dbias
//             partials, a second pass writing dx; the per-block partials are then summed in a
//             fixed order (deterministic, no atomics).
// RMS norm is the same kernel with the centering (and bias) switched off.
// Included by capability/*.cpp, never compiled on its own.
#include "kernels.h"
#include "reductions.h"

#include <ATen/Dispatch.h>

namespace normkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// y = (x - mean) * rstd * w + b over one row; w and b may be null. x is the input's dtype, or
// the row already widened to the accumulation type (TX = acc_t<T>); the parameters are either
// the accumulation type or the input's own type (PT), widened in registers: converting bf16
// weights to fp32 tensors on every call would cost more than a one-row layer norm itself.
template <typename TX, typename T, typename PT>
static inline void layer_norm_row_apply(const TX* x, T* y, int64_t N, acc_t<T> mean,
                                        acc_t<T> rstd, const PT* w, const PT* b, bool stream) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using CX = Chunk<TX>;
  using CP = Chunk<PT>;
  using V = typename C::V;
  static_assert(C::size == CP::size && C::size == CX::size, "chunks must line up");
  if constexpr (std::is_same_v<TX, T>) {
    if (w == nullptr && b == nullptr) {
      segment_affine(x, y, N, mean, rstd, A(0), stream);
      return;
    }
  }
  const V vmean(mean), vrstd(rstd);
  int64_t j = 0;
  for (; j + C::size <= N; j += C::size) {
    V a, c;
    CX::load(x + j, a, c);
    a = (a - vmean) * vrstd;
    c = (c - vmean) * vrstd;
    if (w != nullptr) {
      V wa, wc;
      CP::load(w + j, wa, wc);
      a = a * wa;
      c = c * wc;
    }
    if (b != nullptr) {
      V ba, bc;
      CP::load(b + j, ba, bc);
      a = a + ba;
      c = c + bc;
    }
    C::put(y + j, a, c, stream);
  }
  for (; j < N; ++j) {
    A v = (static_cast<A>(x[j]) - mean) * rstd;
    if (w != nullptr) v *= static_cast<A>(w[j]);
    if (b != nullptr) v += static_cast<A>(b[j]);
    y[j] = static_cast<T>(v);
  }
}

// Widens a row of n elements into out (accumulation type) and returns its sum.
template <typename T>
static inline acc_t<T> widen_and_sum(const T* p, int64_t n, acc_t<T>* out) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using V = typename C::V;
  V lo(0), hi(0);
  int64_t i = 0;
  for (; i + C::size <= n; i += C::size) {
    V a, b;
    C::load(p + i, a, b);
    a.store(out + i);
    b.store(out + i + V::size());
    lo += a;
    hi += b;
  }
  A total = hsum(lo + hi);
  for (; i < n; ++i) {
    out[i] = static_cast<A>(p[i]);
    total += out[i];
  }
  return total;
}

// Rows of a half-precision input at least this long are widened to fp32 once (in L1) and the
// statistics and normalize passes read that copy: each bf16 -> fp32 conversion costs more
// than the fp32 load it replaces, and these passes are compute-bound, not memory-bound, in bf16.
// With at least kWidenParamsRows rows, half-precision weight and bias are widened once per
// call, not once per row.
constexpr int64_t kWidenRowMax = 16384;
constexpr int64_t kWidenParamsRows = 4;

template <typename T, typename PT>
static void layer_norm_fwd_rows(const T* xp, T* yp, int64_t M, int64_t N, const PT* w,
                                const PT* b, acc_t<T> eps, bool rms, acc_t<T>* mp, acc_t<T>* rp,
                                bool stream) {
  using A = acc_t<T>;
  constexpr bool widened = Chunk<T>::widened;
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    const StreamFence fence(stream);
    std::vector<A> row(widened && N <= kWidenRowMax ? N : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * N;
      // two passes; the row stays in L1/L2 between them (rms: no centering, mean of squares)
      A mu, var;
      if (!row.empty()) {
        const A sum = widen_and_sum(xr, N, row.data());
        mu = rms ? A(0) : sum / static_cast<A>(N);
        var = segment_sq_dev(row.data(), N, mu) / static_cast<A>(N);
      } else {
        mu = rms ? A(0) : segment_sum(xr, N) / static_cast<A>(N);
        var = segment_sq_dev(xr, N, mu) / static_cast<A>(N);
      }
      const A rs = A(1) / std::sqrt(var + eps);
      if (!row.empty()) {
        layer_norm_row_apply(row.data(), yp + r * N, N, mu, rs, w, b, stream);
      } else {
        layer_norm_row_apply(xr, yp + r * N, N, mu, rs, w, b, stream);
      }
      if (mp != nullptr) mp[r] = mu;
      rp[r] = rs;
    }
  });
}

template <typename T, typename PT>
static void layer_norm_fwd_typed(const at::Tensor& x, int64_t N, const at::Tensor& weight,
                                 const at::Tensor& bias, double eps, bool rms, at::Tensor& y,
                                 at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_t<T>;
  const int64_t M = N == 0 ? 0 : x.numel() / N;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const PT* w = weight.defined() ? weight.const_data_ptr<PT>() : nullptr;
  const PT* b = bias.defined() ? bias.const_data_ptr<PT>() : nullptr;
  A* mp = mean.defined() ? mean.data_ptr<A>() : nullptr;
  A* rp = rstd.data_ptr<A>();
  const bool stream = stream_stores(2 * x.nbytes());
  if constexpr (!std::is_same_v<PT, A>) {
    if (M >= kWidenParamsRows) {
      std::vector<A> wide(2 * N);
      for (int64_t j = 0; j < N; ++j) {
        if (w != nullptr) wide[j] = static_cast<A>(w[j]);
        if (b != nullptr) wide[N + j] = static_cast<A>(b[j]);
      }
      layer_norm_fwd_rows<T, A>(xp, yp, M, N, w != nullptr ? wide.data() : nullptr,
                                b != nullptr ? wide.data() + N : nullptr, static_cast<A>(eps),
                                rms, mp, rp, stream);
      return;
    }
  }
  layer_norm_fwd_rows<T, PT>(xp, yp, M, N, w, b, static_cast<A>(eps), rms, mp, rp, stream);
}

void layer_norm_fwd(const at::Tensor& x, int64_t N, const at::Tensor& weight,
                    const at::Tensor& bias, double eps, bool rms, at::Tensor& y,
                    at::Tensor& mean, at::Tensor& rstd) {
  // weight/bias arrive in the accumulation dtype or in x's own dtype (see register.cpp)
  const at::Tensor& p = weight.defined() ? weight : bias;
  const bool params_like_x = p.defined() && p.scalar_type() == x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd",
                                  [&] {
                                    if (params_like_x) {
                                      layer_norm_fwd_typed<scalar_t, scalar_t>(
                                          x, N, weight, bias, eps, rms, y, mean, rstd);
                                    } else {
                                      layer_norm_fwd_typed<scalar_t, acc_t<scalar_t>>(
                                          x, N, weight, bias, eps, rms, y, mean, rstd);
                                    }
                                  });
}

template <typename T>
static void layer_norm_bwd_typed(const at::Tensor& dy, const at::Tensor& x, int64_t N,
                                 const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, bool rms, at::Tensor& dx,
                                 at::Tensor& dweight, at::Tensor& dbias) {
  using A = acc_t<T>;
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  const int64_t M = N == 0 ? 0 : x.numel() / N;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  T* dxp = dx.defined() ? dx.data_ptr<T>() : nullptr;
  const A* w = weight.defined() ? weight.const_data_ptr<A>() : nullptr;
  const A* mp = rms ? nullptr : mean.const_data_ptr<A>();
  const A* rp = rstd.const_data_ptr<A>();
  const bool want_dw = dweight.defined(), want_db = dbias.defined();
  const bool want_params = want_dw || want_db;

  // Per-block partial sums of dy * xhat (dweight) and dy (dbias).
  const Blocks blocks(M, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)));
  std::vector<A> part_dw(want_dw ? blocks.count * N : 0, A(0));
  std::vector<A> part_db(want_db ? blocks.count * N : 0, A(0));

  const bool stream = dxp != nullptr && stream_stores(3 * x.nbytes());
  at::parallel_for(0, blocks.count, 1, [&](int64_t bb, int64_t be) {
    const StreamFence fence(stream);
    for (int64_t blk = bb; blk < be; ++blk) {
      A* pdw = want_dw ? part_dw.data() + blk * N : nullptr;
      A* pdb = want_db ? part_db.data() + blk * N : nullptr;
      for (int64_t r = blocks.begin(blk); r < blocks.end(blk); ++r) {
        const T* xr = xp + r * N;
        const T* gr = gp + r * N;
        const A mu = mp != nullptr ? mp[r] : A(0);
        const A rs = rp[r];
        const V vmu(mu), vrs(rs);
        // Pass 1: sum(g * xhat), sum(g) with g = dy * w; dweight/dbias partials.
        V s_gx0(0), s_gx1(0), s_g0(0), s_g1(0);
        int64_t j = 0;
        for (; j + Ch::size <= N; j += Ch::size) {
          V xa, xb, ga, gb;
          Ch::load(xr + j, xa, xb);
          Ch::load(gr + j, ga, gb);
          const int64_t h = j + V::size();
          const V ha = (xa - vmu) * vrs, hb = (xb - vmu) * vrs;
          if (pdw != nullptr) {
            at::vec::fmadd(ga, ha, V::loadu(pdw + j)).store(pdw + j);
            at::vec::fmadd(gb, hb, V::loadu(pdw + h)).store(pdw + h);
          }
          if (pdb != nullptr) {
            (V::loadu(pdb + j) + ga).store(pdb + j);
            (V::loadu(pdb + h) + gb).store(pdb + h);
          }
          if (w != nullptr) {
            ga = ga * V::loadu(w + j);
            gb = gb * V::loadu(w + h);
          }
          s_gx0 = at::vec::fmadd(ga, ha, s_gx0);
          s_gx1 = at::vec::fmadd(gb, hb, s_gx1);
          s_g0 += ga;
          s_g1 += gb;
        }
        A s_gx = hsum(s_gx0 + s_gx1), s_g = hsum(s_g0 + s_g1);
        for (; j < N; ++j) {
          const A hat = (static_cast<A>(xr[j]) - mu) * rs;
          A g = static_cast<A>(gr[j]);
          if (pdw != nullptr) pdw[j] += g * hat;
          if (pdb != nullptr) pdb[j] += g;
          if (w != nullptr) g *= w[j];
          s_gx += g * hat;
          s_g += g;
        }
        if (dxp == nullptr) continue;
        // Pass 2: dx = rstd * (g - xhat * mean(g * xhat) - mean(g)); mean(g) is 0 for RMS.
        const A c_gx = s_gx / static_cast<A>(N);
        const A c_g = rms ? A(0) : s_g / static_cast<A>(N);
        // dx = g * rs + (x - mu) * k_x + k_0
        const A k_x = -rs * rs * c_gx;
        const A k_0 = -rs * c_g;
        T* dr = dxp + r * N;
        if (w == nullptr) {
          segment_grad_input(gr, xr, dr, N, mu, rs, k_x, k_0, stream);
          continue;
        }
        const V vkx(k_x), vk0(k_0);
        j = 0;
        for (; j + Ch::size <= N; j += Ch::size) {
          V xa, xb, ga, gb;
          Ch::load(xr + j, xa, xb);
          Ch::load(gr + j, ga, gb);
          const int64_t h = j + V::size();
          ga = ga * V::loadu(w + j) * vrs;
          gb = gb * V::loadu(w + h) * vrs;
          Ch::put(dr + j, at::vec::fmadd(xa - vmu, vkx, ga + vk0),
                  at::vec::fmadd(xb - vmu, vkx, gb + vk0), stream);
        }
        for (; j < N; ++j) {
          dr[j] = static_cast<T>(static_cast<A>(gr[j]) * w[j] * rs +
                                 (static_cast<A>(xr[j]) - mu) * k_x + k_0);
        }
      }
    }
  });

  if (want_params) {
    // Sum the block partials column by column, always in block order.
    A* dwp = want_dw ? dweight.data_ptr<A>() : nullptr;
    A* dbp = want_db ? dbias.data_ptr<A>() : nullptr;
    at::parallel_for(0, N, 1024, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        A sw = 0, sb = 0;
        for (int64_t blk = 0; blk < blocks.count; ++blk) {
          if (dwp != nullptr) sw += part_dw[blk * N + c];
          if (dbp != nullptr) sb += part_db[blk * N + c];
        }
        if (dwp != nullptr) dwp[c] = sw;
        if (dbp != nullptr) dbp[c] = sb;
      }
    });
  }
}

void layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, int64_t N,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                    bool rms, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd",
                                  [&] {
                                    layer_norm_bwd_typed<scalar_t>(dy, x, N, mean, rstd, weight,
                                                                   rms, dx, dweight, dbias);
                                  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace normkernels
