// SIMD building blocks shared by the layer, group and batch norm CPU kernels.
//
// Every kernel family reduces either
//   * contiguous segments (a layer-norm row, an NCHW group, an NCHW channel plane), or
//   * columns of a row-major [rows, C] matrix (channels_last batch/group norm, 2-D batch norm),
// so the helpers come in those two shapes. All arithmetic runs in the accumulation type
// acc_t<T> (fp32 for fp32/fp16/bf16, fp64 for fp64). Variances are two-pass (segments; for
// segments longer than L1, two passes per L1-sized block merged exactly, plane_moments) or
// Welford merged exactly across blocks (columns); never E[x^2] - E[x]^2. Multiply-adds fuse only
// where written so (fused / at::vec::fmadd below; the build forbids the compiler to contract).
//
// This header is compiled once per CPU capability (see capability/*.cpp): everything lives in
// the CPU_CAPABILITY inline namespace, like ATen's own vectorized kernels, so the AVX2 and
// AVX-512 builds of the same template never collide.
#pragma once

#include "output_pool.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#include <cpuid.h>
#define NK_AVX512_BF16 1
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// Forced inline, for the partial loads and stores: left to itself the compiler called them out
// of line, through the PLT, with a vzeroupper and every live vector spilled around each call.
#if defined(__GNUC__) || defined(__clang__)
#define NK_ALWAYS_INLINE inline __attribute__((always_inline))
#define NK_NOINLINE __attribute__((noinline))
// NK_ALWAYS_INLINE's twin for a lambda holding a loop, handed a compile-time flag by with_flag or
// with_low_nans (`[&](auto low) NK_INLINE_LAMBDA { ... }`): left out of line, the loop reached
// what it captured by reference through the closure, and since a vector store may alias
// anything, every chunk reloaded its pointers and, where the loop's index or coefficients were
// captured, stored and reloaded those too, a chain of store-to-load forwards a chunk. BatchNorm
// 16x256x14x14 fp32 inference (plane_run) took 2.4x the time of the inlined loop (Zen 3 guest).
#define NK_INLINE_LAMBDA __attribute__((always_inline))
#else
#define NK_ALWAYS_INLINE inline
#define NK_NOINLINE
#define NK_INLINE_LAMBDA
#endif
// Before a loop over a register row's K <= 4 chunks (2K <= 8 vectors), or over the rows taken
// at once: unrolled whole, so the rows' arrays of vectors (their chunks, the dweight/dbias
// partials) live in registers. GCC unrolls such a loop by itself only while its body is small:
// with a row's tail in it (masked loads) it kept the layer norm backward's loop over the chunks,
// its partials on the stack, loaded and stored again every row, a chain through memory (fp32
// RMSNorm 4096x80 backward 1.7x the time of 4096x96; unrolled, 0.57x what it was,
// bit-identical).
#if defined(__GNUC__) || defined(__clang__)
#define NK_UNROLL_CHUNKS _Pragma("GCC unroll 8")
#else
#define NK_UNROLL_CHUNKS
#endif

namespace normkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
using acc_t = at::opmath_type<T>;

// a * b + c fused, for vectors (at::vec::fmadd) and single values (std::fma) alike. The kernels
// are built with -ffp-contract=off (setup.py): the compiler never fuses a multiply and an add on
// its own, so a result's bits follow from the source alone, not from the code around it or the
// compiler (GCC contracts by default and chose differently as unrelated code changed; Clang and
// MSVC have other defaults). Where a fused multiply-add is wanted, it is written: fmadd / fused.
template <typename V>
NK_ALWAYS_INLINE V fused(const V& a, const V& b, const V& c) {
  if constexpr (std::is_floating_point_v<V>) {
    return std::fma(a, b, c);
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

// Allocates on cache-line (64-byte) boundaries. The kernels' scratch arrays (dweight/dbias
// partials, per-channel coefficients, widened rows) are read and written a vector at a time,
// and std::vector's own 16-byte alignment left those vectors straddling two lines whenever
// malloc's block happened to start off a line (always, for blocks it maps: 128 KiB and more).
// Side by side, scratch 16 bytes off a line against on one: layer norm 8192x768 fwd+bwd bf16
// 1.25x the time, fp32 1.08x, its fp16 forward (widened rows) 1.24x, channels_last group norm
// 2x640x32x32 fp32 forward 1.15x; a run's speed depended on where malloc put its scratch.
// Large arrays come from the output pool's blocks (allocate_scratch, output_pool.h): reused
// from call to call rather than fresh pages from malloc.
constexpr size_t kCacheLineBytes = 64;
static_assert(kScratchAlignment % kCacheLineBytes == 0);
template <typename A>
struct LineAligned {
  using value_type = A;
  LineAligned() = default;
  template <typename B>
  LineAligned(const LineAligned<B>&) noexcept {}
  A* allocate(size_t n) { return static_cast<A*>(allocate_scratch(n * sizeof(A))); }
  void deallocate(A* p, size_t n) noexcept { free_scratch(p, n * sizeof(A)); }
  template <typename B>
  bool operator==(const LineAligned<B>&) const noexcept { return true; }
  template <typename B>
  bool operator!=(const LineAligned<B>&) const noexcept { return false; }
};
template <typename A>
using Scratch = std::vector<A, LineAligned<A>>;
// n values on a cache line, left uninitialized (Scratch, a vector, zeroes its values on
// construction): for buffers that are written before they are read, such as LaneColumns' lane
// copies, which a block of short planes makes for every pass (zeroed first, then overwritten,
// and the statistics zeroed twice: a 16x512x7x7 bf16 BatchNorm forward took 1.05x the time,
// its inference 1.03x, paired in one process on the Zen 3 guest).
template <typename A>
class LineBuffer {
 public:
  explicit LineBuffer(size_t n) : n_(n), p_(n > 0 ? LineAligned<A>().allocate(n) : nullptr) {}
  ~LineBuffer() {
    if (p_ != nullptr) LineAligned<A>().deallocate(p_, n_);
  }
  LineBuffer(const LineBuffer&) = delete;
  LineBuffer& operator=(const LineBuffer&) = delete;
  A* data() { return p_; }
  A& operator[](size_t i) { return p_[i]; }

 private:
  size_t n_;
  A* p_;
};

// Non-temporal ("streaming") store of one vector to an address aligned to its size: the line
// is written around the caches, without first being read from memory. Where the capability has
// no such instruction, a plain store.
template <typename V>
inline void stream_vec(void* p, const V& v) {
  using E = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<E, float>) {
    _mm512_stream_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<E, double>) {
    _mm512_stream_pd(static_cast<double*>(p), v);
  } else {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<E, float>) {
    _mm256_stream_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<E, double>) {
    _mm256_stream_pd(static_cast<double*>(p), v);
  } else {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  }
#else
  v.store(static_cast<E*>(p));
#endif
}

// Streaming stores are weakly ordered: every task that issued some fences before it ends, so
// the thread that continues after the parallel region reads what they wrote.
struct StreamFence {
  bool on;
  explicit StreamFence(bool stream) : on(stream) {}
  ~StreamFence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (on) _mm_sfence();
#endif
  }
};

#ifdef NK_AVX512_BF16
// Whether this CPU has AVX512_BF16 (CPUID leaf 7, subleaf 1, EAX bit 5). The AVX-512 build is
// compiled with -mavx512bf16 where the compiler knows it, but only the bf16 stores below use it,
// behind this flag, so the same build runs on AVX-512 CPUs without it.
inline const bool kCpuHasAvx512Bf16 = [] {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 5)) != 0;
}();
#endif

// fp32 lanes lo, hi -> one vector of T (bf16 or fp16), rounded to nearest even. With
// AVX512_BF16, bf16 is one instruction (vcvtne2ps2bf16) instead of ATen's fourteen; that
// instruction flushes results below bf16's smallest normal (1.2e-38) to zero where ATen keeps
// them denormal, a difference below any tolerance a bf16 result is held to.
template <typename T>
inline Vectorized<T> narrow(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#ifdef NK_AVX512_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (kCpuHasAvx512Bf16) {
      return Vectorized<T>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
#endif
  return at::vec::convert_from_float<T>(lo, hi);
}

// v with its lanes from the n-th on zeroed, or with `before`, its first n lanes (0 <= n <=
// V::size()). Masks are built arithmetically: ATen's V::set is a switch over n it compiles out
// of line (a call, which spills every live vector).
template <typename A>
inline Vectorized<A> zero_lanes(const Vectorized<A>& v, int64_t n, bool before) {
#if defined(CPU_CAPABILITY_AVX512)
  const unsigned below = (1u << n) - 1u;  // lanes [0, n)
  if constexpr (std::is_same_v<A, float>) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(before ? ~below : below), v);
  } else {
    return _mm512_maskz_mov_pd(static_cast<__mmask8>(before ? ~below : below), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256 below = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return before ? _mm256_andnot_ps(below, v) : _mm256_and_ps(v, below);
  } else {
    const __m256d below = _mm256_castsi256_pd(
        _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)));
    return before ? _mm256_andnot_pd(below, v) : _mm256_and_pd(v, below);
  }
#else
  using V = Vectorized<A>;
  return before ? V::set(v, V(0), n) : V::set(V(0), v, n);
#endif
}

#if defined(CPU_CAPABILITY_AVX2)
// AVX2 partial loads and stores. AVX2 masks 32- and 64-bit lanes only, and ATen's 16-bit
// Vectorized::loadu(p, n) and store(p, n) go through memcpy and a stack buffer: an out-of-line
// call and a failed store-to-load forward each (a 7x7 bf16 batch-norm inference spent a quarter
// of its time in them). Loads use vpmaskmov (no fault past the mask); stores go in pieces of
// 16, 8, 4 and 2 bytes, since vpmaskmov stores are microcoded on AMD cores.
namespace avx2 {
// 32-bit lanes [0, n) set, 0 <= n <= 8.
NK_ALWAYS_INLINE __m256i first_dwords(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// 64-bit lanes [0, n) set, 0 <= n <= 4.
NK_ALWAYS_INLINE __m256i first_qwords(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
// The first n (0 <= n <= 16) 16-bit elements at p, the other lanes zero: the whole 32-bit pairs
// masked, an odd last element blended in (a mask of n / 2 + 1 pairs would read past p[n - 1]).
NK_ALWAYS_INLINE __m256i load_words(const void* p, int64_t n) {
  __m256i v = _mm256_maskload_epi32(static_cast<const int*>(p), first_dwords(n / 2));
  if (n & 1) {
    int16_t last;
    std::memcpy(&last, static_cast<const char*>(p) + 2 * (n - 1), 2);
    const __m256i at_last =
        _mm256_cmpeq_epi16(_mm256_set1_epi16(static_cast<int16_t>(n - 1)),
                           _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    v = _mm256_blendv_epi8(v, _mm256_set1_epi16(last), at_last);
  }
  return v;
}
NK_ALWAYS_INLINE __m256i bits(const Vectorized<float>& v) { return _mm256_castps_si256(v); }
NK_ALWAYS_INLINE __m256i bits(const Vectorized<double>& v) { return _mm256_castpd_si256(v); }
template <typename E>  // 16-bit elements: the vector is already an __m256i
NK_ALWAYS_INLINE __m256i bits(const Vectorized<E>& v) { return v; }
// fp32 lanes rounded to bf16 (to nearest even) in their upper 16 bits, the lower bits left
// over. The rounding carries into the upper half for a NaN with payload bits in its lower half
// (0x7FFFFFFF would become -0.0): with low_nans, NaN lanes become all ones (0xFFFF, a NaN, as
// ATen's conversion gives); without, the caller knows no lane is such a NaN (see low_nan).
NK_ALWAYS_INLINE __m256i round_to_bf16(const __m256& f, bool low_nans) {
  const __m256i x = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  if (!low_nans) return rounded;
  return _mm256_or_si256(rounded, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
// The first `bytes` (< 32) bytes of v at p, in pieces of 16, 8, 4 and 2 bytes.
NK_ALWAYS_INLINE void store_bytes(void* p, int64_t bytes, __m256i v) {
  char* q = static_cast<char*>(p);
  __m128i part = _mm256_castsi256_si128(v);
  if (bytes & 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), part);
    q += 16;
    part = _mm256_extracti128_si256(v, 1);
  }
  if (bytes & 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), part);
    q += 8;
    part = _mm_srli_si128(part, 8);
  }
  if (bytes & 4) {
    const int32_t w = _mm_cvtsi128_si32(part);
    std::memcpy(q, &w, 4);
    q += 4;
    part = _mm_srli_si128(part, 4);
  }
  if (bytes & 2) {
    const int16_t w = static_cast<int16_t>(_mm_cvtsi128_si32(part));
    std::memcpy(q, &w, 2);
  }
}
}  // namespace avx2
#endif

// The first n (0 < n <= its size) lanes of one vector at p: loaded, the other lanes zero, or
// stored. Under AVX2 by the helpers above, elsewhere by ATen's masked loadu/store.
template <typename E>
NK_ALWAYS_INLINE Vectorized<E> load_part(const E* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<E, float>) {
    return _mm256_maskload_ps(p, avx2::first_dwords(n));
  } else if constexpr (std::is_same_v<E, double>) {
    return _mm256_maskload_pd(p, avx2::first_qwords(n));
  } else {
    return Vectorized<E>(avx2::load_words(p, n));
  }
#else
  return Vectorized<E>::loadu(p, n);
#endif
}
template <typename E>
NK_ALWAYS_INLINE void store_part(E* p, int64_t n, const Vectorized<E>& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if (n == Vectorized<E>::size()) {
    v.store(p);
  } else {
    avx2::store_bytes(p, n * static_cast<int64_t>(sizeof(E)), avx2::bits(v));
  }
#else
  v.store(p, n);
#endif
}

