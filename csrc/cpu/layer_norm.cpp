// Layer norm and RMS norm over the last dims, CPU: x is [M, N] contiguous rows.
//   forward : two-pass mean/variance per row (the row stays in L1/L2 between passes), then one
//             fused normalize + affine pass; rows of up to four chunks held in registers,
//             short rows two at a time (row_pairs).
//   backward: one pass accumulating each row's sum(g * xhat), sum(g) and this block's
//             dweight/dbias partials (long rows kSweepRows at a time, short ones two), a
//             second pass per row writing dx; the per-block partials are then summed in a
//             fixed order (deterministic, no atomics).
// Rows, weight and bias are read in the lane order of the chunks (Chunk::load_lanes): even/odd
// for bf16 under AVX-512 and AVX2, the natural order otherwise.
// RMS norm is the same kernel with the centering (and bias) switched off.
// Included by capability/*.cpp, never compiled on its own.
#include "kernels.h"
#include "reductions.h"

#include <ATen/Dispatch.h>

#include <type_traits>

namespace normkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// y from x centered (xc = x - mean: (x - mean) * rstd, not x * rstd - mean * rstd, keeps every
// digit where |mean| >> std), lanes or a single value: (xc * rstd) * w + b fused where both
// weight and bias are given, xc * rstd + b fused where only the bias is, xc * rstd * w, or
// xc * rstd. w, b: their values here (ignored where not given).
template <typename V>
static NK_ALWAYS_INLINE V affine_row(V xc, V rstd, bool has_w, V w, bool has_b, V b) {
  if (has_w && has_b) return fused(xc * rstd, w, b);
  if (has_w) return xc * rstd * w;
  if (has_b) return fused(xc, rstd, b);
  return xc * rstd;
}

// Rows of one to four chunks are held in registers (layer_norm_fwd_register_rows,
// layer_norm_bwd_register_rows) in the AVX2 and AVX-512 builds only: in the portable one (x86-64
// without them), where a vector is an array and hsum a loop over memory, RMSNorm 32768x32 fp32
// took 1.25x the time (LayerNorm 0.88x).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kRegisterRows = true;
#else
constexpr bool kRegisterRows = false;
#endif

// fn(std::integral_constant<int, K>(), std::bool_constant<whole>()) for rows of n elements that
// span K = 1 to 4 chunks of T, whole: the last chunk is whole, where this build holds such rows in
// registers (kRegisterRows); otherwise false, and fn is neither called nor compiled.
template <typename T, typename F>
static NK_ALWAYS_INLINE bool with_register_rows(int64_t n, F&& fn) {
  if constexpr (!kRegisterRows) {
    return false;
  } else {
    if (n <= 0 || n > 4 * Chunk<T>::size) return false;
    with_flag(n % Chunk<T>::size == 0, [&](auto whole) NK_INLINE_LAMBDA {
      switch ((n + Chunk<T>::size - 1) / Chunk<T>::size) {
        case 1: fn(std::integral_constant<int, 1>(), whole); break;
        case 2: fn(std::integral_constant<int, 2>(), whole); break;
        case 3: fn(std::integral_constant<int, 3>(), whole); break;
        default: fn(std::integral_constant<int, 4>(), whole); break;
      }
    });
    return true;
  }
}

// y over a row's tail, its last n < Chunk<T>::size columns (y, w and b start there; w and b may
// be null), from the tail's x - mean (xc_lo, xc_hi, in natural order, as Chunk::load_first
// reads): one masked chunk, the chunks' arithmetic (the bits element by element gave, save bf16
// results below its smallest normal, flushed as the chunks' are: see narrow), in natural order,
// as to_lanes leaves weight and bias there. (Element by element, as before, the fp32 LayerNorm
// forwards 65536x16, all tail, and 21845x48 took 1.2-1.26x the time.)
template <typename T, typename PT>
static NK_ALWAYS_INLINE void layer_norm_tail_put(T* y, int64_t n,
                                                 const typename Chunk<T>::V& xc_lo,
                                                 const typename Chunk<T>::V& xc_hi,
                                                 const typename Chunk<T>::V& vrstd, const PT* w,
                                                 const PT* b) {
  using V = typename Chunk<T>::V;
  V wa(1), wc(1), ba(0), bc(0);
  if (w != nullptr) Chunk<PT>::load_first(w, n, wa, wc);
  if (b != nullptr) Chunk<PT>::load_first(b, n, ba, bc);
  Chunk<T>::store_first(y, n, affine_row(xc_lo, vrstd, w != nullptr, wa, b != nullptr, ba),
                        affine_row(xc_hi, vrstd, w != nullptr, wc, b != nullptr, bc));
}

// layer_norm_tail_put from the tail's x (x starts there).
template <typename TX, typename T, typename PT>
static NK_ALWAYS_INLINE void layer_norm_tail_apply(const TX* x, T* y, int64_t n,
                                                   const typename Chunk<T>::V& vmean,
                                                   const typename Chunk<T>::V& vrstd, const PT* w,
                                                   const PT* b) {
  typename Chunk<T>::V a, c;
  Chunk<TX>::load_first(x, n, a, c);
  layer_norm_tail_put<T, PT>(y, n, a - vmean, c - vmean, vrstd, w, b);
}

// y = (x - mean) * rstd * w + b over one row; w and b may be null. x is the input's dtype, or
// the row already widened to the accumulation type (TX = acc_t<T>), in the lane order of T's
// chunks (Chunk::load_lanes), as are w and b; those are either the accumulation type or the
// input's own type (PT), widened in registers.
template <typename TX, typename T, typename PT>
static inline void layer_norm_row_apply(const TX* x, T* y, int64_t N, acc_t<T> mean,
                                        acc_t<T> rstd, const PT* w, const PT* b, bool stream,
                                        bool low_nans) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using CX = Chunk<TX>;
  using CP = Chunk<PT>;
  using V = typename C::V;
  static_assert(C::size == CP::size && C::size == CX::size, "chunks must line up");
  if constexpr (std::is_same_v<TX, T>) {
    if (w == nullptr && b == nullptr) {
      segment_affine(x, y, N, mean, rstd, A(0), stream, low_nans);
      return;
    }
  }
  const V vmean(mean), vrstd(rstd);
  int64_t j = 0;
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (; j + C::size <= N; j += C::size) {
      V a, c;
      CX::load_lanes(x + j, a, c);
      V wa(1), wc(1), ba(0), bc(0);
      if (w != nullptr) CP::load_lanes(w + j, wa, wc);
      if (b != nullptr) CP::load_lanes(b + j, ba, bc);
      a = affine_row(a - vmean, vrstd, w != nullptr, wa, b != nullptr, ba);
      c = affine_row(c - vmean, vrstd, w != nullptr, wc, b != nullptr, bc);
      C::put_lanes(y + j, a, c, stream && whole_line_chunk(y + j, j, 0, N), low.value);
    }
  });
  if (j < N) {
    layer_norm_tail_apply(x + j, y + j, N - j, vmean, vrstd, w != nullptr ? w + j : nullptr,
                          b != nullptr ? b + j : nullptr);
  }
}