// Whether v is a NaN with payload bits in the lower half of an fp32 (0x7F800001, 0x7FFFFFFF):
// the one kind of value the AVX2 bf16 rounding (round_to_bf16) mishandles without its NaN test.
// Arithmetic makes no such NaN of its own: an invalid operation gives the default NaN
// (0xFFC00000) and a NaN operand passes on its own payload, quieted; a 16-bit input widens with
// its lower half zero. So a pass whose fp32 operands (coefficients, weights) hold none rounds
// its results without the test: two of the ~20 instructions of a bf16 chunk stored in lane
// order, where those passes are bound by instructions, not memory. Zen 3, 2 threads, paired in
// one process against always testing: bf16 BatchNorm 16x64x56x56 inference 0.83x the time
// (channels_last 0.94x), 16x512x7x7 inference and forward 0.93-0.94x, LayerNorm 8192x768
// forward 0.91x, GroupNorm 2x320x64x64 forwards 0.91-0.93x; backwards 0.97-1.01x.
inline bool low_nan(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  // branch-free (& not &&), so any_low_nan's loop vectorizes
  return ((bits & 0x7FFFFFFFu) > 0x7F800000u) & ((bits & 0xFFFFu) != 0);
}
inline bool any_low_nan(const float* p, int64_t n) {
  uint32_t any = 0;  // not a bool: GCC vectorizes an OR over 32-bit lanes, not over bools
  for (int64_t i = 0; i < n; ++i) any |= static_cast<uint32_t>(low_nan(p[i]));
  return any != 0;
}
// Whether this build rounds T's results by round_to_bf16 (put_lanes under AVX2): the only
// builds and types for which low_nan matters.
template <typename T>
constexpr bool kRoundsByBits =
#if defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<T, at::BFloat16>;
#else
    false;
#endif

// Of the fp32 tensors an op is given (weight, bias, running or saved statistics; undefined ones
// and those of other dtypes hold none): what every coefficient of its passes is computed from
// besides x and dy, so a kernel checks these once a call, not its coefficients once a pass (on a 16x512x7x7 bf16
// inference, scanning each block's spread coefficients cost a third of the time), and only
// where T is rounded by bits (scanning an fp32 1x768 LayerNorm's weight and bias cost it a
// quarter of its 4 us).
template <typename T>
inline bool any_low_nan(std::initializer_list<const at::Tensor*> tensors) {
  if constexpr (!kRoundsByBits<T>) {
    return false;
  } else {
    for (const at::Tensor* t : tensors) {
      if (t->defined() && t->scalar_type() == at::kFloat &&
          any_low_nan(t->const_data_ptr<float>(), t->numel()))
        return true;
    }
    return false;
  }
}

// fn(std::bool_constant<flag>): a runtime flag as a compile-time one, one copy of fn each way;
// fn a loop's lambda marked NK_INLINE_LAMBDA, so that both copies land in the caller.
template <typename F>
NK_ALWAYS_INLINE void with_flag(bool flag, F&& fn) {
  if (flag) {
    fn(std::true_type());
  } else {
    fn(std::false_type());
  }
}

// fn(std::bool_constant<low_nans>): a loop storing T through put_lanes gets its flag as a
// constant, one copy of the loop each way where T is rounded by bits, one copy elsewhere (left
// a runtime flag, the compiler branched around the NaN test inside the loop, and a LayerNorm
// bf16 forward lost 4-7%).
template <typename T, typename F>
NK_ALWAYS_INLINE void with_low_nans(bool low_nans, F&& fn) {
  if constexpr (kRoundsByBits<T>) {
    with_flag(low_nans, fn);
  } else {
    fn(std::false_type());  // put_lanes has no NaN test to skip
  }
}

// A chunk is two accumulator vectors: exactly one Vectorized<Half/BFloat16> widened to fp32,
// or two plain fp32/fp64 vectors. Loops step one chunk at a time and finish with a masked one
// (load_first / store_first, or a chunk ending at the segment's end, keep_last).
template <typename T>
struct Chunk {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t size = 2 * V::size();
  static constexpr bool widened = !std::is_same_v<T, A>;

  static inline void load(const T* p, V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      lo = widen_half_chunk(p);
      hi = widen_half_chunk(p + V::size());
      return;
    }
#endif
    if constexpr (widened) {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    } else {
      lo = V::loadu(p);
      hi = V::loadu(p + V::size());
    }
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // V::size() bf16 or fp16 values at p as fp32, widened straight from memory (bf16: the load
  // folded into the zero-extend, then the shift into the upper half of each lane; fp16: into the
  // conversion), where ATen's conversion of a chunk loads the whole vector and extracts its
  // upper half first: one instruction less a half. Bit-identical. Zen 4, paired in one process,
  // the short-plane BatchNorm 16x512x7x7 (its natural-order tiles): bf16 training forward 0.96x
  // the time, backward 0.94x, forward+backward 0.96x (capped to AVX2: backward 0.91x,
  // forward+backward 0.94x); fp16 forward 0.94x, backward 0.95x, forward+backward 0.95x
  // (AVX2: 0.86x).
  static inline V widen_half_chunk(const T* p) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return V(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    } else {
      return V(_mm512_cvtph_ps(h));
    }
#else
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return V(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    } else {
      return V(_mm256_cvtph_ps(h));
    }
#endif
  }
#endif
  static inline void store(T* p, const V& lo, const V& hi) {
    if constexpr (widened) {
      narrow<T>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + V::size());
    }
  }
  // store(), as streaming stores when `stream` is set and p is aligned for them (the elementwise
  // passes align their stores; a misaligned one, such as a row of odd length, stays plain).
  static constexpr uintptr_t stream_align = widened ? sizeof(Vectorized<T>) : sizeof(V);
  static inline void put(T* p, const V& lo, const V& hi, bool stream) {
    if constexpr (widened) {
      put_vector(p, narrow<T>(lo, hi), stream);
    } else if (!stream || reinterpret_cast<uintptr_t>(p) % stream_align != 0) {
      store(p, lo, hi);
    } else {
      stream_vec(p, lo);
      stream_vec(p + V::size(), hi);
    }
  }
  // One vector of T at p, streamed where asked and p is aligned for it (put()'s rule).
  static inline void put_vector(T* p, const Vectorized<T>& v, bool stream) {
    if (stream && reinterpret_cast<uintptr_t>(p) % stream_align == 0) {
      stream_vec(p, v);
    } else {
      v.store(p);
    }
  }

  // Lane order. A kernel whose lanes meet only per-column arrays of the same row (a layer-norm
  // row against its weight) may load its chunks in any fixed order, if those arrays are put in
  // the same order (to_lanes). bf16 loads cheapest as even/odd: of one vector load of bf16,
  // shifting every 32-bit lane left by 16 gives the even elements as fp32 and masking off the
  // low 16 bits the odd ones; two instructions where the in-order widening takes five, three of
  // them shuffles (AVX-512 and AVX2 alike). Stored back, the two halves interleave with one
  // word blend under AVX2 (see put_lanes). Side by side on an AVX2-only Zen 3, 2 threads,
  // against in-order bf16: layer norm steps 0.75-0.93x the time, channels_last
  // group/batch/instance norm 0.7-0.95x. Everywhere else (fp32, fp16) the lane order is the
  // natural one.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool even_odd = std::is_same_v<T, at::BFloat16>;
#else
  static constexpr bool even_odd = false;
#endif
  // lo, hi = the chunk at p in lane order: elements 0, 2, .., 30 and 1, 3, .., 31 where
  // even_odd, else as load().
  static inline void load_lanes(const T* p, V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (even_odd) {
      const __m512i v = _mm512_loadu_si512(p);
      lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (even_odd) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
      lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      hi = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      return;
    }
#endif
    load(p, lo, hi);
  }
  // put() of a chunk held in lane order. low_nans: some lane may be a NaN with payload bits in
  // its lower half (low_nan); false lets the AVX2 bf16 rounding skip its NaN test.
  static inline void put_lanes(T* p, const V& lo, const V& hi, bool stream, bool low_nans) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (even_odd) {
      // narrow() packs lo's 16 values, then hi's; one word permute interleaves them
      const __m512i interleave = _mm512_set_epi16(
          31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
          23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      put_vector(p, Vectorized<T>(_mm512_permutexvar_epi16(interleave, narrow<T>(lo, hi))), stream);
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (even_odd) {
      // Each lane rounded to bf16 in its upper 16 bits; the even elements' shifted down into
      // the lower word, the odd ones' kept in the upper: interleaved by one word blend (where
      // narrow() packs and permutes; a mask and an OR took one instruction more, 8% of a
      // BatchNorm inference chunk in a standalone loop).
      put_vector(p,
                 Vectorized<T>(_mm256_blend_epi16(
                     _mm256_srli_epi32(avx2::round_to_bf16(lo, low_nans), 16),
                     avx2::round_to_bf16(hi, low_nans), 0xAA)),
                 stream);
      return;
    }
#endif
    put(p, lo, hi, stream);
  }
  // A chunk's two accumulator vectors in natural order -> in lane order, and back: two
  // two-source permutes each way (none where the lane order is natural).
  static inline void to_lane_order(V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (even_odd) {  // the even elements, then the odd ones
      permute_pair(lo, hi,
                   _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), 1);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (even_odd) {  // per 128-bit half 0 2 8 10 | 4 6 12 14, then halves' qwords sorted
      const __m256 even = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 odd = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
      lo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8));
      hi = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), 0xD8));
    }
#endif
  }
  static inline void from_lane_order(V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (even_odd) {  // even and odd interleaved again
      permute_pair(lo, hi,
                   _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), 8);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (even_odd) {  // per 128-bit half 0 1 2 3 | 8 9 10 11 and 4 5 6 7 | 12 13 14 15
      const __m256 a = _mm256_unpacklo_ps(lo, hi);
      const __m256 b = _mm256_unpackhi_ps(lo, hi);
      lo = _mm256_permute2f128_ps(a, b, 0x20);
      hi = _mm256_permute2f128_ps(a, b, 0x31);
    }
#endif
  }
#if defined(CPU_CAPABILITY_AVX512)
  // lo, hi <- the lanes of the pair (lo, hi) that indices idx and idx + step pick.
  static inline void permute_pair(V& lo, V& hi, __m512i idx, int step) {
    const V a(_mm512_permutex2var_ps(lo, idx, hi));
    const V b(_mm512_permutex2var_ps(lo, _mm512_add_epi32(idx, _mm512_set1_epi32(step)), hi));
    lo = a;
    hi = b;
  }
#endif
  // Index, within a row of n, of the element that lane-ordered position i holds: the identity
  // past the last full chunk (tails, masked chunks, are in natural order).
  static inline int64_t lane_element(int64_t i, int64_t n) {
    if (!even_odd || i >= n / size * size) return i;
    const int64_t k = i % size, half = size / 2;
    return i - k + (k < half ? 2 * k : 2 * (k - half) + 1);
  }
  // The first n (0 < n < size) elements, the other lanes zero: masked loads, so short segments
  // (a 7x7 plane is one chunk and a 17-element tail) stay vectorized.
  static NK_ALWAYS_INLINE void load_first(const T* p, int64_t n, V& lo, V& hi) {
    if constexpr (widened) {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(load_part(p, n));
    } else {
      lo = load_part(p, std::min<int64_t>(n, V::size()));
      hi = n > V::size() ? load_part(p + V::size(), n - V::size()) : V(0);
    }
  }
  static NK_ALWAYS_INLINE void store_first(T* p, int64_t n, const V& lo, const V& hi) {
    if constexpr (widened) {
      store_part(p, n, narrow<T>(lo, hi));
    } else {
      store_part(p, std::min<int64_t>(n, V::size()), lo);
      if (n > V::size()) store_part(p + V::size(), n - V::size(), hi);
    }
  }
  // Zero every lane from the n-th on.
  static inline void keep_first(int64_t n, V& lo, V& hi) {
    if (n >= V::size()) {
      hi = zero_lanes(hi, n - V::size(), false);
    } else {
      lo = zero_lanes(lo, n, false);
      hi = V(0);
    }
  }
  // Zero every lane before the (size - n)-th: of a full chunk loaded to end at a segment's end,
  // keeps only the n lanes no earlier chunk covered.
  static inline void keep_last(int64_t n, V& lo, V& hi) {
    const int64_t skip = size - n;
    if (skip >= V::size()) {
      lo = V(0);
      hi = zero_lanes(hi, skip - V::size(), true);
    } else {
      lo = zero_lanes(lo, skip, true);
    }
  }
  // The tail p[i:n] of a segment of n (after its whole chunks, i < n), as every pass reads it, in
  // natural order, the other lanes zero: the chunk that ends the segment, its lanes before i
  // zeroed, where the segment has a chunk's worth (no masked load), else its first n - i
  // elements. keep_tail zeroes those other lanes again, after arithmetic that made them nonzero.
  static NK_ALWAYS_INLINE void load_tail(const T* p, int64_t i, int64_t n, V& lo, V& hi) {
    if (n >= size) {
      load(p + n - size, lo, hi);
      keep_last(n - i, lo, hi);
    } else {
      load_first(p + i, n - i, lo, hi);
    }
  }
  static NK_ALWAYS_INLINE void keep_tail(int64_t i, int64_t n, V& lo, V& hi) {
    if (n >= size) {
      keep_last(n - i, lo, hi);
    } else {
      keep_first(n - i, lo, hi);
    }
  }
};

// dst[i] = src[Chunk<T>::lane_element(i, n)] for a row of n: a per-column array (weight,
// bias) of T or of the accumulation type, put in the lane order of T's chunks, widened.
template <typename T, typename S>
inline void to_lanes(const S* src, acc_t<T>* dst, int64_t n) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using V = typename C::V;
  static_assert(std::is_same_v<S, T> || std::is_same_v<S, A>, "T or its accumulation type");
  int64_t i = 0;
  for (; i + C::size <= n; i += C::size) {
    V lo, hi;
    if constexpr (std::is_same_v<S, T>) {
      C::load_lanes(src + i, lo, hi);
    } else {
      Chunk<S>::load(src + i, lo, hi);
      C::to_lane_order(lo, hi);
    }
    lo.store(dst + i);
    hi.store(dst + i + V::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
}

// The inverse of to_lanes for an array of the accumulation type: dst[lane_element(i, n)] =
// src[i].
template <typename T>
inline void from_lanes(const acc_t<T>* src, acc_t<T>* dst, int64_t n) {
  using C = Chunk<T>;
  using V = typename C::V;
  int64_t i = 0;
  for (; i + C::size <= n; i += C::size) {
    V lo = V::loadu(src + i), hi = V::loadu(src + i + V::size());
    C::from_lane_order(lo, hi);
    lo.store(dst + i);
    hi.store(dst + i + V::size());
  }
  std::copy(src + i, src + n, dst + i);
}

// Segment tails. A tail of a segment at least one chunk long is done as the full chunk ending
// at the segment's end, overlapping the chunk before it: elementwise passes simply recompute
// (and rewrite identically) the overlap, reductions zero the overlapping lanes in registers.
// Masked loads and stores cost ~50 cycles each here (measured: a 14x14-plane batch norm spent
// a quarter of its time in its 4-element tails), full unaligned ones a few. Segments shorter
// than a chunk still use masked memory access.

// Sum of a vector's lanes, as a tree of halvings: a chain of 16 scalar adds was a sixth of a
// 16x512x7x7 batch-norm forward (three per channel in its statistics merge).
template <typename A>
inline A hsum(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return _mm512_reduce_add_ps(v);
  } else if constexpr (std::is_same_v<A, double>) {
    return _mm512_reduce_add_pd(v);
  }
#endif
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  for (int64_t half = Vectorized<A>::size() / 2; half > 0; half /= 2) {
    for (int64_t i = 0; i < half; ++i) buf[i] += buf[i + half];
  }
  return buf[0];
}

// out[k] = hsum(v[k]) for k < n, bit for bit. Under AVX2, eight fp32 vectors at a time go as one
// transposed tree: each vector's lanes i and i + 4 added, then i and i + 2, then the last pair, as
// hsum adds them, the eight sums in one vector. One at a time, each hsum stored its vector and
// summed it in scalar code, reading back what it had just stored: in a GroupNorm backward of 4x4
// planes those sums were the larger part of its per-plane sums' time.
template <typename A>
inline void hsum_each(const Vectorized<A>* v, int64_t n, A* out) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    for (; k + 8 <= n; k += 8) {
      __m256 pairs[4];  // [v lanes i + (i + 4) | the next v's], i < 4
      for (int j = 0; j < 4; ++j) {
        const __m256 a = v[k + 2 * j], b = v[k + 2 * j + 1];
        pairs[j] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                 _mm256_permute2f128_ps(a, b, 0x31));
      }
      __m256 quads[2];  // per 128 bits: lanes 0 + 2, 1 + 3 of two vectors' pairs
      for (int j = 0; j < 2; ++j) {
        quads[j] = _mm256_add_ps(
            _mm256_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
            _mm256_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
      }
      // sums of vectors 0, 2, 4, 6 | 1, 3, 5, 7
      const __m256 sums =
          _mm256_add_ps(_mm256_shuffle_ps(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm256_shuffle_ps(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
      _mm256_storeu_ps(out + k,
                       _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
  }
#endif
  for (; k < n; ++k) out[k] = hsum(v[k]);
}

// ---------------------------------------------------------------- contiguous segments
//
// A segment's lanes meet no per-element array, so full chunks load in lane order
// (Chunk::load_lanes) and elementwise passes store them back in it; the tails, masked or
// overlapping, stay in natural order, which keep_first/keep_last count in.

// Segments of at least this many chunks are summed two chunks a step into a second pair of
// accumulators: with one pair each add waits on the previous one (3-4 cycles), which bounds a
// pass re-reading a row or group from L1/L2. Side by side, 2 threads, forwards: layer norm bf16
// 4-6% faster (4096x1024, 8192x768, 512x8192), group norm bf16 6-9%, batch norm 16x64x56x56
// bf16 6-8% (fp32 512x1024 layer norm in L2, one thread: 9%). Shorter segments (a 14x14 plane
// is six fp32 chunks) keep one pair: there the second pair cost 3-5% of a forward.
constexpr int64_t kUnrollFrom = 8;

// Vector accumulators that several segments can add into before one horizontal sum (the
// planes of one batch-norm channel are N short segments: a horizontal sum per plane would cost
// more than the plane itself at 7x7).
template <typename T>
struct VecSum {
  using V = typename Chunk<T>::V;
  V lo{0}, hi{0};
  acc_t<T> total() const { return hsum(lo + hi); }
  // lane by lane: another set of accumulators (a second unrolled pair, a plane's own sums)
  VecSum& operator+=(const VecSum& other) {
    lo += other.lo;
    hi += other.hi;
    return *this;
  }
};

// A pass that reads its input from memory asks for the bytes kStreamAheadBytes past each chunk
// it loads (stream_ahead): the hardware prefetchers alone kept too few lines in flight to fill
// the memory bus. A LayerNorm-shaped kernel in C++ (row sums, squared deviations, normalize with
// streaming stores), 2 threads, this EPYC guest, 8192x768 fp32: 1.22 -> 0.86 ms with 4-8 KB
// ahead (2 KB: 0.95 ms), 4096x1024 0.54 -> 0.43-0.46 ms, 512x8192 0.64 -> 0.57-0.60 ms. In the
// kernels, paired in one process against no request, random order: LayerNorm 8192x768 fp32
// forward 0.82-0.88x the time, forward+backward 0.81-0.91x, 4096x1024 forward+backward
// 0.74-0.77x; the other first passes (RMSNorm, NCHW GroupNorm/BatchNorm/InstanceNorm)
// 0.87-1.04x, within the noise where they fit the L3. Past the end of a thread's range (or of
// the tensor) the requests are wasted, never faults: a prefetch does not fault. (BatchNorm's
// NCHW inference, one pass, did better without: see channel_affine.)
constexpr int64_t kStreamAheadBytes = 8192;

// Asks for the lines at q, q + 64, ... below q + kBytes, into L1 (prefetcht0 on x86).
template <int64_t kBytes>
inline void prefetch_lines(const char* q) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t o = 0; o < kBytes; o += static_cast<int64_t>(kCacheLineBytes))
    __builtin_prefetch(q + o, 0, 3);
#else
  (void)q;
#endif
}

template <typename T>
inline void stream_ahead(const T* p) {
  prefetch_lines<Chunk<T>::size * static_cast<int64_t>(sizeof(T))>(
      reinterpret_cast<const char*>(p) + kStreamAheadBytes);
}

// Calls add(a, b, acc) for the lanes a, b of every full chunk of p[0:n], from kUnrollFrom
// chunks on two chunks a step, the second into its own pair of accumulators (merged into acc at
// the end); returns where the tail starts. kAhead: the pass reads p from memory (stream_ahead).
template <bool kAhead, typename T, typename Add>
inline int64_t accumulate_chunks(const T* p, int64_t n, VecSum<T>& acc, const Add& add) {
  using C = Chunk<T>;
  using V = typename C::V;
  // The loops add into a local copy, stored back once: `acc` lives in the caller's memory, and
  // the vector loads of p may alias it (the intrinsics' vector types may alias anything), so
  // where this is not inlined into acc's owner, adding into acc itself kept it in memory, each
  // add waiting on the last one's store (the layer-norm forward's out-of-line squared-deviation
  // pass). Paired in one process, Zen 3, 2 threads: LayerNorm forwards bf16 0.73-0.81x the
  // time, fp32 0.84-0.92x; forward+backward 0.89-0.90x (bf16), 0.96-0.99x (fp32).
  VecSum<T> first = acc;
  int64_t i = 0;
  if (n >= kUnrollFrom * C::size) {
    VecSum<T> second;
    for (; i + 2 * C::size <= n; i += 2 * C::size) {
      V a, b, c, d;
      if constexpr (kAhead) {
        stream_ahead(p + i);
        stream_ahead(p + i + C::size);
      }
      C::load_lanes(p + i, a, b);
      C::load_lanes(p + i + C::size, c, d);
      add(a, b, first);
      add(c, d, second);
    }
    first += second;
  }
  for (; i + C::size <= n; i += C::size) {
    V a, b;
    if constexpr (kAhead) stream_ahead(p + i);
    C::load_lanes(p + i, a, b);
    add(a, b, first);
  }
  acc = first;
  return i;
}

// One chunk's lanes a, b (or a tail's, as Chunk::load_tail loads them, zero past n) added into
// a sums pass's accumulators: SumStep the values, SqDevStep their squared deviations from a
// shift. The one-segment passes (accumulate_sum, accumulate_sq_dev) and the R-segment one
// (segments_moment) take these same steps, so their results are the same bits.
template <typename T>
struct SumStep {
  using V = typename Chunk<T>::V;
  NK_ALWAYS_INLINE void operator()(V a, V b, VecSum<T>& s) const {
    s.lo += a;
    s.hi += b;
  }
  NK_ALWAYS_INLINE void tail(V a, V b, int64_t, int64_t, VecSum<T>& s) const { (*this)(a, b, s); }
};
template <typename T>
struct SqDevStep {
  using V = typename Chunk<T>::V;
  V shift;
  NK_ALWAYS_INLINE void operator()(V a, V b, VecSum<T>& s) const {
    a = a - shift;
    b = b - shift;
    s.lo = at::vec::fmadd(a, a, s.lo);
    s.hi = at::vec::fmadd(b, b, s.hi);
  }
  // the tail's lanes from i on, of n: -shift outside it zeroed
  NK_ALWAYS_INLINE void tail(V a, V b, int64_t i, int64_t n, VecSum<T>& s) const {
    a = a - shift;
    b = b - shift;
    Chunk<T>::keep_tail(i, n, a, b);
    s.lo = at::vec::fmadd(a, a, s.lo);
    s.hi = at::vec::fmadd(b, b, s.hi);
  }
};

// lanes += step over p[0:n]: its chunks (accumulate_chunks), then its tail
template <bool kAhead, typename T, typename Step>
inline void accumulate_steps(const T* p, int64_t n, const Step& step, VecSum<T>& acc) {
  const int64_t i = accumulate_chunks<kAhead>(p, n, acc, step);
  if (i < n) {
    typename Chunk<T>::V a, b;
    Chunk<T>::load_tail(p, i, n, a, b);
    step.tail(a, b, i, n, acc);
  }
}

// lanes += p[0:n]
template <bool kAhead = false, typename T>
inline void accumulate_sum(const T* p, int64_t n, VecSum<T>& acc) {
  accumulate_steps<kAhead>(p, n, SumStep<T>{}, acc);
}

// lanes += (p[0:n] - shift)^2
template <bool kAhead = false, typename T>
inline void accumulate_sq_dev(const T* p, int64_t n, acc_t<T> shift, VecSum<T>& acc) {
  accumulate_steps<kAhead>(p, n, SqDevStep<T>{typename Chunk<T>::V(shift)}, acc);
}

template <bool kAhead = false, typename T>
inline acc_t<T> segment_sum(const T* p, int64_t n) {
  VecSum<T> acc;
  accumulate_sum<kAhead>(p, n, acc);
  return acc.total();
}

template <bool kAhead = false, typename T>
inline acc_t<T> segment_sq_dev(const T* p, int64_t n, acc_t<T> shift) {
  VecSum<T> acc;
  accumulate_sq_dev<kAhead>(p, n, shift, acc);
  return acc.total();
}

// accumulate_steps over R segments p[r] of n values each, step steps[r] (SumStep or SqDevStep),
// each segment's total into out[r]: each segment's arithmetic exactly that of its own pass (the
// same accumulators, chunks and tail in the same order: the same bits; a segment_sum or
// segment_sq_dev), the R segments' chunks side by side in one loop, so that their chains of adds
// run beside each other instead of one after another.
template <int R, bool kAhead, typename T, typename Step>
NK_ALWAYS_INLINE void segments_moment(const T* const* p, int64_t n, const Step* steps,
                                      acc_t<T>* out) {
  using C = Chunk<T>;
  using V = typename C::V;
  VecSum<T> first[R];
  int64_t i = 0;
  if (n >= kUnrollFrom * C::size) {  // (accumulate_chunks' two chunks a step)
    VecSum<T> second[R];
    for (; i + 2 * C::size <= n; i += 2 * C::size) {
      NK_UNROLL_CHUNKS
      for (int r = 0; r < R; ++r) {
        V a, b, c, d;
        if constexpr (kAhead) {
          stream_ahead(p[r] + i);
          stream_ahead(p[r] + i + C::size);
        }
        C::load_lanes(p[r] + i, a, b);
        C::load_lanes(p[r] + i + C::size, c, d);
        steps[r](a, b, first[r]);
        steps[r](c, d, second[r]);
      }
    }
    NK_UNROLL_CHUNKS
    for (int r = 0; r < R; ++r) first[r] += second[r];
  }
  for (; i + C::size <= n; i += C::size) {
    NK_UNROLL_CHUNKS
    for (int r = 0; r < R; ++r) {
      V a, b;
      if constexpr (kAhead) stream_ahead(p[r] + i);
      C::load_lanes(p[r] + i, a, b);
      steps[r](a, b, first[r]);
    }
  }
  NK_UNROLL_CHUNKS
  for (int r = 0; r < R; ++r) {
    if (i < n) {
      V a, b;
      C::load_tail(p[r], i, n, a, b);
      steps[r].tail(a, b, i, n, first[r]);
    }
    out[r] = first[r].total();
  }
}

// Bytes of a block of plane_moments (its second pass reads the block back from L1).
constexpr int64_t kMomentsBlockBytes = 16384;

// (mean, sum of squared deviations from it) of one block of plane_moments: `planes` segments of
// `len` values, `stride` apart, summed, then their squared deviations from that mean (read back
// from L1). Out of line: inlined into plane_moments, whose fp64 merges keep values in registers
// across these loops, GCC kept one of the fp16 squared-deviation accumulators on the stack, each
// FMA waiting on the store of the one before (62% of the fp16 BatchNorm forward's statistics
// samples on that one instruction); a call a block costs nothing against its 8K values.
// plane_moments is out of line too, as GCC had left it for the GroupNorm forward: inlined there
// (its blocks out of line), that forward's normalize pass moved in the code and the fp16 forward
// took 1.03-1.06x the time.
template <bool kAhead, typename T>
NK_NOINLINE std::pair<acc_t<T>, acc_t<T>> block_moments(const T* p, int64_t planes, int64_t len,
                                                        int64_t stride) {
  using A = acc_t<T>;
  VecSum<T> sum, sq;
  for (int64_t k = 0; k < planes; ++k) accumulate_sum<kAhead>(p + k * stride, len, sum);
  const A mean = sum.total() / static_cast<A>(planes * len);
  for (int64_t k = 0; k < planes; ++k) accumulate_sq_dev(p + k * stride, len, mean, sq);
  return {mean, sq.total()};
}

// (mean, sum of squared deviations from it) of `planes` segments of `len` values, `stride`
// apart (one group of NCHW GroupNorm: one plane; one channel of NCHW BatchNorm: N planes), in
// one read from memory or L2: block by block of about kMomentsBlockBytes (a long plane cut in
// pieces, short ones taken several at a time), each block's two passes (block_moments), the
// blocks merged in order by the exact combination (Chan, Golub and LeVeque), as stable as two
// passes over the whole. Two whole passes read a GroupNorm group (80-160 KB) or a BatchNorm
// channel (200 KB at 16x64x56x56 fp32) back from L2: skipping that second read made GroupNorm
// 2x320x64x64 and 2x640x32x32 forwards 10% (fp32) to 19% (bf16) faster on the Xeon guest; these
// blocks, 8-10% fp32 (bf16 2-8%: it widens each value twice still). kAhead: the values come from
// memory (stream_ahead).
template <bool kAhead = false, typename T>
NK_NOINLINE std::pair<acc_t<T>, acc_t<T>> plane_moments(const T* p, int64_t planes, int64_t len,
                                                        int64_t stride) {
  using A = acc_t<T>;
  // The merged statistics in fp64 for fp32 values: each merge rounds the running mean, and in
  // fp32 those roundings added up over a channel's blocks (49 at 64x64x56x56) to about 4x the
  // error of ATen's mean; the fp32 dweight, whose error is the mean's times sum(dy), had 6x
  // ATen's. A few scalar fp64 operations a block.
  using M = std::conditional_t<std::is_same_v<A, float>, double, A>;
  constexpr int64_t block = kMomentsBlockBytes / static_cast<int64_t>(sizeof(T));
  M count = 0, mean = 0, m2 = 0;
  // merges a block of n values, mean block_mean and squared deviations block_m2, into the rest
  const auto merge = [&](int64_t n, const std::pair<A, A>& moments) {
    const auto [block_mean, block_m2] = moments;
    const M total = count + static_cast<M>(n);
    const M weight = static_cast<M>(n) / total;  // the block's share of the values so far
    const M delta = static_cast<M>(block_mean) - mean;
    mean += delta * weight;
    m2 += static_cast<M>(block_m2) + delta * delta * count * weight;
    count = total;
  };
  if (len >= block) {
    for (int64_t k = 0; k < planes; ++k) {
      const T* q = p + k * stride;
      for (int64_t i = 0; i < len; i += block) {
        const int64_t n = std::min(block, len - i);
        merge(n, block_moments<kAhead>(q + i, 1, n, 0));
      }
    }
  } else if (len > 0) {
    const int64_t per_block = block / len;
    for (int64_t k0 = 0; k0 < planes; k0 += per_block) {
      const int64_t k1 = std::min(planes, k0 + per_block);
      merge((k1 - k0) * len, block_moments<kAhead>(p + k0 * stride, k1 - k0, len, stride));
    }
  }
  return {static_cast<A>(mean), static_cast<A>(m2)};
}

// Where an elementwise pass over a segment of n elements starts its aligned loop: the first
// index at which `out` is aligned to a chunk (or a cache line, if smaller), or 0 when it
// already is or the segment is shorter than a chunk. Stores that straddle two cache lines cost
// about twice an aligned one, and a segment of odd length (a 14x14 plane is 784 bytes) leaves
// most segments misaligned (measured: 14x14 batch norm inference 10% slower than 16x16 per
// byte); the pass then does a masked head and aligned chunks.
template <typename T>
inline int64_t aligned_start(const T* out, int64_t n) {
  // a chunk's bytes, at most a cache line: the head must stay shorter than one chunk
  constexpr uintptr_t align = std::min<uintptr_t>(64, Chunk<T>::size * sizeof(T));
  if (n < Chunk<T>::size) return 0;
  const auto misalign = reinterpret_cast<uintptr_t>(out) % align;
  if (misalign == 0 || misalign % sizeof(T) != 0) return 0;
  return static_cast<int64_t>((align - misalign) / sizeof(T));
}

// Whether the chunk at index i of an elementwise pass over [i0, n) (i0: where its chunk loop
// starts) may go out as streaming stores. Only whole cache lines should: a line that streaming
// stores fill in part leaves the write-combining buffer as partial writes, dearer than the
// plain stores they replace. A chunk of 16-bit elements under AVX2 is half a line, so it
// streams only with its line's other half in the same loop: the next chunk where it starts a
// line, the previous one where it ends one. Zen 3 guest, paired in one process against
// streaming every aligned chunk: 32x1024x14x14 bf16 batch-norm backward (392-byte planes)
// 0.57x the time (6.4 -> 3.75 ms), bf16 layer norm with 2000-byte rows 0.84-0.86x, bf16 passes
// whose rows and planes are whole lines 0.99-1.02x. A wider chunk is a whole line where the
// pass starts aligned to one (the segment passes, aligned_start); in a layer-norm row, which
// starts where it may, consecutive chunks complete each other's lines but for the row's ends.
template <typename T>
inline bool whole_line_chunk(const T* p, int64_t i, int64_t i0, int64_t n) {
  constexpr int64_t kBytes = Chunk<T>::size * static_cast<int64_t>(sizeof(T));
  if constexpr (kBytes >= 64) {
    return true;
  } else if constexpr (2 * kBytes == 64) {
    return reinterpret_cast<uintptr_t>(p) % 64 == 0 ? i + 2 * Chunk<T>::size <= n : i > i0;
  } else {
    // a quarter of a line or less: 16-bit chunks of 128-bit vectors (the portable build on
    // Arm, whose stream_vec is a plain store anyway)
    return false;
  }
}

// The walk of an elementwise pass over a segment of n elements writing `out`: part(i, m) on the
// masked head up to the first aligned store (aligned_start) and on the tail, whole(i, stream,
// low) on each whole chunk between, stream set only for chunks filling whole cache lines
// (whole_line_chunk) and low: with_low_nans' compile-time flag, for put_lanes. Every segment
// pass walks this way (segment_affine, segment_grad_input, GroupNorm's runs of short planes).
template <typename T, typename Whole, typename Part>
NK_ALWAYS_INLINE void segment_walk(T* out, int64_t n, bool stream, bool low_nans,
                                   const Whole& whole, const Part& part) {
  int64_t i = aligned_start(out, n);
  if (i > 0) part(0, i);
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (const int64_t i0 = i; i + Chunk<T>::size <= n; i += Chunk<T>::size)
      whole(i, stream && whole_line_chunk(out + i, i, i0, n), low);
  });
  if (i < n) part(i, n - i);
}