// Widens R rows of n elements, p[r] into out[r] (accumulation type, lane order of T's chunks),
// and writes each one's sum to sums[r]: the rows' chunks side by side in one loop, each row's
// arithmetic that of a row alone (R = 1: widen_and_sum), so the same bits.
template <int R, typename T>
static NK_ALWAYS_INLINE void widen_and_sum_rows(const T* const* p, int64_t n,
                                                acc_t<T>* const* out, acc_t<T>* sums) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using V = typename C::V;
  V lo[R], hi[R];
  NK_UNROLL_CHUNKS
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = V(0);
  int64_t i = 0;
  for (; i + C::size <= n; i += C::size) {
    NK_UNROLL_CHUNKS
    for (int r = 0; r < R; ++r) {
      V a, b;
      stream_ahead(p[r] + i);
      C::load_lanes(p[r] + i, a, b);
      a.store(out[r] + i);
      b.store(out[r] + i + V::size());
      lo[r] += a;
      hi[r] += b;
    }
  }
  NK_UNROLL_CHUNKS
  for (int r = 0; r < R; ++r) {
    A total = hsum(lo[r] + hi[r]);
    for (int64_t j = i; j < n; ++j) {
      out[r][j] = static_cast<A>(p[r][j]);
      total += out[r][j];
    }
    sums[r] = total;
  }
}

// Widens a row of n elements into out (accumulation type, lane order of T's chunks) and
// returns its sum.
template <typename T>
static inline acc_t<T> widen_and_sum(const T* p, int64_t n, acc_t<T>* out) {
  acc_t<T> sum;
  widen_and_sum_rows<1>(&p, n, &out, &sum);
  return sum;
}

// Half-precision rows up to this long are widened to fp32 once and the statistics and
// normalize passes read that copy: each in-order fp16/bf16 -> fp32 conversion costs more than
// the fp32 load it replaces, while the row, its copy and y fit L1 (8 bytes an element: 32 KB
// at 4096). Longer rows are read in place: their copy spills to L2. Side by side, fp16
// forward, in place against the copy, one thread: 8192 wide 1.31-1.38x faster, 4096 wide
// 1.05-1.18x, 2048 wide 0.85x, 768/1024 wide 0.77-0.82x; two threads 1.15-1.63x throughout;
// the AVX2 build's bf16 1.0-1.17x at 8192 but 0.88-1.15x at 4096, so 4096 itself, where the
// three fill L1 exactly, keeps the copy. Not bf16 loaded even/odd
// (Chunk::even_odd): that conversion is two instructions, cheaper than storing and re-reading a
// copy twice the size (512x8192 bf16 forward, side by side with the copy and in-order loads:
// 0.87-1.04 -> 0.51-0.56 ms).
constexpr int64_t kWidenRowMax = 4096;
// Whether T's rows up to kWidenRowMax are widened so (not bf16 where it loads even/odd).
template <typename T>
constexpr bool kWidensRows = Chunk<T>::widened && !Chunk<T>::even_odd;
constexpr int64_t kWidenParamsRows = 4;
// Rows of a backward block at least: its dweight/dbias partials are summed once per block.
constexpr int64_t kRows = 4;
// Rows a backward pass-1 sweep takes at once (layer_norm_bwd_sums), where it takes several: four
// with AVX-512's 32 vector registers, two with AVX2's 16. Four rows' sums, their means and
// rstds, the column partials and the weight are 22 vectors, so the AVX2 build kept six of the
// row sums on the stack, each add a load and a store. Pass 1 alone, one thread, Zen 3 guest,
// blocks of four rows swept twice by two against once by four: bf16 512x8192 0.74-0.89x the
// time, 2048x4096 0.89-0.92x, 128x8192 (from L3) 0.86-0.96x; fp32 0.70-1.04x, 0.86-0.91x,
// 0.84-0.97x. Whole forward+backward steps, two threads, paired in one process (two runs of 8
// rounds, medians): fp32 512x8192, 1024x4096, 2048x4096, 4096x2048 0.91-0.99x the time; bf16
// 0.96-1.01x (there the two threads' pass 1 waits on memory either way); 128x8192 0.95-1.08x.
#if defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kSweepRows = 2;
#else
constexpr int64_t kSweepRows = kRows;
#endif

// Whether a thread's rows read weight and bias (of type PT) from a copy of the thread's own,
// widened to the accumulation type in the lane order of T's chunks, rather than as they are:
// always for accumulation-type ones where that order is not the natural one (bf16's
// even/odd); for half-precision ones from kWidenParamsRows rows a thread on, except bf16 ones
// loaded even/odd, which widen into that order as cheaply as a copy loads (one thread, 4-32
// rows of 4096 and 8192: 0.78-0.86x the time of reading a copy).
// The copy was once made by the calling thread before the parallel region, from 4 rows on,
// and the other thread read it out of that thread's cache: on two threads that cost more than
// the rows. Zen 4, 2 threads, forward against it (time ratios, alternated processes): bf16
// weights 16x4096 0.59 (13.1 -> 7.7 us; torch's 16.3), 32x4096 0.68, 16x8192 0.53, 64x768 0.87;
// fp32 weights of a bf16 x 16x4096 0.69, 16x8192 0.63; fp16 16x4096 0.70 (15.1 -> 10.6 us;
// torch's 14.1), 16x8192 0.66; 256x768 and 1024x1024 0.93-1.00; the same paired in one process,
// and capped to AVX2 0.65-0.93; on one thread 0.88-1.03 (bf16 weights, AVX-512: 0.78-0.86, as
// above). (In slow phases of this guest the old way took 27-42 us at 16x4096, twice torch's.)
template <typename T, typename PT>
static bool params_copied(int64_t rows) {
  if constexpr (std::is_same_v<PT, acc_t<T>>) {
    return Chunk<T>::even_odd;
  } else {
    return !Chunk<T>::even_odd && rows >= kWidenParamsRows;
  }
}

// Whether rows of N elements go two at a time through the forward's passes (read in place:
// segments_moment; widened: kWidenedRowPairs; each row's arithmetic unchanged, bit-identical; where
// `forward`), or through the backward's first pass (see layer_norm_bwd_typed): a short row's time
// is mostly its chain of statistics (the sums' adds, two horizontal sums, a division, a square
// root), which then runs beside the other row's. Up to 512 elements; 16-bit rows always, as their
// conversions make the passes compute-bound; fp32/fp64 rows in the forward where they are eight
// chunks long or more (kUnrollFrom: the passes' two-chunk steps) and the pass fits the cache
// (stream false), in the backward where the pass fits the cache or the rows are shorter than eight
// chunks. Zen 3 guest, the forward op alone, 2 threads, pairs against rows one by one (time ratios,
// min of 3 alternated runs): bf16 LayerNorm 25088x96 0.66-0.74 (0.87 -> 0.58 ms), 18816x128 0.75,
// 32768x192 0.78-0.83, 6272x192 0.76, 16384x384 0.85-0.87, 1568x384 0.83, 4096x512 0.91, 12288x512
// 1.00, from memory 131072x96 0.76, 65536x192 0.84; RMSNorm bf16 16384x96 0.81-0.82, 8192x256 0.88;
// fp32 in cache 12544x192 0.74-0.86, 4096x256 0.82 (one thread), 4096x512 0.94, RMSNorm 12544x192
// 0.93, fp64 4096x100 0.79-0.87. Not taken: fp32 forwards of rows shorter than the two-chunk steps
// (25088x96, 16384x80, one thread: 1.02-1.03, RMSNorm 1.03-1.07; from memory 0.94-0.97), fp32 rows
// of two-chunk steps from memory (forward 16384x384, 24576x256, 12288x512: 1.17-1.25, RMSNorm
// 65536x112 1.37; backward 12288x512 1.36), where the pass waits on memory and the pairs'
// interleaved reads cost; rows of 768 (bf16 8192x768 forward 1.22).
constexpr int64_t kRowPairsMax = 512;
// Widened rows (kWidensRows) go two at a time through the forward too, where the widening is
// vector code (AVX2, AVX-512): fp16 LayerNorm 25088x96 0.74-0.75x the time, 6272x192 0.79-0.81x,
// 8192x128 0.77x, 4096x512 0.86x, RMSNorm 16384x96 0.82x (the op alone, 1 and 2 threads,
// alternated builds; bit-identical). Not in the DEFAULT build, whose fp16 conversions are
// scalar: there they cost fp16 25088x96 1.20x the time.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kWidenedRowPairs = true;
#else
constexpr bool kWidenedRowPairs = false;
#endif
template <typename T>
static bool row_pairs(int64_t N, bool stream, bool forward) {
  if (N > kRowPairsMax) return false;
  if (sizeof(T) < sizeof(acc_t<T>)) return true;
  const bool two_chunk_steps = N >= kUnrollFrom * Chunk<T>::size;
  return forward ? two_chunk_steps && !stream : !stream || !two_chunk_steps;
}