// The lanes of the two closed forms the elementwise passes write, defined once so that passes
// covering the same elements different ways (a segment, a run of planes, rows, register tiles)
// agree bit for bit:
//   y  = (x - center) * scale + shift
//   dx = dy * k_dy + ((x - center) * k_x + k_0)
template <typename V>
NK_ALWAYS_INLINE V affine_lanes(const V& x, const V& center, const V& scale, const V& shift) {
  return at::vec::fmadd(x - center, scale, shift);
}
// y = x * scale + shift: the center already folded into the shift (BatchNorm's elementwise
// passes with given statistics, see batch_norm_elemt)
template <typename V>
NK_ALWAYS_INLINE V affine_lanes(const V& x, const V& scale, const V& shift) {
  return at::vec::fmadd(x, scale, shift);
}
template <typename V>
NK_ALWAYS_INLINE V grad_input_lanes(const V& dy, const V& x, const V& center, const V& k_dy,
                                    const V& k_x, const V& k_0) {
  return at::vec::fmadd(dy, k_dy, at::vec::fmadd(x - center, k_x, k_0));
}

// y = (x - center) * scale + shift over a segment. Centering first (rather than folding the
// mean into the shift) keeps every digit when |mean| >> std, and gives exact zeros for
// constant input. kCentered false: y = x * scale + shift, center unused (a center folded into
// the shift by the caller). low_nans: some operand may be a low_nan, as in this and every
// elementwise pass below.
template <bool kCentered = true, typename T>
inline void segment_affine(const T* x, T* y, int64_t n, acc_t<T> center, acc_t<T> scale,
                           acc_t<T> shift, bool stream, bool low_nans) {
  using C = Chunk<T>;
  using V = typename C::V;
  const V vc(center), vs(scale), vb(shift);
  const auto affine = [&](const V& v) {
    if constexpr (kCentered) {
      return affine_lanes(v, vc, vs, vb);
    } else {
      return affine_lanes(v, vs, vb);
    }
  };
  segment_walk(
      y, n, stream, low_nans,
      [&](int64_t i, bool st, auto low) {
        V a, b;
        C::load_lanes(x + i, a, b);
        C::put_lanes(y + i, affine(a), affine(b), st, low.value);
      },
      [&](int64_t i, int64_t m) {
        V a, b;
        C::load_first(x + i, m, a, b);
        C::store_first(y + i, m, affine(a), affine(b));
      });
}

// An elementwise pass with per-channel coefficients (kCoeffs arrays indexed by channel) over NCHW
// planes [p0, p1) of C channels each sample (plane p is channel p % C), contiguous in memory,
// walked as one run of chunks rather than plane by plane (batch norm's y and dx on short planes,
// group norm's over a group's planes): the chunks inside a plane take its channel's coefficients,
// and the one chunk across a boundary (planes hold a chunk or more: hw >= Chunk<T>::size) its
// channel's, blended with the next one's from the lane that holds the next plane's first element.
// Only the run's ends are masked, and its stores to `out`, aligned from the first, stream as whole
// lines across the planes' boundaries. whole(i, lo, hi, stream, low) does the chunk at element i in
// lane order (coefficient k of its lanes: lo[k], hi[k]; low: with_low_nans' flag), part(i, m, lo,
// hi) the first m elements at i, in natural order, all of one channel. Bit-identical to the plane
// walk (segment_affine, segment_grad_input). Measured: batch_norm.cpp, kPlaneRunSamples.
template <typename T, size_t kCoeffs, typename Whole, typename Part>
NK_ALWAYS_INLINE void plane_run(T* out, int64_t p0, int64_t p1, int64_t C, int64_t hw,
                                std::array<const acc_t<T>*, kCoeffs> coeffs, bool stream,
                                bool low_nans, Whole&& whole, Part&& part) {
  using A = acc_t<T>;
  using K = Chunk<T>;
  using V = typename K::V;
  TORCH_INTERNAL_ASSERT(hw >= K::size);
  // (coeffs by value: the vector stores may alias anything, and through a reference the
  // pointers were reloaded after each store; 2x2048x7x7 fp32 inference 1.06x the time)
  // the element of the chunk each lane holds, in the chunks' lane order
  alignas(64) A lane_elem[K::size];
  for (int64_t k = 0; k < K::size; ++k) lane_elem[k] = static_cast<A>(K::lane_element(k, K::size));
  const V elem_lo = V::loadu(lane_elem), elem_hi = V::loadu(lane_elem + V::size());
  const int64_t n = p1 * hw;
  int64_t i = p0 * hw, c = p0 % C, plane_end = i + hw;
  std::array<V, kCoeffs> lo, hi;  // the chunk's coefficients, lane by lane
  // over the coefficients with constant indices, so lo and hi stay in registers (a runtime
  // loop over them made 2x2048x7x7 fp32 inference 1.12x the time)
  const auto each_coeff = [](auto&& f) {
    [&]<size_t... k>(std::index_sequence<k...>) {
      (f(std::integral_constant<size_t, k>()), ...);
    }(std::make_index_sequence<kCoeffs>());
  };
  const auto channel_coeffs = [&] {
    each_coeff([&](auto k) { lo[k] = hi[k] = V(coeffs[k][c]); });
  };
  // up to the first aligned store: fewer elements than a chunk, so within the first plane
  if (const int64_t head = aligned_start(out + i, n - i); head > 0) {
    channel_coeffs();
    part(i, head, lo, hi);
    i += head;
  }
  const int64_t i0 = i;
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (;; plane_end += hw) {
      channel_coeffs();
      for (; i + K::size <= plane_end; i += K::size)
        whole(i, lo, hi, stream && whole_line_chunk(out + i, i, i0, n), low);
      if (plane_end >= n) break;
      const int64_t next = c + 1 == C ? 0 : c + 1;
      if (i < plane_end) {
        // one chunk across the boundary, whole: the next plane holds a chunk or more. Its lanes
        // before the boundary take channel c's coefficients, the others the next channel's.
        const V cut(static_cast<A>(plane_end - i));
        const V here_lo = elem_lo < cut, here_hi = elem_hi < cut;
        each_coeff([&](auto k) {
          const V here(coeffs[k][c]), there(coeffs[k][next]);
          lo[k] = V::blendv(there, here, here_lo);
          hi[k] = V::blendv(there, here, here_hi);
        });
        whole(i, lo, hi, stream && whole_line_chunk(out + i, i, i0, n), low);
        i += K::size;
      }
      c = next;
    }
  });
  if (i < n) {  // the last plane's tail
    channel_coeffs();
    part(i, n - i, lo, hi);
  }
}

// y = (x - center[c]) * scale[c] + shift[c] on NCHW planes [p0, p1) (plane_run), coeffs
// {center, scale, shift}; or y = x * scale[c] + shift[c], coeffs {scale, shift}.
template <typename T, size_t kCoeffs>
NK_ALWAYS_INLINE void plane_run_affine(const T* xp, T* yp, int64_t p0, int64_t p1,
                                       int64_t C, int64_t hw,
                                       std::array<const acc_t<T>*, kCoeffs> coeffs,
                                       bool stream, bool low_nans) {
  static_assert(kCoeffs == 2 || kCoeffs == 3, "scale and shift, after a center or not");
  using K = Chunk<T>;
  using V = typename K::V;
  using Coeffs = std::array<V, kCoeffs>;
  const auto affine = [](const V& v, const Coeffs& k) {
    if constexpr (kCoeffs == 3) {
      return affine_lanes(v, k[0], k[1], k[2]);
    } else {
      return affine_lanes(v, k[0], k[1]);
    }
  };
  plane_run<T, kCoeffs>(
      yp, p0, p1, C, hw, coeffs, stream, low_nans,
      [&](int64_t i, const Coeffs& lo, const Coeffs& hi, bool st, auto low) {
        V a, b;
        K::load_lanes(xp + i, a, b);
        K::put_lanes(yp + i, affine(a, lo), affine(b, hi), st, low.value);
      },
      [&](int64_t i, int64_t m, const Coeffs& lo, const Coeffs& hi) {
        V a, b;
        K::load_first(xp + i, m, a, b);
        K::store_first(yp + i, m, affine(a, lo), affine(b, hi));
      });
}

// dx = k_dy[c] * dy + k_x[c] * (x - center[c]) + k_0[c] on NCHW planes [p0, p1) (plane_run;
// segment_grad_input's arithmetic).
template <typename T>
NK_ALWAYS_INLINE void plane_run_grad_input(const T* dy, const T* xp, T* dx, int64_t p0,
                                           int64_t p1, int64_t C, int64_t hw,
                                           const acc_t<T>* center, const acc_t<T>* k_dy,
                                           const acc_t<T>* k_x, const acc_t<T>* k_0,
                                           bool stream, bool low_nans) {
  using K = Chunk<T>;
  using V = typename K::V;
  using Coeffs = std::array<V, 4>;  // center, k_dy, k_x, k_0
  plane_run<T, 4>(
      dx, p0, p1, C, hw, {center, k_dy, k_x, k_0}, stream, low_nans,
      [&](int64_t i, const Coeffs& lo, const Coeffs& hi, bool st, auto low) {
        V ga, gb, xa, xb;
        K::load_lanes(dy + i, ga, gb);
        K::load_lanes(xp + i, xa, xb);
        K::put_lanes(dx + i, grad_input_lanes(ga, xa, lo[0], lo[1], lo[2], lo[3]),
                     grad_input_lanes(gb, xb, hi[0], hi[1], hi[2], hi[3]), st, low.value);
      },
      [&](int64_t i, int64_t m, const Coeffs& lo, const Coeffs& hi) {
        V ga, gb, xa, xb;
        K::load_first(dy + i, m, ga, gb);
        K::load_first(xp + i, m, xa, xb);
        K::store_first(dx + i, m, grad_input_lanes(ga, xa, lo[0], lo[1], lo[2], lo[3]),
                       grad_input_lanes(gb, xb, hi[0], hi[1], hi[2], hi[3]));
      });
}

// lanes: sum_dy += dy, sum_dy_xc += dy * (x - shift), over a segment (kAhead: read from
// memory, see stream_ahead).
template <bool kAhead = false, typename T>
inline void accumulate_grad_sums(const T* dy, const T* x, int64_t n, acc_t<T> shift,
                                 VecSum<T>& sum_dy, VecSum<T>& sum_dy_xc) {
  using C = Chunk<T>;
  using V = typename C::V;
  const V vshift(shift);
  // local copies, stored back once (see accumulate_chunks)
  VecSum<T> g = sum_dy, d = sum_dy_xc;
  int64_t i = 0;
  for (; i + C::size <= n; i += C::size) {
    V ga, gb, xa, xb;
    if constexpr (kAhead) {
      stream_ahead(dy + i);
      stream_ahead(x + i);
    }
    C::load_lanes(dy + i, ga, gb);
    C::load_lanes(x + i, xa, xb);
    g.lo += ga;
    g.hi += gb;
    d.lo = at::vec::fmadd(ga, xa - vshift, d.lo);
    d.hi = at::vec::fmadd(gb, xb - vshift, d.hi);
  }
  sum_dy = g;
  sum_dy_xc = d;
  if (i < n) {
    V ga, gb, xa, xb;
    if (n >= C::size) {
      C::load(dy + n - C::size, ga, gb);
      C::load(x + n - C::size, xa, xb);
      C::keep_last(n - i, ga, gb);  // zero dy zeroes both sums' overlap lanes
    } else {  // dy's lanes past n load as zero, so no mask is needed
      C::load_first(dy + i, n - i, ga, gb);
      C::load_first(x + i, n - i, xa, xb);
    }
    sum_dy.lo += ga;
    sum_dy.hi += gb;
    sum_dy_xc.lo = at::vec::fmadd(ga, xa - vshift, sum_dy_xc.lo);
    sum_dy_xc.hi = at::vec::fmadd(gb, xb - vshift, sum_dy_xc.hi);
  }
}

// (sum(dy), sum(dy * (x - shift))) over a segment.
template <bool kAhead = false, typename T>
inline std::pair<acc_t<T>, acc_t<T>> segment_grad_sums(const T* dy, const T* x, int64_t n,
                                                       acc_t<T> shift) {
  VecSum<T> g, d;
  accumulate_grad_sums<kAhead>(dy, x, n, shift, g, d);
  return {g.total(), d.total()};
}

// sum_dy[p] and sum_dy_xc[p] for each of `planes` planes, the horizontal sums of the lane sums
// plane_sums(p) gives (a pair of vectors), eight planes at a time (hsum_each).
template <typename T, typename PlaneSums>
NK_ALWAYS_INLINE void hsum_planes(int64_t planes, const PlaneSums& plane_sums, acc_t<T>* sum_dy,
                                  acc_t<T>* sum_dy_xc) {
  using V = typename Chunk<T>::V;
  constexpr int64_t kBatch = 8;
  for (int64_t p0 = 0; p0 < planes; p0 += kBatch) {
    const int64_t m = std::min(kBatch, planes - p0);
    V g[kBatch], d[kBatch];
    for (int64_t k = 0; k < m; ++k) std::tie(g[k], d[k]) = plane_sums(p0 + k);
    hsum_each(g, m, sum_dy + p0);
    hsum_each(d, m, sum_dy_xc + p0);
  }
}

// segment_grad_sums of each of `planes` contiguous planes of hw values (plane p's shift:
// shift_of(p)): the same sums bit for bit, their horizontal sums eight planes at a time
// (hsum_planes).
template <bool kAhead = false, typename T, typename ShiftOf>
inline void planes_grad_sums(const T* dy, const T* x, int64_t planes, int64_t hw,
                             const ShiftOf& shift_of, acc_t<T>* sum_dy, acc_t<T>* sum_dy_xc) {
  using V = typename Chunk<T>::V;
  hsum_planes<T>(
      planes,
      [&](int64_t p) {
        VecSum<T> plane_dy, plane_dy_xc;
        accumulate_grad_sums<kAhead>(dy + p * hw, x + p * hw, hw, shift_of(p), plane_dy,
                                     plane_dy_xc);
        return std::pair<V, V>(plane_dy.lo + plane_dy.hi, plane_dy_xc.lo + plane_dy_xc.hi);
      },
      sum_dy, sum_dy_xc);
}

// planes_grad_sums for planes shorter than a chunk (hw < Chunk<T>::size), bit for bit: each
// plane one chunk loaded whole from its start, where `readable` values from dy and x hold it
// (the last planes of a tensor load masked), its lanes from hw on zeroed in dy and in the
// product (x's are another plane's, maybe an inf). A masked load a plane costs more than a
// plane's few values (16-bit ones are emulated); so did scalar code, two conversions and two
// dependent adds a value.
template <typename T, typename ShiftOf>
inline void short_planes_grad_sums(const T* dy, const T* x, int64_t planes, int64_t hw,
                                   int64_t readable, const ShiftOf& shift_of, acc_t<T>* sum_dy,
                                   acc_t<T>* sum_dy_xc) {
  using C = Chunk<T>;
  using V = typename C::V;
  const V zero(0);
  hsum_planes<T>(
      planes,
      [&](int64_t p) {
        const int64_t off = p * hw;
        V ga, gb, xa, xb;
        if (off + C::size <= readable) {
          C::load(dy + off, ga, gb);
          C::load(x + off, xa, xb);
          C::keep_first(hw, ga, gb);
        } else {
          C::load_first(dy + off, hw, ga, gb);
          C::load_first(x + off, hw, xa, xb);
        }
        const V shift(shift_of(p));
        // (accumulate_grad_sums' arithmetic from zero sums: 0 + dy, fma(dy, x - shift, 0))
        V da = at::vec::fmadd(ga, xa - shift, zero), db = at::vec::fmadd(gb, xb - shift, zero);
        C::keep_first(hw, da, db);
        return std::pair<V, V>((zero + ga) + (zero + gb), da + db);
      },
      sum_dy, sum_dy_xc);
}

// fn(i, stream) for the vectors of a plane of hw >= V::size() values (i: the vector's first
// element) of a type held in natural order (fp32, fp64): chunk by chunk where hw is a whole number
// of chunks, streamed where asked (the caller checks the plane starts a line); else vector by
// vector, the last one ending at the plane's end, overlapping the one before it, whose values it
// rewrites identically (the output must not alias the inputs). No masked moves, no alignment head.
template <typename T, typename Fn>
NK_ALWAYS_INLINE void plane_vectors(int64_t hw, bool stream, const Fn& fn) {
  using C = Chunk<T>;
  using V = typename C::V;
  static_assert(!C::widened && !C::even_odd, "lanes in natural order");
  if (hw % C::size == 0) {
    for (int64_t i = 0; i < hw; i += C::size) {
      fn(i, stream);
      fn(i + V::size(), stream);
    }
    return;
  }
  int64_t i = 0;
  for (; i + V::size() <= hw; i += V::size()) fn(i, false);
  if (i < hw) fn(hw - V::size(), false);
}

// Whether planes of hw values at out can stream their stores: whole lines, from a line boundary.
template <typename T>
inline bool planes_stream(const T* out, int64_t hw, bool stream) {
  constexpr int64_t kLine = static_cast<int64_t>(kCacheLineBytes);
  return stream && reinterpret_cast<uintptr_t>(out) % kLine == 0 &&
         (hw * static_cast<int64_t>(sizeof(T))) % kLine == 0;
}

// segment_grad_input over each of `planes` contiguous planes of hw >= V::size() values of a type
// held in natural order (fp32, fp64), plane p's coefficients center[p], k_dy[p], k_x[p], k_0[p],
// by plane_vectors: the same arithmetic, bit for bit, without segment_grad_input's head, tail and
// alignment a plane. dx must not alias dy or x.
template <typename T>
inline void planes_grad_input(const T* dy, const T* x, T* dx, int64_t planes, int64_t hw,
                              const acc_t<T>* center, const acc_t<T>* k_dy, const acc_t<T>* k_x,
                              const acc_t<T>* k_0, bool stream) {
  using V = typename Chunk<T>::V;
  stream = planes_stream(dx, hw, stream);
  for (int64_t p = 0; p < planes; ++p, dy += hw, x += hw, dx += hw) {
    const V vc(center[p]), vdy(k_dy[p]), vx(k_x[p]), v0(k_0[p]);
    plane_vectors<T>(hw, stream, [&](int64_t i, bool st) {
      const V g = V::loadu(dy + i), v = V::loadu(x + i);
      Chunk<T>::put_vector(dx + i, grad_input_lanes(g, v, vc, vdy, vx, v0), st);
    });
  }
}

// segment_affine over each of `planes` contiguous planes of hw >= V::size() values of a type held
// in natural order, all centered on `center`, plane p's scale and shift from coeffs(p) (a pair),
// by plane_vectors (see planes_grad_input). y must not alias x.
template <typename T, typename Coeffs>
inline void planes_affine(const T* x, T* y, int64_t planes, int64_t hw, acc_t<T> center,
                          const Coeffs& coeffs, bool stream) {
  using V = typename Chunk<T>::V;
  stream = planes_stream(y, hw, stream);
  const V vc(center);
  for (int64_t p = 0; p < planes; ++p, x += hw, y += hw) {
    const auto [scale, shift] = coeffs(p);
    const V vs(scale), vb(shift);
    plane_vectors<T>(hw, stream, [&](int64_t i, bool st) {
      Chunk<T>::put_vector(y + i, affine_lanes(V::loadu(x + i), vc, vs, vb), st);
    });
  }
}

// dx = dy * k_dy + (x - center) * k_x + k_0 over a segment: the closed form of every norm's
// input gradient once its per-segment reductions are known (centered, like segment_affine).
template <typename T>
inline void segment_grad_input(const T* dy, const T* x, T* dx, int64_t n, acc_t<T> center,
                               acc_t<T> k_dy, acc_t<T> k_x, acc_t<T> k_0, bool stream,
                               bool low_nans) {
  using C = Chunk<T>;
  using V = typename C::V;
  const V vc(center), vdy(k_dy), vx(k_x), v0(k_0);
  const auto grad = [&](const V& g, const V& v) {
    return grad_input_lanes(g, v, vc, vdy, vx, v0);
  };
  segment_walk(
      dx, n, stream, low_nans,
      [&](int64_t i, bool st, auto low) {
        V ga, gb, xa, xb;
        C::load_lanes(dy + i, ga, gb);
        C::load_lanes(x + i, xa, xb);
        C::put_lanes(dx + i, grad(ga, xa), grad(gb, xb), st, low.value);
      },
      [&](int64_t i, int64_t m) {
        V ga, gb, xa, xb;
        C::load_first(dy + i, m, ga, gb);
        C::load_first(x + i, m, xa, xb);
        C::store_first(dx + i, m, grad(ga, xa), grad(gb, xb));
      });
}

// ---------------------------------------------------------------- columns of [rows, C]
//
// A matrix of `rows` rows of C columns whose rows start `ld` elements apart (ld == C for a
// channels_last tensor; ld > C for a block of channels cut from every sample of an NCHW one).
// Columns are walked in register tiles of whole chunks; the last C % chunk columns as one
// masked tile, so no column is ever done in scalar code.

// The column kernels read their data in the lane order of T's chunks (Chunk::load_lanes: for
// bf16 under AVX-512 two instructions a chunk where the in-order widening takes five, three of
// them shuffles, which is what bound the channels_last bf16 passes), so the per-column arrays
// they meet (coefficients, running sums) go into that order for the call, and results back out
// of it: O(C) work against the O(rows * C) of the call. Where the lane order is natural, no copy.
// Side by side, bf16, 2 threads: channels_last group norm forwards 0.75-0.92x the time, batch
// norm 16x64x56x56 0.73-0.89x. kLanes = false keeps the natural order throughout, for calls too
// short for the copies to pay (ShortPlanes: 16 rows; its 16x512x7x7 bf16 steps took 1.10-1.20x).
template <typename T, bool kLanes = true>
class LaneColumns {
  using A = acc_t<T>;
  static constexpr bool kCopy = kLanes && Chunk<T>::even_odd;
  int64_t C_;
  LineBuffer<A> buf_;  // every slot is written (copy_in, zeros) before it is read
  A* slot(int i) { return buf_.data() + i * C_; }
  A* copy_in(int i, const A* p) {
    to_lanes<T>(p, slot(i), C_);
    return slot(i);
  }