// Rows of N elements spanning K chunks, K from 1 to 4 (with_register_rows), read in place (row
// null in layer_norm_fwd_row_range): each row is loaded once into 2K registers, its statistics
// and y computed there, the same arithmetic as the passes over memory (two passes, the squared
// deviations from the row's own mean; bit-identical). A last chunk that is not whole is loaded
// as the passes load a row's tail (Chunk::load_tail), and its y written as theirs
// (layer_norm_tail_put; from the registers where the row is shorter than a chunk, else from the
// tail read again, as those registers hold a chunk ending at the row's end: reading a row of 16
// or 24 bf16 values once instead of twice, 16384 rows forward 0.84-0.88x the time, fp32
// 0.97-0.99x, capped to AVX2 bf16 0.88x). (Where the row is longer, storing that last chunk whole,
// before the chunks before it, whose stores then write over the lanes it shares with them, spares
// the tail's second read and its masks: alternated processes, one thread, 8192 rows 48 to 127 wide,
// bf16 0.91-0.97x the time, fp32 0.95-1.00x; but capped to AVX2 0.94-1.10x (bf16 24 wide, fp32
// 40 and 56 wide 1.04-1.10x in two runs): not kept.) Short rows are mostly per-row
// overhead: the passes' loops and reductions, one row after another. Zen 4 guest, 2 threads, paired
// in one process against the passes (time ratios, LayerNorm / RMSNorm forward): fp32 32768x32
// 0.69-0.70 / 0.74-0.76, 4096x64 and 16384x64 0.76-0.82 / 0.81-0.86, 4096x96 and 4096x128
// 0.82-0.91 / 0.88-0.96, 65536x128 (from memory) 0.79-0.99 / 0.99-1.01; bf16 32768x32 0.63 /
// 0.66, 64 to 128 wide 0.67-0.87 / 0.74-0.90; the AVX2 build, rows of 32 and 64 (up to four of
// its chunks), 0.64-0.84 / 0.78-0.98. (ATen's kernel took 2.8-4.4x our time on those in cache.)
template <int K, bool kWhole, typename T, typename PT>
static NK_ALWAYS_INLINE void layer_norm_fwd_register_rows(const T* xp, T* yp, int64_t begin,
                                                          int64_t end, int64_t N, const PT* w,
                                                          const PT* b, acc_t<T> eps, bool rms,
                                                          acc_t<T>* mp, acc_t<T>* rp,
                                                          bool stream, bool low_nans) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using CP = Chunk<PT>;
  using V = typename C::V;
  constexpr int64_t j_last = (K - 1) * C::size;  // where the last chunk starts
  // N a constant where the chunks are whole: a division by a power of two becomes a product
  if constexpr (kWhole) N = K * C::size;
  const int64_t last = N - j_last;  // its elements, 1 to C::size
  // R rows at a time (two, then one for an odd last row): each row's arithmetic as before (the
  // same bits), the rows' steps interleaved, so that one row's chain of statistics (horizontal
  // sums, a division, a square root, a division) runs beside the other's instead of after it.
  // Alternated processes against one row at a time, 2 threads, LayerNorm forwards: 4096x64 and
  // 32768x32 fp32 0.90-0.94x the time, 16384x128 0.89x, bf16 32768x32 0.91x, rows with a tail
  // (bf16 16384x48, fp32 16384x100) 0.83-0.86x; RMSNorm 4096x64 bf16 0.92x, fp32 16384x128
  // 1.01-1.07x (pairs 0.71-1.62); capped to AVX2, fp32 16 to 64 wide 0.77-0.85x, bf16 64 wide
  // 0.77x, 32 and 48 wide 1.00-1.01x.
  const auto rows = [&](int64_t r, auto rows_at_once, auto low) {
    constexpr int R = decltype(rows_at_once)::value;
    V lo[R][K], hi[R][K];
    NK_UNROLL_CHUNKS
    for (int i = 0; i < R; ++i) {
      const T* xr = xp + (r + i) * N;
      NK_UNROLL_CHUNKS
      for (int k = 0; k < K; ++k) {
        stream_ahead(xr + k * C::size);
        if (kWhole || k < K - 1) {
          C::load_lanes(xr + k * C::size, lo[i][k], hi[i][k]);
        } else {
          C::load_tail(xr, j_last, N, lo[i][k], hi[i][k]);
        }
      }
    }
    A mu[R], rs[R];
    NK_UNROLL_CHUNKS
    for (int i = 0; i < R; ++i) {
      mu[i] = 0;
      if (!rms) {
        V sum_lo = lo[i][0], sum_hi = hi[i][0];
        NK_UNROLL_CHUNKS
        for (int k = 1; k < K; ++k) {
          sum_lo += lo[i][k];
          sum_hi += hi[i][k];
        }
        mu[i] = hsum(sum_lo + sum_hi) / static_cast<A>(N);
      }
    }
    NK_UNROLL_CHUNKS
    for (int i = 0; i < R; ++i) {
      const V vmu(mu[i]);
      V sq_lo(0), sq_hi(0);
      NK_UNROLL_CHUNKS
      for (int k = 0; k < K; ++k) {
        lo[i][k] = lo[i][k] - vmu;
        hi[i][k] = hi[i][k] - vmu;
        if (!kWhole && k == K - 1) C::keep_tail(j_last, N, lo[i][k], hi[i][k]);  // -mean outside
        sq_lo = at::vec::fmadd(lo[i][k], lo[i][k], sq_lo);
        sq_hi = at::vec::fmadd(hi[i][k], hi[i][k], sq_hi);
      }
      rs[i] = A(1) / std::sqrt(hsum(sq_lo + sq_hi) / static_cast<A>(N) + eps);
    }
    NK_UNROLL_CHUNKS
    for (int i = 0; i < R; ++i) {
      const T* xr = xp + (r + i) * N;
      T* yr = yp + (r + i) * N;
      const V vmu(mu[i]), vrs(rs[i]);
      NK_UNROLL_CHUNKS
      for (int k = 0; k < (kWhole ? K : K - 1); ++k) {
        const int64_t j = k * C::size;
        V wa(1), wb(1), ba(0), bb(0);
        if (w != nullptr) CP::load_lanes(w + j, wa, wb);
        if (b != nullptr) CP::load_lanes(b + j, ba, bb);
        C::put_lanes(yr + j, affine_row(lo[i][k], vrs, w != nullptr, wa, b != nullptr, ba),
                     affine_row(hi[i][k], vrs, w != nullptr, wb, b != nullptr, bb),
                     stream && whole_line_chunk(yr + j, j, 0, N), low.value);
      }
      if constexpr (!kWhole && K == 1) {
        // a row shorter than a chunk: its registers hold x - mean in natural order (load_tail
        // reads it as load_first does)
        layer_norm_tail_put<T, PT>(yr, last, lo[i][0], hi[i][0], vrs, w, b);
      } else if constexpr (!kWhole) {
        // the registers hold the last chunk ending at the row's end: its tail read again
        layer_norm_tail_apply(xr + j_last, yr + j_last, last, vmu, vrs,
                              w != nullptr ? w + j_last : nullptr,
                              b != nullptr ? b + j_last : nullptr);
      }
      if (mp != nullptr) mp[r + i] = mu[i];
      rp[r + i] = rs[i];
    }
  };
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    int64_t r = begin;
    for (; r + 2 <= end; r += 2) rows(r, std::integral_constant<int, 2>(), low);
    if (r < end) rows(r, std::integral_constant<int, 1>(), low);
  });
}