 public:
  LaneColumns(int64_t C, int slots) : C_(C), buf_(kCopy ? C * slots : 0) {}
  // p[0:C] in lane order, read-only.
  const A* in(int i, const A* p) { return kCopy ? copy_in(i, p) : p; }
  // Storage in place of p[0:C], unset, to be written in full and put back by out().
  A* written(int i, A* p) { return kCopy ? slot(i) : p; }
  // Writes slot i back to p[0:C] in natural order.
  void out(int i, A* p) {
    if constexpr (kCopy) from_lanes<T>(slot(i), p, C_);
  }
};

// Lanes of vector k of a tile that fall inside its `width` columns.
template <typename V>
inline int64_t tile_lanes(int64_t width, int k) {
  return std::clamp<int64_t>(width - k * V::size(), 0, V::size());
}

// Loads (stores) vector k of a tile of accumulation-type values: whole, or masked to the tile's
// width (kMasked: the last, partial tile of a row).
template <bool kMasked, typename V>
inline V tile_load(const typename V::value_type* p, int64_t width, int k) {
  if constexpr (kMasked) {
    return V::loadu(p + k * V::size(), tile_lanes<V>(width, k));
  } else {
    return V::loadu(p + k * V::size());
  }
}
template <bool kMasked, typename V>
inline void tile_store(const V& v, typename V::value_type* p, int64_t width, int k) {
  if constexpr (kMasked) {
    v.store(p + k * V::size(), tile_lanes<V>(width, k));
  } else {
    v.store(p + k * V::size());
  }
}
// A tile's K vectors of the per-column array p over the columns [c, c + width), and back.
template <bool kMasked, int K, typename V>
inline void tile_load_columns(const typename V::value_type* p, int64_t c, int64_t width, V* out) {
  for (int k = 0; k < K; ++k) out[k] = tile_load<kMasked, V>(p + c, width, k);
}
template <bool kMasked, int K, typename V>
inline void tile_store_columns(const V* v, typename V::value_type* p, int64_t c, int64_t width) {
  for (int k = 0; k < K; ++k) tile_store<kMasked>(v[k], p + c, width, k);
}
// One row's K vectors of input at p (K = 2 when masked: a partial tile is less than a chunk).
template <bool kMasked, int K, bool kLanes, typename T>
inline void tile_load_row(const T* p, int64_t width, typename Chunk<T>::V* out) {
  if constexpr (kMasked) {
    static_assert(K == 2, "a masked tile is one partial chunk");
    Chunk<T>::load_first(p, width, out[0], out[1]);
  } else {
    for (int k = 0; k < K; k += 2) {
      if constexpr (kLanes) {
        Chunk<T>::load_lanes(p + k * Chunk<T>::V::size(), out[k], out[k + 1]);
      } else {
        Chunk<T>::load(p + k * Chunk<T>::V::size(), out[k], out[k + 1]);
      }
    }
  }
}

// A tile's sweep down its columns reads one to four lines a row, rows apart: a pattern the
// hardware prefetchers follow too closely to hide memory latency (the statistics pass of a
// channels_last group norm, 2x320x64x64 bf16, from memory: 82% of its samples on the first load
// of a row, and twice the time of torch's sum of the same tensor). So the sweep asks for the
// row kPrefetchRows ahead in its columns itself (that pass 0.96-1.05 -> 0.67-0.76 ms with 8-32
// rows ahead, 2 threads, Zen 3; the normalize and dx tiles too: from a flushed cache, side by
// side, channels_last bf16 forwards 0.72-0.95x the time), every line of the tile's row there:
// asking for its first line only left the others to the demand loads (Zen 4, paired in one
// process from a flushed cache: channels_last GroupNorm bf16 forwards 0.78-0.92x the time,
// 2x320x64x64 0.57 -> 0.44 ms, BatchNorm 16x64x56x56 bf16 forward and inference 0.92-0.94x;
// hot 0.90-1.03x, inside the noise). Only within the sweep: short sweeps (ShortPlanes' 16
// rows) prefetch nothing. K: the tile's vectors (of the accumulation type) a row.
constexpr int64_t kPrefetchRows = 32;
template <int K, typename T>
inline void prefetch_ahead(const T* p, int64_t r, int64_t r_end, int64_t ld, int64_t c) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t bytes = K * Chunk<T>::V::size() * static_cast<int64_t>(sizeof(T));
  if (r + kPrefetchRows < r_end) {
    const char* q = reinterpret_cast<const char*>(p + (r + kPrefetchRows) * ld + c);
    prefetch_lines<bytes>(q);
    // a row that starts off a line ends in one line more
    if constexpr (bytes > static_cast<int64_t>(kCacheLineBytes)) prefetch_lines<1>(q + bytes - 1);
  }
#endif
}

// The vector registers of the build: AVX2's 16, else AVX-512's 32 (the portable and Arm builds
// round no type by bits, so two_chunk_tile_fits holds there as under AVX-512).
#if defined(CPU_CAPABILITY_AVX2)
constexpr int kVectorRegisters = 16;
#else
constexpr int kVectorRegisters = 32;
#endif

// Whether a register tile of two chunks (K = 4 vectors a row) fits the registers: `held` arrays
// of K vectors kept across its sweep of rows (per-column coefficients or running sums), and,
// where T is rounded by bits (kRoundsByBits: bf16 under AVX2), the `loaded` arrays of the row it
// reads (x; dy and x), widened into registers, and five more (the widening mask, the rounding's
// two constants, its temporaries). Under AVX2's 16 the bf16 normalize tile (scale, shift, x and
// a center where given: 17 or 21) and the backward's sums tile (shift, the two sums, dy and x:
// 25) did not fit: GCC kept vectors on the stack, stored and reloaded every row, the stores'
// `stream` test with them. Zen 4, capped to AVX2, the builds alternated: channels_last bf16
// forwards 0.80-0.90x the time, a 16x512x7x7 BatchNorm forward 0.75-0.89x, its inference
// 0.78-0.97x; bf16 steps with one-chunk sums tiles against two 0.89-0.98x. fp32 rows feed the
// arithmetic straight from memory, so its tiles hold 12 and fit (one-chunk sums tiles: a
// 16x512x7x7 forward+backward 1.01-1.14x the time); fp16 converts by F16C with no constants and
// keeps its two-chunk tiles (one-chunk: 0.88-1.23x, noise either way).
template <typename T>
constexpr bool two_chunk_tile_fits(int held, int loaded) {
  return 4 * held + (kRoundsByBits<T> ? 4 * loaded + 5 : 0) <= kVectorRegisters;
}

// Calls tile(c, width) over the columns [0, C) in tiles of two chunks (where kTwoChunks), then one
// chunk, then the masked rest: tile is a generic lambda taking std::integral_constant<int, K> and
// a bool_constant for masked. head (less than a chunk): columns taken first as a masked tile of
// their own, so the whole tiles start at column head (where the caller's rows are aligned; see
// ShortPlanes::head). The same values either way: a column's arithmetic does not depend on its
// tile. Only for walks in natural order: the lane order (LaneColumns) is set by chunks from
// column 0.
template <typename T, bool kTwoChunks = true, typename Tile>
inline void for_column_tiles(int64_t C, Tile&& tile, int64_t head = 0) {
  constexpr int64_t S = Chunk<T>::size;
  int64_t c = 0;
  if (head > 0 && head < C) {
    tile(std::integral_constant<int, 2>(), std::true_type(), c, head);
    c = head;
  }
  if constexpr (kTwoChunks) {
    for (; c + 2 * S <= C; c += 2 * S)
      tile(std::integral_constant<int, 4>(), std::false_type(), c, 2 * S);
  }
  for (; c + S <= C; c += S) tile(std::integral_constant<int, 2>(), std::false_type(), c, S);
  if (c < C) tile(std::integral_constant<int, 2>(), std::true_type(), c, C - c);
}

// Welford update of the columns [c, c + width) over rows [p0, p1), with the tile's means and m2
// held in registers for the whole sweep (loaded and stored once, not once a row).
// inv_count[r - p0] is 1 / (rows seen so far, row r included). Masked lanes load as zero and
// stay zero. first: these are the first rows, and the statistics start from zero (mean and m2
// are only written).
template <typename T, int K, bool kMasked, bool kLanes>
inline void welford_tile(const T* x, int64_t p0, int64_t p1, int64_t ld, int64_t c,
                         int64_t width, const acc_t<T>* inv_count, acc_t<T>* mean, acc_t<T>* m2,
                         bool first) {
  using V = typename Chunk<T>::V;
  static_assert(K % 2 == 0, "a tile is whole chunks");
  V m[K], s[K];
  if (first) {
    for (int k = 0; k < K; ++k) m[k] = s[k] = V(0);
  } else {
    tile_load_columns<kMasked, K>(mean, c, width, m);
    tile_load_columns<kMasked, K>(m2, c, width, s);
  }
  for (int64_t r = p0; r < p1; ++r) {
    V a[K];
    prefetch_ahead<K>(x, r, p1, ld, c);
    tile_load_row<kMasked, K, kLanes>(x + r * ld + c, width, a);
    const V vinv(inv_count[r - p0]);
    for (int k = 0; k < K; ++k) {
      const V d = a[k] - m[k];
      m[k] = at::vec::fmadd(d, vinv, m[k]);
      s[k] = at::vec::fmadd(d, a[k] - m[k], s[k]);
    }
  }
  tile_store_columns<kMasked, K>(m, mean, c, width);
  tile_store_columns<kMasked, K>(s, m2, c, width);
}

// Per-column Welford over rows [r0, r1). mean/m2 (length C) are overwritten; every column sees
// the same count, so one reciprocal per row serves all columns. Register tiles of columns sweep
// passes of rows sized to stay in L2 between tiles: keeping the running statistics in memory
// instead (a load and a store of both per element) made this pass store-bound at half the
// speed of the normalize pass after it.
template <bool kLanes = true, typename T>
inline void columns_welford(const T* x, int64_t r0, int64_t r1, int64_t C, int64_t ld,
                            acc_t<T>* mean, acc_t<T>* m2, int64_t head = 0) {
  using A = acc_t<T>;
  if (r1 <= r0) {
    std::fill(mean, mean + C, A(0));
    std::fill(m2, m2 + C, A(0));
    return;
  }
  // in bf16's lane order where kLanes asks for it, written back in column order. The first pass's
  // tiles start from zero and write every column, so nothing is zeroed first (that memset was 2%
  // of a 16x512x7x7 bf16 batch-norm forward's samples, one thread).
  LaneColumns<T, kLanes> lanes(C, 2);
  A* lane_mean = lanes.written(0, mean);
  A* lane_m2 = lanes.written(1, m2);
  const int64_t row_bytes = std::max<int64_t>(1, C * static_cast<int64_t>(sizeof(T)));
  const int64_t pass_rows = std::max<int64_t>(1, (int64_t{256} << 10) / row_bytes);
  Scratch<A> inv_count(std::min(pass_rows, r1 - r0));
  for (int64_t p0 = r0; p0 < r1; p0 += pass_rows) {
    const int64_t p1 = std::min(r1, p0 + pass_rows);
    for (int64_t r = p0; r < p1; ++r) inv_count[r - p0] = A(1) / static_cast<A>(r - r0 + 1);
    for_column_tiles<T>(C, [&](auto K, auto masked, int64_t c, int64_t width) {
      welford_tile<T, K.value, masked.value, kLanes>(x, p0, p1, ld, c, width, inv_count.data(),
                                                     lane_mean, lane_m2, /*first=*/p0 == r0);
    }, head);
  }
  lanes.out(0, mean);
  lanes.out(1, m2);
}

// Adds rows [r, r + R) of the columns [c, c + width) (one chunk, masked where partial) to the
// running per-column mean and m2 of the rows before them: the R rows' own mean and squared
// deviations by two passes over registers, then Chan's merge, with w_new = R / (seen + R) and
// w_cross = seen * R / (seen + R):
//   delta = mean_R - mean,  mean += delta * w_new,  m2 += m2_R + delta^2 * w_cross.
template <int R, bool kMasked, typename T>
inline void row_group_tile(const T* x, int64_t r, int64_t ld, int64_t c, int64_t width,
                           acc_t<T> w_new, acc_t<T> w_cross, acc_t<T>* mean, acc_t<T>* m2) {
  using A = acc_t<T>;
  using V = typename Chunk<T>::V;
  static_assert(!Chunk<T>::widened, "fp32/fp64 rows: vector k of a row is read as it is");
  const A inv_r = A(1) / static_cast<A>(R);
  const V inv_rows(inv_r), neg_inv_rows(-inv_r), vw_new(w_new), vw_cross(w_cross);
  // One vector of the chunk at a time: its R rows take R registers. Both at once (2R, with the
  // running statistics and temporaries) left AVX2's 16 too few: capped to AVX2, Zen 4, paired in
  // one process against both at once, channels_last GroupNorm 2x640x32x32 fp32 forward 0.96x
  // the time (three runs, 0.131 against 0.136 ms), 2x320x64x64 0.97-0.99x; under AVX-512 (32
  // registers) 0.99-1.02x, the same code in effect. Bit-identical.
  for (int k = 0; k < 2; ++k) {
    V v[R];
    for (int i = 0; i < R; ++i) v[i] = tile_load<kMasked, V>(x + (r + i) * ld + c, width, k);
    V sum = v[0];
    for (int i = 1; i < R; ++i) sum = sum + v[i];
    // The rows' mean is never rounded on its own: sum / R fuses into each deviation (one
    // instruction each, on the FMA pipes beside the sum's adds) and into delta.
    V m2_r(0);
    for (int i = 0; i < R; ++i) {
      const V d = fused(sum, neg_inv_rows, v[i]);  // v[i] - sum / R
      m2_r = at::vec::fmadd(d, d, m2_r);
    }
    V m = tile_load<kMasked, V>(mean + c, width, k);
    V s = tile_load<kMasked, V>(m2 + c, width, k);
    const V delta = at::vec::fmsub(sum, inv_rows, m);
    m = at::vec::fmadd(delta, vw_new, m);
    s = s + at::vec::fmadd(delta * delta, vw_cross, m2_r);
    tile_store<kMasked>(m, mean + c, width, k);
    tile_store<kMasked>(s, m2 + c, width, k);
  }
}

// Per-column mean and m2 over rows [r0, r1), walking the rows in order eight at a time: each
// group of eight rows is loaded once into registers, a chunk of columns at a time, its own
// exact two-pass statistics computed there and merged into the running ones (row_group_tile);
// leftover rows merge one at a time. x is read once, nearly sequentially; the running
// statistics (2 * C values) stay in L1. As stable as columns_welford (exact centering within a
// group, Chan's merge across groups). For fp32/fp64 channels_last GroupNorm, where it replaced
// a two-pass walk over whole rows (column sums, then squared deviations reading the block back
// from L2): that statistics pass took as long as a copy of x; now about as long as torch's sum
// of x. Zen 5, 2 threads, paired in one process: channels_last forwards GroupNorm 2x320x64x64
// and 2x640x32x32 fp32 0.81-0.90x the time, InstanceNorm 4x128x64x64 0.78-0.85x; from a
// flushed cache 0.92-1.02x (memory-bound either way). Four rows a group ran the same, 12 and 16
// (24 and 32 vectors of rows alone) up to 1.08x slower. One chunk a step, not for_column_tiles'
// two: eight rows of two chunks would be 32 vectors. 16-bit x stays with columns_welford's tiles
// (this walk: 0.97-1.06x there), as does channels_last BatchNorm (0.94-1.10x, no gain).
template <typename T>
inline void columns_row_groups(const T* x, int64_t r0, int64_t r1, int64_t C, int64_t ld,
                               acc_t<T>* mean, acc_t<T>* m2) {
  using A = acc_t<T>;
  constexpr int64_t S = Chunk<T>::size;
  constexpr int kGroupRows = 8;
  // natural column order: fp32/fp64 rows only, whose vectors are read as they are
  std::fill(mean, mean + C, A(0));
  std::fill(m2, m2 + C, A(0));
  int64_t seen = 0;
  auto add_rows = [&](auto rows, int64_t r) {
    constexpr int R = decltype(rows)::value;
    const A n_seen = static_cast<A>(seen), n_new = static_cast<A>(R);
    const A w_new = n_new / (n_seen + n_new), w_cross = n_seen * w_new;
    int64_t c = 0;
    for (; c + S <= C; c += S) row_group_tile<R, false>(x, r, ld, c, S, w_new, w_cross, mean, m2);
    if (c < C) row_group_tile<R, true>(x, r, ld, c, C - c, w_new, w_cross, mean, m2);
    seen += R;
  };
  int64_t r = r0;
  for (; r + kGroupRows <= r1; r += kGroupRows)
    add_rows(std::integral_constant<int, kGroupRows>(), r);
  for (; r < r1; ++r) add_rows(std::integral_constant<int, 1>(), r);
}

// Merge per-block column statistics (block b: count[b] rows, means part_mean[b * C + c] and
// squared-deviation sums part_m2[b * C + c]) into each column's mean and m2 over all blocks, by
// the exact two-pass combination
//   mean = sum_b count_b * mean_b / sum_b count_b,   m2 = sum_b (m2_b + count_b * (mean_b - mean)^2),
// which is as stable as Chan's pairwise merge but costs one division in all instead of one per
// block and column in a serial chain (that chain cost as much as the statistics pass itself at
// C = 1280). Plain loops along C, which the compiler vectorizes.
template <typename A>
inline void columns_merge(const A* count, int64_t nb, const A* part_mean, const A* part_m2,
                          int64_t C, A* mean, A* m2) {
  A total = 0;
  for (int64_t b = 0; b < nb; ++b) total += count[b];
  const A inv_total = total > 0 ? A(1) / total : A(0);
  std::fill(mean, mean + C, A(0));
  std::fill(m2, m2 + C, A(0));
  for (int64_t b = 0; b < nb; ++b) {
    const A* pm = part_mean + b * C;
    const A w = count[b] * inv_total;
    for (int64_t c = 0; c < C; ++c) mean[c] += w * pm[c];
  }
  for (int64_t b = 0; b < nb; ++b) {
    const A* pm = part_mean + b * C;
    const A* ps = part_m2 + b * C;
    const A cb = count[b];
    for (int64_t c = 0; c < C; ++c) {
      const A d = pm[c] - mean[c];
      m2[c] += ps[c] + cb * d * d;
    }
  }
}

// Sums over runs of `parts` consecutive values (run r: p[r * parts, (r + 1) * parts)), vector
// by vector with one masked tail: runs shorter than two chunks (a 7x7 plane's 49 positions, a
// group's 10-40 channels) as contiguous segments would pay an overlapping tail and a lane mask
// built per run (a 16x512x7x7 bf16 batch-norm forward, one thread, spent about 15% of its
// time in its per-channel merge).
template <typename A>
struct EqualRuns {
  using V = Vectorized<A>;
  static constexpr int64_t L = V::size();
  int64_t full, rest;  // a run's values in whole vectors, and past them
  explicit EqualRuns(int64_t parts) : full(parts / L * L), rest(parts - parts / L * L) {}
  A sum(const A* p) const {
    V acc(0);
    for (int64_t i = 0; i < full; i += L) acc += V::loadu(p + i);
    if (rest > 0) acc += V::loadu(p + full, rest);  // lanes past the run load as zero
    return hsum(acc);
  }
  // p[0:parts] = value, by whole vectors: the last one overlaps the one before it where the run
  // is not a whole number of them (the same value either way), a masked store only for runs
  // shorter than a vector. std::fill per 49-value run, as ShortPlanes laid out its per-element
  // arrays, was a vector loop and a scalar tail each time (with columns_welford's memset, which
  // went with it: 16x512x7x7 batch-norm forwards, one thread, builds alternated, bf16 0.96-0.97x
  // the time in three runs, fp32 0.96-0.98x; bit-identical).
  void fill(A* p, A value) const {
    const V v(value);
    for (int64_t i = 0; i < full; i += L) v.store(p + i);
    if (rest > 0) {
      if (full > 0) {
        v.store(p + full + rest - L);
      } else {
        v.store(p, rest);
      }
    }
  }
  // sum((p - shift)^2)
  A sq_dev(const A* p, A shift) const {
    const V vshift(shift);
    V acc(0);
    for (int64_t i = 0; i < full; i += L) {
      const V d = V::loadu(p + i) - vshift;
      acc = at::vec::fmadd(d, d, acc);
    }
    if (rest > 0) {
      const V d = zero_lanes(V::loadu(p + full, rest) - vshift, rest, false);
      acc = at::vec::fmadd(d, d, acc);
    }
    return hsum(acc);
  }
};

// Merge `parts` statistics of equal count (means part_mean[i], squared-deviation sums
// part_m2[i], each over `part_count` values) into one, for each of `runs` consecutive runs of
// parts (run r: part_mean[r * parts + i]): mean[r] and m2[r]. The exact combination, as
// columns_merge, but vectorized along the parts: calling columns_merge with one column runs it
// as scalar loops (a BN 16x512x7x7 forward spent a quarter of its time there). Phase by phase
// over the runs: each run's chain (sum, mean, squared deviations from it, m2) is ~100 cycles of
// latency, which one run after another left unhidden (that forward: 512 channels of 49 parts).
template <typename A>
inline void merge_equal_runs(const A* part_mean, const A* part_m2, int64_t parts, A part_count,
                             int64_t runs, A* mean, A* m2) {
  const EqualRuns<A> er(parts);
  for (int64_t r = 0; r < runs; ++r)
    mean[r] = parts > 0 ? er.sum(part_mean + r * parts) / static_cast<A>(parts) : A(0);
  for (int64_t r = 0; r < runs; ++r)
    m2[r] = er.sum(part_m2 + r * parts) + part_count * er.sq_dev(part_mean + r * parts, mean[r]);
}

// merge_equal_runs of one run: returns m2 and sets *mean.
template <typename A>
inline A merge_equal_parts(const A* part_mean, const A* part_m2, int64_t parts, A part_count,
                           A* mean) {
  A m2;
  merge_equal_runs(part_mean, part_m2, parts, part_count, 1, mean, &m2);
  return m2;
}

// columns_grad_sums over the columns [c, c + width) and rows [p0, p1), the tile's sums held in
// registers for the whole sweep. Masked lanes load dy as zero, so they add nothing. first: these
// are the first rows, and the sums start from zero (sum_dy and sum_dy_xc are only written).
template <typename T, int K, bool kMasked, bool kLanes>
inline void grad_sums_tile(const T* dy, const T* x, int64_t p0, int64_t p1, int64_t ld,
                           int64_t c, int64_t width, const acc_t<T>* shift, acc_t<T>* sum_dy,
                           acc_t<T>* sum_dy_xc, bool first) {
  using V = typename Chunk<T>::V;
  static_assert(K % 2 == 0, "a tile is whole chunks");
  V sh[K], sg[K], sd[K];
  tile_load_columns<kMasked, K>(shift, c, width, sh);
  if (first) {
    for (int k = 0; k < K; ++k) sg[k] = sd[k] = V(0);
  } else {
    tile_load_columns<kMasked, K>(sum_dy, c, width, sg);
    tile_load_columns<kMasked, K>(sum_dy_xc, c, width, sd);
  }
  for (int64_t r = p0; r < p1; ++r) {
    V g[K], v[K];
    prefetch_ahead<K>(dy, r, p1, ld, c);
    prefetch_ahead<K>(x, r, p1, ld, c);
    tile_load_row<kMasked, K, kLanes>(dy + r * ld + c, width, g);
    tile_load_row<kMasked, K, kLanes>(x + r * ld + c, width, v);
    for (int k = 0; k < K; ++k) {
      sg[k] += g[k];
      sd[k] = at::vec::fmadd(g[k], v[k] - sh[k], sd[k]);
    }
  }
  tile_store_columns<kMasked, K>(sg, sum_dy, c, width);
  tile_store_columns<kMasked, K>(sd, sum_dy_xc, c, width);
}

// Per-column sum(dy) and sum(dy * (x - shift[c])) over rows [r0, r1), written to
// sum_dy/sum_dy_xc (length C; their values are not read, so nothing needs zeroing first: the
// first tiles start from zero). Register tiles of columns over L2-sized passes of rows, as
// columns_welford.
template <bool kLanes = true, typename T>
inline void columns_grad_sums(const T* dy, const T* x, int64_t r0, int64_t r1, int64_t C,
                              int64_t ld, const acc_t<T>* shift, acc_t<T>* sum_dy,
                              acc_t<T>* sum_dy_xc, int64_t head = 0) {
  using A = acc_t<T>;
  if (r1 <= r0) {
    std::fill(sum_dy, sum_dy + C, A(0));
    std::fill(sum_dy_xc, sum_dy_xc + C, A(0));
    return;
  }
  LaneColumns<T, kLanes> lanes(C, 3);
  const A* lane_shift = lanes.in(0, shift);
  A* lane_sum_dy = lanes.written(1, sum_dy);
  A* lane_sum_dy_xc = lanes.written(2, sum_dy_xc);
  const int64_t row_bytes = std::max<int64_t>(1, 2 * C * static_cast<int64_t>(sizeof(T)));
  const int64_t pass_rows = std::max<int64_t>(1, (int64_t{256} << 10) / row_bytes);
  for (int64_t p0 = r0; p0 < r1; p0 += pass_rows) {
    const int64_t p1 = std::min(r1, p0 + pass_rows);
    // held: shift and the two sums; loaded: dy and x
    for_column_tiles<T, two_chunk_tile_fits<T>(3, 2)>(C, [&](auto K, auto masked, int64_t c,
                                                          int64_t width) {
      grad_sums_tile<T, K.value, masked.value, kLanes>(dy, x, p0, p1, ld, c, width, lane_shift,
                                                       lane_sum_dy, lane_sum_dy_xc,
                                                       /*first=*/p0 == r0);
    }, head);
  }
  lanes.out(1, sum_dy);
  lanes.out(2, sum_dy_xc);
}

// dx[r, c] = dy[r, c] * k_dy[c] + (x[r, c] - center[c]) * k_x[c] + k_0[c] for rows [r0, r1).
template <typename T>
inline void rows_grad_input(const T* dy, const T* x, T* dx, int64_t r0, int64_t r1, int64_t C,
                            int64_t ld, const acc_t<T>* center, const acc_t<T>* k_dy,
                            const acc_t<T>* k_x, const acc_t<T>* k_0, bool stream,
                            bool low_nans) {
  using Ch = Chunk<T>;
  using CA = Chunk<acc_t<T>>;
  using V = typename Ch::V;
  static_assert(Ch::size == CA::size, "chunks must line up");
  LaneColumns<T> lanes(C, 4);
  center = lanes.in(0, center);
  k_dy = lanes.in(1, k_dy);
  k_x = lanes.in(2, k_x);
  k_0 = lanes.in(3, k_0);
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = dy + r * ld;
      const T* xr = x + r * ld;
      T* dr = dx + r * ld;
      int64_t c = 0;
      for (; c + Ch::size <= C; c += Ch::size) {
        V ga, gb, xa, xb, ca, cb, da, db, ka, kb, za, zb;
        Ch::load_lanes(gr + c, ga, gb);
        Ch::load_lanes(xr + c, xa, xb);
        CA::load(center + c, ca, cb);
        CA::load(k_dy + c, da, db);
        CA::load(k_x + c, ka, kb);
        CA::load(k_0 + c, za, zb);
        Ch::put_lanes(dr + c, grad_input_lanes(ga, xa, ca, da, ka, za),
                      grad_input_lanes(gb, xb, cb, db, kb, zb), stream, low.value);
      }
      if (c < C) {
        const int64_t n = C - c;
        V ga, gb, xa, xb, ca, cb, da, db, ka, kb, za, zb;
        Ch::load_first(gr + c, n, ga, gb);
        Ch::load_first(xr + c, n, xa, xb);
        CA::load_first(center + c, n, ca, cb);
        CA::load_first(k_dy + c, n, da, db);
        CA::load_first(k_x + c, n, ka, kb);
        CA::load_first(k_0 + c, n, za, zb);
        Ch::store_first(dr + c, n, grad_input_lanes(ga, xa, ca, da, ka, za),
                        grad_input_lanes(gb, xb, cb, db, kb, zb));
      }
    }
  });
}