// The register rows above, called out of line, one function for each K and kWhole, arguments
// by value. Rows whose last chunk is not whole were first inlined into the parallel loop beside
// the whole-chunk ones, eight variants of each kernel: GCC then called other parts of that loop
// out of line, and rows of whole chunks, untouched, ran 1.06-1.4x slower. Those went out of line
// first; the whole-chunk ones followed when two rows at a time doubled their code (inlined, GCC
// called parts of the long rows' passes out of line in their turn). Rows with a tail against
// the passes with their tails element by element, alternated processes, 2 threads: LayerNorm
// 65536x16 fp32 forward+backward 0.36x the time, 21845x48 bf16 0.57x, its fp32 forward 0.76x,
// 10485x100 fp32 forward+backward 0.89x.
template <int K, bool kWhole, typename T, typename PT>
NK_NOINLINE static void layer_norm_fwd_rows_out_of_line(const T* xp, T* yp, int64_t begin,
                                                        int64_t end, int64_t N, const PT* w,
                                                        const PT* b, acc_t<T> eps, bool rms,
                                                        acc_t<T>* mp, acc_t<T>* rp, bool stream,
                                                        bool low_nans) {
  layer_norm_fwd_register_rows<K, kWhole, T, PT>(xp, yp, begin, end, N, w, b, eps, rms, mp, rp,
                                                 stream, low_nans);
}

// The end of a pair of rows of the forward (layer_norm_fwd_row_range): each row's rstd from its
// sum of squared deviations sq[i], its normalize pass from src[i] (the row itself, or its widened
// copy) into y's row i, its statistics into mp[i] (unless null) and rp[i].
template <typename TX, typename T, typename PT>
static NK_ALWAYS_INLINE void layer_norm_fwd_finish_pair(const TX* const* src, T* y, int64_t N,
                                                        const acc_t<T>* mu, const acc_t<T>* sq,
                                                        acc_t<T> eps, const PT* w, const PT* b,
                                                        acc_t<T>* mp, acc_t<T>* rp, bool stream,
                                                        bool low_nans) {
  using A = acc_t<T>;
  for (int i = 0; i < 2; ++i) {
    const A rs = A(1) / std::sqrt(sq[i] / static_cast<A>(N) + eps);
    layer_norm_row_apply(src[i], y + i * N, N, mu[i], rs, w, b, stream, low_nans);
    if (mp != nullptr) mp[i] = mu[i];
    rp[i] = rs;
  }
}

// Forward over rows [begin, end) with weight and bias w, b as the rows read them (see
// params_copied); row: scratch for a widened row (N values; 2N where widened rows go two at a
// time), or null where rows are read in place. Forced inline into the parallel loop's body: called
// out of line (once per task, with both weight types a half dtype can take), short rows lost to the
// loop it came from, in one process 4096x64 fp32 forward 1.17x the time, 32768x32 1.19x; inlined,
// against the build before it in alternated processes, 4096x64 fp32 0.62-0.85x, 32768x32
// 0.80-0.87x, bf16 0.89-0.93x, 8192x768 and 4096x1024 bf16 0.97-1.01x.
template <typename T, typename PT>
static NK_ALWAYS_INLINE void layer_norm_fwd_row_range(const T* xp, T* yp, int64_t begin,
                                                      int64_t end, int64_t N, const PT* w,
                                                      const PT* b, acc_t<T> eps, bool rms,
                                                      acc_t<T>* mp, acc_t<T>* rp, acc_t<T>* row,
                                                      bool stream, bool low_nans) {
  using A = acc_t<T>;
  if (row == nullptr && with_register_rows<T>(N, [&](auto chunks, auto whole) {
        layer_norm_fwd_rows_out_of_line<decltype(chunks)::value, decltype(whole)::value, T, PT>(
            xp, yp, begin, end, N, w, b, eps, rms, mp, rp, stream, low_nans);
      })) {
    return;
  }
  int64_t r = begin;
  // Only where short rows are read in place: T's rows up to kWidenRowMax are otherwise widened
  // (kWidensRows), and the pairs' code compiled in anyway cost the DEFAULT build's bf16 forward
  // 1.2x the time (25088x96, 6272x192) on the rows it never took.
  if constexpr (!kWidensRows<T>) {
    if (row == nullptr && row_pairs<T>(N, stream, /*forward=*/true)) {
      // two rows at a time, each row's arithmetic as below (see row_pairs)
      for (; r + 2 <= end; r += 2) {
        using V = typename Chunk<T>::V;
        const T* xr[2] = {xp + r * N, xp + (r + 1) * N};
        A mu[2] = {A(0), A(0)}, sq[2];
        if (!rms) {
          const SumStep<T> sums[2]{};
          segments_moment<2, true>(xr, N, sums, mu);
          mu[0] = mu[0] / static_cast<A>(N);
          mu[1] = mu[1] / static_cast<A>(N);
        }
        const SqDevStep<T> devs[2] = {{V(mu[0])}, {V(mu[1])}};
        if (rms) {  // (the first pass over the rows: they come from memory)
          segments_moment<2, true>(xr, N, devs, sq);
        } else {
          segments_moment<2, false>(xr, N, devs, sq);
        }
        layer_norm_fwd_finish_pair(xr, yp + r * N, N, mu, sq, eps, w, b,
                                   mp != nullptr ? mp + r : nullptr, rp + r, stream, low_nans);
      }
    }
  }
  if constexpr (kWidensRows<T> && kWidenedRowPairs) {
    if (row != nullptr && row_pairs<T>(N, stream, /*forward=*/true)) {
      // two rows at a time through their widened copies (row: 2N values there), each row's
      // arithmetic as below (widen_and_sum_rows, segments_moment: the same bits; see row_pairs)
      for (; r + 2 <= end; r += 2) {
        const T* xr[2] = {xp + r * N, xp + (r + 1) * N};
        A* wide[2] = {row, row + N};
        A sum[2], sq[2];
        widen_and_sum_rows<2>(xr, N, wide, sum);
        const A mu[2] = {rms ? A(0) : sum[0] / static_cast<A>(N),
                         rms ? A(0) : sum[1] / static_cast<A>(N)};
        const SqDevStep<A> devs[2] = {{Vectorized<A>(mu[0])}, {Vectorized<A>(mu[1])}};
        const A* const rows[2] = {wide[0], wide[1]};
        segments_moment<2, false>(rows, N, devs, sq);
        layer_norm_fwd_finish_pair(rows, yp + r * N, N, mu, sq, eps, w, b,
                                   mp != nullptr ? mp + r : nullptr, rp + r, stream, low_nans);
      }
    }
  }
  for (; r < end; ++r) {
    const T* xr = xp + r * N;
    // two passes; the row stays in L1/L2 between them (rms: no centering, mean of squares)
    A mu, var;
    if (row != nullptr) {
      const A sum = widen_and_sum(xr, N, row);
      mu = rms ? A(0) : sum / static_cast<A>(N);
      var = segment_sq_dev(row, N, mu) / static_cast<A>(N);
    } else {
      // the first pass reads the row from memory (rms: the squares' pass)
      mu = rms ? A(0) : segment_sum<true>(xr, N) / static_cast<A>(N);
      var = (rms ? segment_sq_dev<true>(xr, N, mu) : segment_sq_dev(xr, N, mu)) /
            static_cast<A>(N);
    }
    const A rs = A(1) / std::sqrt(var + eps);
    if (row != nullptr) {
      layer_norm_row_apply(row, yp + r * N, N, mu, rs, w, b, stream, low_nans);
    } else {
      layer_norm_row_apply(xr, yp + r * N, N, mu, rs, w, b, stream, low_nans);
    }
    if (mp != nullptr) mp[r] = mu;
    rp[r] = rs;
  }
}