// Stores a tile's K output vectors of one row at p: whole chunks, or the masked partial one.
// kLowNans: as put_lanes' low_nans.
template <bool kMasked, int K, bool kLanes, bool kLowNans, typename T>
inline void tile_put_row(T* p, int64_t width, const typename Chunk<T>::V* v, bool stream) {
  if constexpr (kMasked) {
    static_assert(K == 2, "a masked tile is one partial chunk");
    Chunk<T>::store_first(p, width, v[0], v[1]);
  } else {
    for (int k = 0; k < K; k += 2) {
      if constexpr (kLanes) {
        Chunk<T>::put_lanes(p + k * Chunk<T>::V::size(), v[k], v[k + 1], stream, kLowNans);
      } else {
        Chunk<T>::put(p + k * Chunk<T>::V::size(), v[k], v[k + 1], stream);
      }
    }
  }
}

// rows_affine over the columns [c, c + width), the tile's coefficients held in registers for
// the whole sweep of rows. kCentered false: no center (y = x * scale + shift; center unread).
template <typename T, int K, bool kMasked, bool kLanes, bool kLowNans, bool kCentered = true>
inline void affine_tile(const T* x, T* y, int64_t r0, int64_t r1, int64_t r_end, int64_t ld,
                        int64_t c, int64_t width, const acc_t<T>* center, const acc_t<T>* scale,
                        const acc_t<T>* shift, bool stream) {
  using V = typename Chunk<T>::V;
  V ce[K], sc[K], sh[K];
  if constexpr (kCentered) tile_load_columns<kMasked, K>(center, c, width, ce);
  tile_load_columns<kMasked, K>(scale, c, width, sc);
  tile_load_columns<kMasked, K>(shift, c, width, sh);
  for (int64_t r = r0; r < r1; ++r) {
    V a[K];
    prefetch_ahead<K>(x, r, r_end, ld, c);
    tile_load_row<kMasked, K, kLanes>(x + r * ld + c, width, a);
    for (int k = 0; k < K; ++k) {
      if constexpr (kCentered) {
        a[k] = affine_lanes(a[k], ce[k], sc[k], sh[k]);
      } else {
        a[k] = affine_lanes(a[k], sc[k], sh[k]);
      }
    }
    tile_put_row<kMasked, K, kLanes, kLowNans>(y + r * ld + c, width, a, stream);
  }
}

// Rows a tile sweeps before the next tile: the output tiles use the per-column coefficients
// for kTileRows rows per load. Sweeping all the rows of an NCHW block instead (16 rows 100 KB
// apart at 7x7 fp32, which fall in two L1 set groups) evicted the lines the next tile shares
// with this one; 4 measured best of 2, 4, 8, 16.
constexpr int64_t kTileRows = 4;

// rows_affine by groups of kTileRows rows, each by register tiles of columns, so the per-column
// coefficients are loaded once a tile instead of once a row (three loads per chunk of x, which
// bound the row-by-row walk when x comes from L1/L2: a 7x7 bf16 batch-norm forward 8-14%
// faster). For blocks of short NCHW planes, and for every 16-bit rows_affine (see there).
// center nullptr: y = x * scale + shift (a center already folded into the shift).
template <bool kLanes = true, typename T>
inline void columns_affine(const T* x, T* y, int64_t r0, int64_t r1, int64_t C, int64_t ld,
                           const acc_t<T>* center, const acc_t<T>* scale, const acc_t<T>* shift,
                           bool stream, bool low_nans, int64_t head = 0) {
  LaneColumns<T, kLanes> lanes(C, 3);
  const bool centered = center != nullptr;
  if (centered) center = lanes.in(0, center);
  scale = lanes.in(1, scale);
  shift = lanes.in(2, shift);
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    with_flag(centered, [&](auto kCentered) NK_INLINE_LAMBDA {
      for (int64_t g0 = r0; g0 < r1; g0 += kTileRows) {
        const int64_t g1 = std::min(r1, g0 + kTileRows);
        // held: scale, shift and the center where given; loaded: x
        constexpr bool kTwoChunks = two_chunk_tile_fits<T>(kCentered.value ? 3 : 2, 1);
        for_column_tiles<T, kTwoChunks>(C, [&](auto K, auto masked, int64_t c, int64_t width) {
          affine_tile<T, K.value, masked.value, kLanes, low.value, kCentered.value>(
              x, y, g0, g1, r1, ld, c, width, center, scale, shift, stream);
        }, head);
      }
    });
  });
}

// y[r, c] = (x[r, c] - center[c]) * scale[c] + shift[c] for rows [r0, r1).
// 16-bit x goes by the register tiles of columns_affine: row by row, each 64-byte chunk of x
// costs seven loads (six of them the fp32 coefficients), which bound the pass even from memory
// (bf16 channels_last batch norm inference and group norm forward 10-20% faster tiled, side by
// side). fp32 x has half the loads per byte and keeps the one sequential stream per thread: the
// tiles' kTileRows interleaved streams were slower from memory (fp32 16x64x56x56 channels_last
// batch norm inference 0.44 -> 0.59 ms).
template <typename T>
inline void rows_affine(const T* x, T* y, int64_t r0, int64_t r1, int64_t C, int64_t ld,
                        const acc_t<T>* center, const acc_t<T>* scale, const acc_t<T>* shift,
                        bool stream, bool low_nans) {
  if constexpr (sizeof(T) < sizeof(acc_t<T>)) {
    columns_affine(x, y, r0, r1, C, ld, center, scale, shift, stream, low_nans);
    return;
  }
  using Ch = Chunk<T>;
  using CA = Chunk<acc_t<T>>;
  using V = typename Ch::V;
  static_assert(Ch::size == CA::size, "chunks must line up");
  if (C == 2 * Ch::size || C <= Ch::size) {
    // The row is one register tile: its coefficients stay in registers down the rows, still
    // one sequential stream, which the hardware prefetchers serve alone (r_end = r0: no
    // software prefetch). A 16x64x56x56 channels_last fp32 batch-norm inference, paired in one
    // process against the row walk below: 0.86x the time from a flushed cache (1.51 -> 1.29 ms),
    // 0.74x hot; with the tile's prefetch 0.93x and 0.80x.
    for_column_tiles<T>(C, [&](auto K, auto masked, int64_t c, int64_t width) {
      affine_tile<T, K.value, masked.value, false, true>(x, y, r0, r1, r0, ld, c, width, center,
                                                         scale, shift, stream);
    });
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * ld;
    T* yr = y + r * ld;
    int64_t c = 0;
    for (; c + Ch::size <= C; c += Ch::size) {
      V a, b, ca, cb, sa, sb, ha, hb;
      Ch::load(xr + c, a, b);
      CA::load(center + c, ca, cb);
      CA::load(scale + c, sa, sb);
      CA::load(shift + c, ha, hb);
      Ch::put(yr + c, affine_lanes(a, ca, sa, ha), affine_lanes(b, cb, sb, hb), stream);
    }
    if (c < C) {
      const int64_t n = C - c;
      V a, b, ca, cb, sa, sb, ha, hb;
      Ch::load_first(xr + c, n, a, b);
      CA::load_first(center + c, n, ca, cb);
      CA::load_first(scale + c, n, sa, sb);
      CA::load_first(shift + c, n, ha, hb);
      Ch::store_first(yr + c, n, affine_lanes(a, ca, sa, ha), affine_lanes(b, cb, sb, hb));
    }
  }
}

// rows_grad_input over the columns [c, c + width), one chunk wide (the four coefficient vectors
// of two chunks and their operands would not fit the registers).
template <typename T, bool kMasked, bool kLanes, bool kLowNans>
inline void grad_input_tile(const T* dy, const T* x, T* dx, int64_t r0, int64_t r1,
                            int64_t r_end, int64_t ld, int64_t c, int64_t width,
                            const acc_t<T>* center,
                            const acc_t<T>* k_dy, const acc_t<T>* k_x, const acc_t<T>* k_0,
                            bool stream) {
  using V = typename Chunk<T>::V;
  constexpr int K = 2;
  V ce[K], kd[K], kx[K], k0[K];
  tile_load_columns<kMasked, K>(center, c, width, ce);
  tile_load_columns<kMasked, K>(k_dy, c, width, kd);
  tile_load_columns<kMasked, K>(k_x, c, width, kx);
  tile_load_columns<kMasked, K>(k_0, c, width, k0);
  for (int64_t r = r0; r < r1; ++r) {
    V g[K], v[K];
    prefetch_ahead<K>(dy, r, r_end, ld, c);
    prefetch_ahead<K>(x, r, r_end, ld, c);
    tile_load_row<kMasked, K, kLanes>(dy + r * ld + c, width, g);
    tile_load_row<kMasked, K, kLanes>(x + r * ld + c, width, v);
    for (int k = 0; k < K; ++k)
      g[k] = grad_input_lanes(g[k], v[k], ce[k], kd[k], kx[k], k0[k]);
    tile_put_row<kMasked, K, kLanes, kLowNans>(dx + r * ld + c, width, g, stream);
  }
}

// rows_grad_input for few rows already in cache, by register tiles of columns (see
// columns_affine).
template <bool kLanes = true, typename T>
inline void columns_grad_input(const T* dy, const T* x, T* dx, int64_t r0, int64_t r1,
                               int64_t C, int64_t ld, const acc_t<T>* center,
                               const acc_t<T>* k_dy, const acc_t<T>* k_x, const acc_t<T>* k_0,
                               bool stream, bool low_nans, int64_t head = 0) {
  constexpr int64_t S = Chunk<T>::size;
  LaneColumns<T, kLanes> lanes(C, 4);
  center = lanes.in(0, center);
  k_dy = lanes.in(1, k_dy);
  k_x = lanes.in(2, k_x);
  k_0 = lanes.in(3, k_0);
  with_low_nans<T>(low_nans, [&](auto low) NK_INLINE_LAMBDA {
    for (int64_t g0 = r0; g0 < r1; g0 += kTileRows) {
      const int64_t g1 = std::min(r1, g0 + kTileRows);
      int64_t c = 0;
      if (head > 0 && head < C) {
        grad_input_tile<T, true, kLanes, low.value>(dy, x, dx, g0, g1, r1, ld, 0, head, center,
                                                    k_dy, k_x, k_0, stream);
        c = head;
      }
      for (; c + S <= C; c += S)
        grad_input_tile<T, false, kLanes, low.value>(dy, x, dx, g0, g1, r1, ld, c, S, center,
                                                     k_dy, k_x, k_0, stream);
      if (c < C)
        grad_input_tile<T, true, kLanes, low.value>(dy, x, dx, g0, g1, r1, ld, c, C - c,
                                                    center, k_dy, k_x, k_0, stream);
    }
  });
}

// ---------------------------------------------------------------- work splitting

// A grain for at::parallel_for over items of `work` elements each: about 32K elements a task.
// Work below that runs on the calling thread: waking a second one costs about 5 us a parallel
// region (a 2x8x2x2 batch-norm forward: 4.6 us on one thread, 9.8 us on two).
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work));
}

// The second pass of a two-pass kernel over rows [begin, end) that the same thread has just
// read in order (channels_last statistics, then normalize or dx): fn(r0, r1) on segments of
// about kBackToFrontBytes of input, last segment first, each segment front to back. The first
// pass leaves its last rows in this core's L2; walked back to front the second pass reads them
// there before its own lines (the output's, then the older input's) evict them, where front to
// back it meets only rows evicted long ago. Worth it where a thread's rows pass its L2: on the
// Xeon guest (2 MB L2), paired in one process against front to back, channels_last: fp32
// GroupNorm 2x320x64x64 / 2x640x32x32 and InstanceNorm 4x128x64x64 forwards 0.86-0.92x the time
// (forward+backward 0.83-0.88x), BatchNorm 16x64x56x56 to 16x256x14x14 training forwards
// 0.88-0.91x (forward+backward 0.88-0.96x); bf16 0.87-1.01x; 16x512x7x7 (in L2 anyway) 0.96-1.01x.
// Segments of 32 KB or less slowed the bf16 passes (their tiles of kTileRows rows prefetch
// within a segment): 1.3-1.6x the time. The NCHW kernels take a channel's or group's planes
// last first for the same reason (BatchNorm 96x64x56x56 fp32 forward+backward 0.92x the time,
// GroupNorm 2x320x64x64 with 2 groups 0.91-0.93x; within noise where the planes fit L2).
constexpr int64_t kBackToFrontBytes = int64_t{256} << 10;
template <typename F>
inline void for_rows_back_to_front(int64_t begin, int64_t end, int64_t row_bytes, F&& fn) {
  const int64_t seg = std::max<int64_t>(1, kBackToFrontBytes / std::max<int64_t>(row_bytes, 1));
  for (int64_t stop = end; stop > begin;) {
    const int64_t start = std::max(begin, stop - seg);
    fn(start, stop);
    stop = start;
  }
}

// Split [0, n) into a fixed number of contiguous blocks that depends only on n and the thread
// count, so per-block partial results merge in the same order on every run (deterministic).
struct Blocks {
  int64_t count;
  int64_t n;
  Blocks(int64_t n_, int64_t min_per_block) : n(n_) {
    const int64_t by_size = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_block));
    count = std::max<int64_t>(1, std::min<int64_t>(by_size, at::get_num_threads() * 4));
    count = std::min<int64_t>(count, std::max<int64_t>(n, 1));
  }
  int64_t begin(int64_t b) const { return n * b / count; }
  int64_t end(int64_t b) const { return n * (b + 1) / count; }
  // grain_for blocks whose items (rows) are `item_work` elements each
  int64_t grain(int64_t item_work) const { return grain_for(n / count * item_work); }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace normkernels