template <typename T, typename PT>
static void layer_norm_fwd_rows(const T* xp, T* yp, int64_t M, int64_t N, const PT* w,
                                const PT* b, acc_t<T> eps, bool rms, acc_t<T>* mp, acc_t<T>* rp,
                                bool stream, bool low_nans) {
  using A = acc_t<T>;
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    const StreamFence fence(stream);
    // (two rows' worth where they go two at a time: layer_norm_fwd_row_range)
    const int64_t widened =
        kWidenedRowPairs && row_pairs<T>(N, stream, /*forward=*/true) ? 2 * N : N;
    Scratch<A> row(kWidensRows<T> && N <= kWidenRowMax ? widened : 0);
    A* row_data = row.empty() ? nullptr : row.data();
    if (params_copied<T, PT>(end - begin) && (w != nullptr || b != nullptr)) {
      LineBuffer<A> params(2 * N);
      if (w != nullptr) to_lanes<T>(w, params.data(), N);
      if (b != nullptr) to_lanes<T>(b, params.data() + N, N);
      layer_norm_fwd_row_range<T, A>(xp, yp, begin, end, N,
                                     w != nullptr ? params.data() : nullptr,
                                     b != nullptr ? params.data() + N : nullptr, eps, rms, mp, rp,
                                     row_data, stream, low_nans);
    } else {
      layer_norm_fwd_row_range<T, PT>(xp, yp, begin, end, N, w, b, eps, rms, mp, rp, row_data,
                                      stream, low_nans);
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
  const bool stream = stream_stores(2 * x.nbytes(), Pass::kForward);
  // the row statistics come from x; so every coefficient is clean unless these are (low_nan)
  const bool low_nans = any_low_nan<T>({&weight, &bias});
  // The kernel reads weight and bias in the lane order of T's chunks: as they are, widened in
  // registers, or from a copy each thread makes (params_copied).
  layer_norm_fwd_rows<T, PT>(xp, yp, M, N, w, b, static_cast<A>(eps), rms, mp, rp, stream,
                             low_nans);
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

// stream_ahead for pass 1's sweeps of R > 1 rows: its 2R streams (x and dy of each row) share
// the kStreamAheadBytes of lookahead, each asking for the chunk kStreamAheadBytes / 2R bytes
// past element j of row k, or, past the row's end, as far into row k of the next sweep (row
// k + R). Each stream asking for its own row 8 KB ahead asked, at 8 KB rows (bf16 4096), for
// the row the sweep was already reading, and, at longer rows, for lines the sweep's other
// streams evicted from L1 before their use. Backward alone, 2 threads, from a flushed cache,
// paired in one process (random order, two runs; Zen 5 guest): bf16 1024x4096 0.53-0.60x the
// time, 4096x2048 0.63-0.69x, 2048x4096 0.77-0.81x, 512x8192 0.80-0.89x, 256x16384 0.87-0.91x;
// fp32 4096x2048 0.62-0.84x, 1024x4096 0.74-0.94x, 512x8192 0.83-0.96x, 2048x4096 0.87-0.95x.
// (2 KB a stream measured the same; 4-8 KB, or the next sweep's row at the same column, less.)
// Sweeps take R > 1 rows only where rows are longer than 1365 elements (see `group` below),
// longer than the lookahead, so the wrapped position lies in row k + R; past the tensor's last
// row the request is wasted, never a fault (see stream_ahead).
template <int R, typename T>
static inline void sweep_ahead(const T* p, int64_t k, int64_t j, int64_t N) {
  constexpr int64_t ahead = kStreamAheadBytes / (2 * R) / static_cast<int64_t>(sizeof(T));
  const int64_t at = j + ahead;
  prefetch_lines<Chunk<T>::size * static_cast<int64_t>(sizeof(T))>(
      reinterpret_cast<const char*>(p + (at < N ? k * N + at : (k + R) * N + at - N)));
}

// part[0:n] += the first n lanes of (a, b), in natural order (a row's tail, n < a chunk: the
// dweight/dbias partials' tail columns, as to_lanes leaves them).
template <typename A>
static NK_ALWAYS_INLINE void add_to_tail(A* part, int64_t n, const Vectorized<A>& a,
                                         const Vectorized<A>& b) {
  Vectorized<A> pa, pb;
  Chunk<A>::load_first(part, n, pa, pb);
  Chunk<A>::store_first(part, n, pa + a, pb + b);
}

// A chunk of one row (dy in ga, gb; xhat in ha, hb; the weight in wa, wb) added into pass 1's
// sums: the dweight/dbias partials dw, db (dy * xhat, dy) and the row's acc_gx, acc_g (g * xhat,
// g, with g = dy * w).
template <typename V>
static NK_ALWAYS_INLINE void add_chunk_sums(V ga, V gb, const V& ha, const V& hb, const V& wa,
                                            const V& wb, V& dw_a, V& dw_b, V& db_a, V& db_b,
                                            V& acc_gx, V& acc_g) {
  dw_a = at::vec::fmadd(ga, ha, dw_a);
  dw_b = at::vec::fmadd(gb, hb, dw_b);
  db_a += ga;
  db_b += gb;
  ga = ga * wa;
  gb = gb * wb;
  acc_gx = at::vec::fmadd(gb, hb, at::vec::fmadd(ga, ha, acc_gx));
  acc_g += ga + gb;
}

// Backward pass 1 over R consecutive rows (x, dy rows N apart; mean/rstd mu[k], rs[k]): per
// row, sum(g * xhat) and sum(g) with g = dy * w, into s_gx[k], s_g[k]; and the rows' dy * xhat
// and dy added to the dweight/dbias partials pdw/pdb (either may be null). w, pdw and pdb are
// in the lane order of T's chunks (Chunk::load_lanes). Taking R rows per sweep loads and
// stores the partials once per R rows: with one row, their stores bound the loop. A function
// of its own, not the parallel loop's body: there every captured value would be reloaded from
// memory on each chunk, as the vector stores may alias anything.
template <typename T, int R>
static inline void layer_norm_bwd_sums(const T* x, const T* dy, int64_t N, const acc_t<T>* mu,
                                       const acc_t<T>* rs, const acc_t<T>* w, acc_t<T>* pdw,
                                       acc_t<T>* pdb, acc_t<T>* s_gx, acc_t<T>* s_g) {
  using A = acc_t<T>;
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  V vmu[R], vrs[R], acc_gx[R], acc_g[R];
  for (int k = 0; k < R; ++k) {
    vmu[k] = V(mu[k]);
    vrs[k] = V(rs[k]);
    acc_gx[k] = V(0);
    acc_g[k] = V(0);
  }
  int64_t j = 0;
  for (; j + Ch::size <= N; j += Ch::size) {
    const int64_t h = j + V::size();
    V dw_a(0), dw_b(0), db_a(0), db_b(0);
    const V wa = w != nullptr ? V::loadu(w + j) : V(1), wb = w != nullptr ? V::loadu(w + h) : V(1);
    for (int k = 0; k < R; ++k) {
      V xa, xb, ga, gb;
      if constexpr (R > 1) {
        sweep_ahead<R>(x, k, j, N);
        sweep_ahead<R>(dy, k, j, N);
      } else {
        stream_ahead(x + j);
        stream_ahead(dy + j);
      }
      Ch::load_lanes(x + k * N + j, xa, xb);
      Ch::load_lanes(dy + k * N + j, ga, gb);
      const V ha = (xa - vmu[k]) * vrs[k], hb = (xb - vmu[k]) * vrs[k];
      add_chunk_sums(ga, gb, ha, hb, wa, wb, dw_a, dw_b, db_a, db_b, acc_gx[k], acc_g[k]);
    }
    if (pdw != nullptr) {
      (V::loadu(pdw + j) + dw_a).store(pdw + j);
      (V::loadu(pdw + h) + dw_b).store(pdw + h);
    }
    if (pdb != nullptr) {
      (V::loadu(pdb + j) + db_a).store(pdb + j);
      (V::loadu(pdb + h) + db_b).store(pdb + h);
    }
  }
  if (j < N) {
    // The tail, in natural order (as to_lanes leaves the weight and the partials there), as one
    // masked chunk computed as the chunks are: x and dy load zero past it, and its deviations
    // are zeroed there too, so those lanes add nothing even where (0 - mean) * rstd overflows.
    // (Element by element, as before, a 65536x16 fp32 LayerNorm step took 1.3-1.4x the time;
    // the sums come out in another order, so dx and dweight there moved by an ulp.)
    const int64_t n = N - j;
    V dw_a(0), dw_b(0), db_a(0), db_b(0), wa(1), wb(1);
    if (w != nullptr) Chunk<A>::load_first(w + j, n, wa, wb);
    for (int k = 0; k < R; ++k) {
      V xa, xb, ga, gb;
      Ch::load_first(x + k * N + j, n, xa, xb);
      Ch::load_first(dy + k * N + j, n, ga, gb);
      V ha = (xa - vmu[k]) * vrs[k], hb = (xb - vmu[k]) * vrs[k];
      Ch::keep_first(n, ha, hb);
      add_chunk_sums(ga, gb, ha, hb, wa, wb, dw_a, dw_b, db_a, db_b, acc_gx[k], acc_g[k]);
    }
    if (pdw != nullptr) add_to_tail(pdw + j, n, dw_a, dw_b);
    if (pdb != nullptr) add_to_tail(pdb + j, n, db_a, db_b);
  }
  for (int k = 0; k < R; ++k) {
    s_gx[k] = hsum(acc_gx[k]);
    s_g[k] = hsum(acc_g[k]);
  }
}

// dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) = g * rs + (x - mu) * k_x + k_0 (g = dy * w),
// its coefficients from pass 1's sums over a row of n values, s_gx = sum(g * xhat) and s_g =
// sum(g) (0 for RMS).
template <typename A>
struct DxCoeffs {
  A k_x, k_0;
  DxCoeffs(A rs, A s_gx, A s_g, int64_t n)
      : k_x(-rs * rs * (s_gx / static_cast<A>(n))), k_0(-rs * (s_g / static_cast<A>(n))) {}
};

// dx where a weight is given, lanes or a single value (g = dy * w): g * rs + k_0 fused first, then
// (x - mu) * k_x fused onto it. Without a weight dx is grad_input_lanes (segment_grad_input's).
template <typename V>
static NK_ALWAYS_INLINE V weighted_dx(V dy, V x, V w, V mu, V rs, V k_x, V k_0) {
  return fused(x - mu, k_x, fused(dy * w, rs, k_0));
}

// Backward pass 2 over one row, dx from the sums of pass 1 (DxCoeffs); w as there.
template <typename T>
static inline void layer_norm_bwd_dx(const T* xr, const T* gr, T* dr, int64_t N, acc_t<T> mu,
                                     acc_t<T> rs, const acc_t<T>* w, acc_t<T> s_gx,
                                     acc_t<T> s_g, bool rms, bool stream, bool low_nans) {
  using A = acc_t<T>;
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  const auto [k_x, k_0] = DxCoeffs<A>(rs, s_gx, rms ? A(0) : s_g, N);
  if (w == nullptr) {
    segment_grad_input(gr, xr, dr, N, mu, rs, k_x, k_0, stream, low_nans);
    return;
  }
  const V vmu(mu), vrs(rs), vkx(k_x), vk0(k_0);
  int64_t j = 0;
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (; j + Ch::size <= N; j += Ch::size) {
      V xa, xb, ga, gb;
      Ch::load_lanes(xr + j, xa, xb);
      Ch::load_lanes(gr + j, ga, gb);
      const V wa = V::loadu(w + j), wb = V::loadu(w + j + V::size());
      Ch::put_lanes(dr + j, weighted_dx(ga, xa, wa, vmu, vrs, vkx, vk0),
                    weighted_dx(gb, xb, wb, vmu, vrs, vkx, vk0),
                    stream && whole_line_chunk(dr + j, j, 0, N), low.value);
    }
  });
  if (j < N) {  // the tail, as one masked chunk in natural order (as to_lanes leaves w there)
    const int64_t n = N - j;
    V xa, xb, ga, gb, wa, wb;
    Ch::load_first(xr + j, n, xa, xb);
    Ch::load_first(gr + j, n, ga, gb);
    Chunk<A>::load_first(w + j, n, wa, wb);
    Ch::store_first(dr + j, n, weighted_dx(ga, xa, wa, vmu, vrs, vkx, vk0),
                    weighted_dx(gb, xb, wb, vmu, vrs, vkx, vk0));
  }
}

// Backward over rows [r0, r1) of one block, rows of N elements spanning K chunks (K from 1 to 4,
// with_register_rows; a last chunk that is not whole read as the passes read a row's tail, in
// natural order, its lanes past the row zero): each row of x and dy is loaded once into
// registers, and the block's dweight/dbias partials stay in registers across its rows (at four
// chunks, with x and dy, 32 vectors: AVX-512's registers, some spilled to L1; AVX2's more), added
// into pdw/pdb (zeroed) once at the end. Pass 1's and pass 2's arithmetic for dx (the same bits);
// the partials are summed with fused multiply-adds row after row instead of a rounded product
// added into memory per row (dweight within an ulp or two of it). w: as the passes read it (null:
// ones). Zen 4 guest, 2 threads, backward paired in one process against the passes (time ratios,
// fp32 / bf16): 32768x32 0.43 / 0.44, 4096x32 to 16384x64 0.52-0.65 / 0.51-0.63, 4096x96 to
// 16384x128 0.66-0.72 / 0.65-0.72 (the fp32 4096x128 backward went from 0.95x torch's speed to
// 1.47x); the AVX2 build, rows of 32 to 64 (two to four of its chunks), 0.64-0.92 / 0.74-1.00.
// One row at a time, unlike the forward. Two at a time (the same bits; every variant then called
// out of line: inlined as the whole-chunk rows are here, those took 1.07-1.34x the time) measured
// 0.87-1.08x the time op by op (alternated processes, 16384 rows on 2 threads, 8192 on 1; at three
// and four chunks, where two rows and the partials outnumber the registers, bf16 took 1.17-1.21x,
// so only rows of one or two chunks took two) and 0.92-1.06x as forward+backward steps of 16384
// rows 32 to 128 wide (pairs 0.6-1.3): noise, not kept.
template <int K, bool kWhole, typename T>
static NK_ALWAYS_INLINE void layer_norm_bwd_register_rows(
    const T* xp, const T* gp, T* dxp, int64_t r0, int64_t r1, int64_t N, const acc_t<T>* mp,
    const acc_t<T>* rp, const acc_t<T>* w, bool rms, acc_t<T>* pdw, acc_t<T>* pdb, bool stream,
    bool low_nans) {
  using A = acc_t<T>;
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  constexpr int kVecs = 2 * K;  // the row's vectors, lo and hi of each chunk
  constexpr int64_t j_last = (K - 1) * Ch::size;  // where the last chunk starts
  if constexpr (kWhole) N = K * Ch::size;  // a constant there (see the forward)
  const int64_t last = N - j_last;          // its elements, 1 to Ch::size
  // A last chunk that is not whole is read as pass 1 and pass 2 read a row's tail: the
  // elements, the weight and the partials in natural order, lanes past the row loaded as zero.
  const auto is_tail = [](int k) { return !kWhole && k == K - 1; };
  V w_tail[2] = {V(1), V(1)};
  if (w != nullptr && !kWhole) Chunk<A>::load_first(w + j_last, last, w_tail[0], w_tail[1]);
  // the weight's vector v: read from L1 for every row (four chunks of weight held in registers
  // would leave x, dy and the partials too few of AVX-512's 32), the tail's loaded once
  const auto w_at = [&](int v) {
    if (is_tail(v / 2)) return w_tail[v % 2];
    return w != nullptr ? V::loadu(w + v * V::size()) : V(1);
  };
  V dw[kVecs], db[kVecs];
  NK_UNROLL_CHUNKS
  for (int v = 0; v < kVecs; ++v) dw[v] = db[v] = V(0);
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * N;
      const T* gr = gp + r * N;
      const A mu = mp != nullptr ? mp[r] : A(0), rs = rp[r];
      const V vmu(mu), vrs(rs);
      V xs[kVecs], gs[kVecs], acc_gx(0), acc_g(0);
      NK_UNROLL_CHUNKS
      for (int k = 0; k < K; ++k) {
        const int64_t j = k * Ch::size;
        stream_ahead(xr + j);
        stream_ahead(gr + j);
        if (is_tail(k)) {
          Ch::load_first(xr + j, last, xs[2 * k], xs[2 * k + 1]);
          Ch::load_first(gr + j, last, gs[2 * k], gs[2 * k + 1]);
        } else {
          Ch::load_lanes(xr + j, xs[2 * k], xs[2 * k + 1]);
          Ch::load_lanes(gr + j, gs[2 * k], gs[2 * k + 1]);
        }
        V ha = (xs[2 * k] - vmu) * vrs, hb = (xs[2 * k + 1] - vmu) * vrs;
        if (is_tail(k)) Ch::keep_first(last, ha, hb);  // as pass 1's tail: nothing added there
        add_chunk_sums(gs[2 * k], gs[2 * k + 1], ha, hb, w_at(2 * k), w_at(2 * k + 1), dw[2 * k],
                       dw[2 * k + 1], db[2 * k], db[2 * k + 1], acc_gx, acc_g);
      }
      if (dxp == nullptr) continue;
      // layer_norm_bwd_dx's coefficients and arithmetic
      const auto [k_x, k_0] = DxCoeffs<A>(rs, hsum(acc_gx), rms ? A(0) : hsum(acc_g), N);
      const V vkx(k_x), vk0(k_0);
      T* dr = dxp + r * N;
      NK_UNROLL_CHUNKS
      for (int k = 0; k < K; ++k) {
        const int64_t j = k * Ch::size;
        const int lo = 2 * k, hi = 2 * k + 1;
        V dx_lo, dx_hi;
        if (w == nullptr) {
          dx_lo = grad_input_lanes(gs[lo], xs[lo], vmu, vrs, vkx, vk0);
          dx_hi = grad_input_lanes(gs[hi], xs[hi], vmu, vrs, vkx, vk0);
        } else {
          dx_lo = weighted_dx(gs[lo], xs[lo], w_at(lo), vmu, vrs, vkx, vk0);
          dx_hi = weighted_dx(gs[hi], xs[hi], w_at(hi), vmu, vrs, vkx, vk0);
        }
        if (is_tail(k)) {
          Ch::store_first(dr + j, last, dx_lo, dx_hi);
        } else {
          Ch::put_lanes(dr + j, dx_lo, dx_hi, stream && whole_line_chunk(dr + j, j, 0, N),
                        low.value);
        }
      }
    }
  });
  // (chunk by chunk, not a loop over {dw, db} as arrays: that kept them in memory, not
  // registers, through the rows above, a LayerNorm 4096x128 bf16 step 1.3x the time)
  const auto add_to_partial = [&](A* part, int k, const V& a, const V& b) {
    if (is_tail(k)) {
      add_to_tail(part + j_last, last, a, b);
    } else {
      const int64_t j = k * Ch::size;
      (V::loadu(part + j) + a).store(part + j);
      (V::loadu(part + j + V::size()) + b).store(part + j + V::size());
    }
  };
  NK_UNROLL_CHUNKS
  for (int k = 0; k < K; ++k) {
    if (pdw != nullptr) add_to_partial(pdw, k, dw[2 * k], dw[2 * k + 1]);
    if (pdb != nullptr) add_to_partial(pdb, k, db[2 * k], db[2 * k + 1]);
  }
}

// The backward's register rows whose last chunk is not whole, called out of line, one function
// for each K, arguments by value (inlined beside the whole-chunk ones, they made GCC call parts of
// the parallel loop out of line: see layer_norm_fwd_rows_out_of_line). The whole-chunk rows stay
// inlined into the backward's loop, as they were when moving these out brought their times back
// (the forward's went out of line too only once two rows at a time doubled their code).
template <int K, typename T>
NK_NOINLINE static void layer_norm_bwd_tail_rows_out_of_line(
    const T* xp, const T* gp, T* dxp, int64_t r0, int64_t r1, int64_t N, const acc_t<T>* mp,
    const acc_t<T>* rp, const acc_t<T>* w, bool rms, acc_t<T>* pdw, acc_t<T>* pdb, bool stream,
    bool low_nans) {
  layer_norm_bwd_register_rows<K, false, T>(xp, gp, dxp, r0, r1, N, mp, rp, w, rms, pdw, pdb,
                                            stream, low_nans);
}

template <typename T>
static void layer_norm_bwd_typed(const at::Tensor& dy, const at::Tensor& x, int64_t N,
                                 const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, bool rms, at::Tensor& dx,
                                 at::Tensor& dweight, at::Tensor& dbias) {
  using A = acc_t<T>;
  const int64_t M = N == 0 ? 0 : x.numel() / N;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  T* dxp = dx.defined() ? dx.data_ptr<T>() : nullptr;
  // w as the passes read it: the accumulation type in the lane order of T's chunks, widened
  // and reordered from a weight of either dtype (a weight of x's own dtype spares the caller a
  // converted copy: a fifth of a one-row bf16 backward) by each thread for itself, and each
  // block's partial sums zeroed by the thread that adds into them, not by the calling thread
  // before the parallel region (see params_copied). Zen 4, 2 threads, backward paired in one
  // process against that: 16x4096, 32x4096 and 16x8192 0.89-0.93x the time in bf16 and fp16,
  // 0.93-0.96x in fp32; other sizes 0.99-1.02x, capped to AVX2 too (16x4096 0.93-0.97x).
  const bool w_of_x_dtype =
      !std::is_same_v<T, A> && weight.defined() && weight.scalar_type() == x.scalar_type();
  const A* w_acc = weight.defined() && !w_of_x_dtype ? weight.const_data_ptr<A>() : nullptr;
  const T* w_x = w_of_x_dtype ? weight.const_data_ptr<T>() : nullptr;
  const bool w_to_lanes = weight.defined() && (Chunk<T>::even_odd || w_of_x_dtype);
  // dx's coefficients come from these, x and dy (see low_nan)
  const bool low_nans = any_low_nan<T>({&weight, &mean, &rstd});
  const A* mp = rms ? nullptr : mean.const_data_ptr<A>();
  const A* rp = rstd.const_data_ptr<A>();
  const bool want_dw = dweight.defined(), want_db = dbias.defined();
  const bool want_params = want_dw || want_db;

  // Per-block partial sums of dy * xhat (dweight) and dy (dbias), in lane order, each block's
  // starting on a cache line (see LineAligned).
  const Blocks blocks(M, std::max<int64_t>(kRows, 4096 / std::max<int64_t>(N, 1)));
  constexpr int64_t line = kCacheLineBytes / sizeof(A);
  const int64_t part_ld = (N + line - 1) / line * line;
  LineBuffer<A> part_dw(want_dw ? blocks.count * part_ld : 0);
  LineBuffer<A> part_db(want_db ? blocks.count * part_ld : 0);
  // Pass 1 sweeps kSweepRows rows at once where the partials and w outgrow L1: with one row,
  // their loads and stores bound the sweep (1024x4096 bf16 backward, one thread: 1.1-1.3 -> 0.8
  // cycles per element). Shorter rows go one at a time, which keeps consecutive rows one
  // sequential stream for the prefetcher: four interleaved 1024-element rows read from L3
  // measured 10-20% slower than one at a time. But short rows (row_pairs) go two at a time:
  // there a row's time is mostly its fixed costs (two horizontal sums, dx's coefficients),
  // which then run beside the other row's; the pair's dweight/dbias partials are added as
  // their sum, so those roundings change. Zen 3 guest, 2 threads, the backward op, pairs
  // against one at a time (min of 3 alternated runs): bf16 LayerNorm 25088x96 0.88x the time,
  // 16384x128 0.88x, 12544x192 0.91x, 6272x384 0.94x, 4096x512 0.95x, from memory 131072x96
  // 0.89x, 65536x192 0.91x; RMSNorm bf16 16384x96 0.85x; fp32 25088x96 0.92x, from memory
  // 65536x96 0.96x, RMSNorm 65536x112 0.93x (fp32 from memory 12288x512: 1.36x, not taken).
  const bool stream = dxp != nullptr && stream_stores(3 * x.nbytes(), Pass::kBackward);
  int64_t group = 1;
  if (3 * N * static_cast<int64_t>(sizeof(A)) > 16384) {
    group = kSweepRows;
  } else if (row_pairs<T>(N, stream, /*forward=*/false)) {
    group = 2;
  }
  at::parallel_for(0, blocks.count, blocks.grain(N), [&](int64_t bb, int64_t be) {
    const StreamFence fence(stream);
    LineBuffer<A> w_lanes(w_to_lanes ? N : 0);
    const A* w = w_acc;
    if (w_to_lanes) {
      if (w_of_x_dtype) {
        to_lanes<T>(w_x, w_lanes.data(), N);
      } else {
        to_lanes<T>(w_acc, w_lanes.data(), N);
      }
      w = w_lanes.data();
    }
    for (int64_t blk = bb; blk < be; ++blk) {
      A* pdw = want_dw ? part_dw.data() + blk * part_ld : nullptr;
      A* pdb = want_db ? part_db.data() + blk * part_ld : nullptr;
      if (pdw != nullptr) std::fill(pdw, pdw + part_ld, A(0));
      if (pdb != nullptr) std::fill(pdb, pdb + part_ld, A(0));
      const int64_t first = blocks.begin(blk), past = blocks.end(blk);
      if (with_register_rows<T>(N, [&](auto chunks, auto whole) {
            constexpr int K = decltype(chunks)::value;
            // whole-chunk rows inlined here, rows with a tail out of line (see
            // layer_norm_bwd_tail_rows_out_of_line)
            if constexpr (decltype(whole)::value) {
              layer_norm_bwd_register_rows<K, true, T>(xp, gp, dxp, first, past, N, mp, rp, w,
                                                       rms, pdw, pdb, stream, low_nans);
            } else {
              layer_norm_bwd_tail_rows_out_of_line<K, T>(xp, gp, dxp, first, past, N, mp, rp, w,
                                                         rms, pdw, pdb, stream, low_nans);
            }
          })) {
        continue;
      }
      for (int64_t r0 = blocks.begin(blk); r0 < blocks.end(blk); r0 += group) {
        // pass 1 over the group, then pass 2 row by row while the rows are in cache
        const int64_t rows = std::min(group, blocks.end(blk) - r0);
        A mu[kSweepRows], s_gx[kSweepRows], s_g[kSweepRows];
        for (int64_t k = 0; k < rows; ++k) mu[k] = mp != nullptr ? mp[r0 + k] : A(0);
        if (rows == kSweepRows) {
          layer_norm_bwd_sums<T, kSweepRows>(xp + r0 * N, gp + r0 * N, N, mu, rp + r0, w, pdw,
                                             pdb, s_gx, s_g);
        } else if (rows == 2) {
          layer_norm_bwd_sums<T, 2>(xp + r0 * N, gp + r0 * N, N, mu, rp + r0, w, pdw, pdb, s_gx,
                                    s_g);
        } else {
          for (int64_t k = 0; k < rows; ++k) {
            const int64_t r = r0 + k;
            layer_norm_bwd_sums<T, 1>(xp + r * N, gp + r * N, N, mu + k, rp + r, w, pdw, pdb,
                                      s_gx + k, s_g + k);
          }
        }
        for (int64_t k = 0; dxp != nullptr && k < rows; ++k) {
          const int64_t r = r0 + k;
          layer_norm_bwd_dx(xp + r * N, gp + r * N, dxp + r * N, N, mu[k], rp[r], w, s_gx[k],
                            s_g[k], rms, stream, low_nans);
        }
      }
    }
  });

  if (want_params) {
    // Sum each block's partials into block 0's, always in block order, a vector of columns at a
    // time (their rows are padded to whole lines, zero past N); then out of lane order into
    // dweight/dbias, of the accumulation type or of x's own (rounded once, to nearest even, as
    // to() rounds). Column by column in scalar code this was ~2 us of a 1x768 bf16 backward.
    using VA = Vectorized<A>;
    const auto sum_blocks = [&](LineBuffer<A>& part) {
      at::parallel_for(0, part_ld / VA::size(), std::max<int64_t>(1, 1024 / VA::size()),
                       [&](int64_t vb, int64_t ve) {
                         for (int64_t v = vb; v < ve; ++v) {
                           const int64_t c = v * VA::size();
                           VA total = VA::loadu(part.data() + c);
                           for (int64_t blk = 1; blk < blocks.count; ++blk)
                             total = total + VA::loadu(part.data() + blk * part_ld + c);
                           total.store(part.data() + c);
                         }
                       });
    };
    const auto write_out = [&](LineBuffer<A>& sums, at::Tensor& out) {
      if constexpr (!std::is_same_v<T, A>) {
        if (out.scalar_type() == x.scalar_type()) {
          Scratch<A> natural(N);
          from_lanes<T>(sums.data(), natural.data(), N);
          at::vec::convert(natural.data(), out.data_ptr<T>(), N);
          return;
        }
      }
      from_lanes<T>(sums.data(), out.data_ptr<A>(), N);
    };
    if (want_dw) {
      sum_blocks(part_dw);
      write_out(part_dw, dweight);
    }
    if (want_db) {
      sum_blocks(part_db);
      write_out(part_db, dbias);
    }
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
