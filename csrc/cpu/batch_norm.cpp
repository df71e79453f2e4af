// Batch norm, CPU: training forward (batch statistics), inference forward (given statistics),
// and backward for both, on NCHW ([N, C, HW]) and channels_last / 2-D ([N*HW, C]) memory.
//   NCHW         : one task per channel; its N planes are read once for the statistics (two
//                  passes per L1-sized block, plane_moments) and again (from cache when they
//                  fit) by the fused normalize + affine pass. Planes
//                  shorter than two SIMD chunks (7x7) go by blocks of channels instead, each an
//                  [N, span] matrix walked in whole chunks (ShortPlanes), given samples enough.
//   channels_last: per-channel Welford over fixed blocks of rows, vectorized along C and
//                  merged exactly in block order; then one normalize pass over the rows, each
//                  thread its rows back to front (for_rows_back_to_front).
//   inference    : the training forward's normalize pass with the given statistics; for 16-bit
//                  x (and short planes) the mean folded into the shift (batch_norm_elemt).
//   backward     : per-channel sum(dy) and sum(dy * (x - mean)) in one read of x and dy; then
//                  dx = dy * k_dy[c] + (x - mean[c]) * k_x[c] + k_0[c], for NCHW in the same task
//                  per channel (its planes still in L2). Inference backward skips the sums
//                  unless dweight/dbias are wanted.
// Included by capability/*.cpp, never compiled on its own.
#include "kernels.h"
#include "reductions.h"

#include <ATen/Dispatch.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <utility>

namespace normkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename A>
static inline A param_or(const A* p, int64_t c, A dflt) {
  return p != nullptr ? p[c] : dflt;
}

// NCHW planes shorter than two chunks (7x7 and smaller). Walked plane by plane, such a plane is
// all masked head and tail (a 7x7 bf16 plane: one chunk and a 17-element tail). Instead a block
// of channels [c0, c1) is one contiguous span in every sample: an [N, span] matrix whose rows
// are C * HW apart, which the column helpers walk in whole chunks against per-element
// statistics and coefficients (a few KB, in L1) laid out once per block and reused for all N
// samples. A block's N spans (16 x 1024 elements) stay in L2 between its passes. The training
// passes walk them in natural order (the column helpers' kLanes = false): putting the
// per-element arrays in bf16's lane order and back for each block made 16x512x7x7 bf16 steps
// 1.10-1.20x the time, side by side in one process, where the channels_last walks gain from it
// (under AVX2 the forward passes are the exception, and the backward from 32 samples:
// kShortPlaneForwardLanes, kShortPlaneBackwardLanesFrom).
// These passes never use streaming stores, however large the tensor: a span's rows are written
// a tile of columns at a time, four rows apart, and rarely start on a cache line (a block of 20
// 7x7 fp32 channels is 3920 bytes), so streaming filled lines in part, which leave the
// write-combining buffers as partial writes (see whole_line_chunk). Zen 3 guest, 64x2048x7x7,
// paired in one process against streaming past the usual sizes: fp32 inference 0.81x the time
// (4.3 -> 3.5 ms), training forward 0.84x, backward 0.91x; bf16 backward 0.85x.
// Elements in a plane below which ShortPlanes applies: two AVX-512 chunks, four AVX2 ones. (At
// two chunks of either, AVX2's 16-element chunks left 7x7 planes to the plane-by-plane walk:
// 16x512x7x7 bf16 inference 0.20 -> 0.10 ms side by side, 0.63x -> 1.17x torch's speed.)
constexpr int64_t kShortPlane = 64;
template <typename T>
struct ShortPlanes {
  // Elements of a block's span at most: a pass with per-element arrays (three for the
  // normalize pass alone, five or six where statistics come first) keeps them and the block's
  // spans in L1/L2 (measured at 7x7: 1024 best for inference and the training forward, 512
  // for backward; re-measured, the 16x512x7x7 forward was 2-12% faster at 1024 than at 512 in
  // 9 of 9 side-by-side pairs, bf16 and fp32, 2 threads).
  // grain: blocks a task, for at::parallel_for over [0, count)
  int64_t max_span, C, HW, per_block, count, grain;
  ShortPlanes(const NormShape& s, int64_t max_span_)
      : max_span(max_span_), C(s.C), HW(s.HW) {
    const int64_t threads = at::get_num_threads();
    per_block = std::clamp<int64_t>((C + threads - 1) / threads, 1,
                                    std::max<int64_t>(1, max_span / HW));
    count = (C + per_block - 1) / per_block;
    grain = grain_for(s.N * per_block * HW);
  }
  // Whether a pass on s walks blocks of channels, rather than plane by plane. A block lays its
  // per-element arrays out once and uses them for every sample, which pays over enough samples:
  // see plane_walk_samples. elementwise: the pass applies given coefficients (inference).
  static bool applies(const NormShape& s, bool elementwise) {
    return short_nchw(s) && s.N > plane_walk_samples(s.HW, elementwise);
  }
  // NCHW planes short enough for the blocks at all (given samples enough)
  static bool short_nchw(const NormShape& s) {
    return !s.channels_last && s.HW > 0 && s.HW < kShortPlane;
  }
  // Samples up to which short planes are walked one by one all the same: laying a block's
  // arrays out costs about what a sample's pass does, or more (three arrays for an elementwise
  // pass, five or six for the training passes, each put in lane order for bf16 under AVX2),
  // where a plane walk costs its masked ends, less of them on longer planes. Zen 3 guest, 512
  // channels, each pass paired in one process against blocks at every N (time ratios, fp32/bf16;
  // inference on planes of a chunk or more now takes plane_run_affine first, up to 4 samples):
  //   N = 1, inference: 2x2 0.89/0.94x, 3x3 0.82/0.79x, 5x5 0.76/0.64x, 7x7 0.63/0.49x (bf16
  //     1x512x7x7 30.1 -> 14.6 us; ATen's kernel 13.5); training forward and backward at 6x6
  //     and 7x7: 0.63-1.02x (7x7 bf16 forward 57.6 -> 36.1 us), at 5x5 and below 0.84-1.47x
  //     (an earlier run, plane walk forced), so they keep the blocks;
  //   N = 2, inference at 6x6 and 7x7: 0.79-1.02x (7x7 0.85/0.80x); training passes 0.75-1.32x,
  //     so they keep the blocks;
  //   N = 4: 0.95-1.08x at 7x7, more against smaller planes.
  static int64_t plane_walk_samples(int64_t HW, bool elementwise) {
    return (HW >= 32 ? 1 : 0) + (elementwise ? 1 : 0);
  }
  int64_t c0(int64_t blk) const { return blk * per_block; }
  int64_t c1(int64_t blk) const { return std::min(C, c0(blk) + per_block); }
  int64_t span(int64_t blk) const { return (c1(blk) - c0(blk)) * HW; }
  int64_t ld() const { return C * HW; }
  // Elements at the start of block blk's span, in every sample, before the first whose address
  // in out (the pass's output, y or dx) is on a vector boundary; 0 where the samples' spans do
  // not all share one alignment (C * HW * sizeof(T) not a multiple of a vector). The column
  // helpers walk them as a masked tile first (their head), so every whole tile after it stores
  // whole aligned vectors, where a block starting mid-vector (20 channels of 7x7 fp32: 3920
  // bytes) split every store across two lines. Bit-identical. Zen 4, paired in one process
  // against no head: fp32 16x512x7x7 forward+backward 0.93x the time (0.167 -> 0.155 ms),
  // backward 0.90x, training forward 0.95x, inference 0.98x; 32x512x7x7 forward+backward 0.91x,
  // 16x1024x5x5 0.89x, 16x256x3x3 inference 0.94x; fp64 16x512x7x7 forward+backward 0.86x,
  // fp16 0.97x, bf16 0.97-1.00x; capped to AVX2, fp32 0.95-0.97x (inference, forward,
  // forward+backward), bf16 1.00x.
  // kLanes: the walk's order; bf16's lane order (LaneColumns) is set by chunks from column 0,
  // so a walk in it takes no head.
  template <bool kLanes>
  int64_t head(const T* out, int64_t blk) const {
    if constexpr (kLanes && Chunk<T>::even_odd) return 0;
    constexpr int64_t vec_bytes = sizeof(at::vec::Vectorized<T>);
    if ((ld() * static_cast<int64_t>(sizeof(T))) % vec_bytes != 0) return 0;
    const auto addr = reinterpret_cast<uintptr_t>(out + c0(blk) * HW);
    if (addr % sizeof(T) != 0) return 0;
    return static_cast<int64_t>((vec_bytes - addr % vec_bytes) % vec_bytes / sizeof(T));
  }
  // K per-element arrays of max_span values each, placed so that each one's element `head` is
  // on a cache-line boundary (Scratch is on one; each array gets a line more to shift in): the
  // whole tiles after the head load their coefficients from whole lines. Misaligned, most
  // coefficient loads straddled two lines, 20% of a 7x7 inference.
  template <int K, typename A>
  std::array<A*, K> scratch(Scratch<A>& storage, int64_t head) const {
    constexpr int64_t line = kCacheLineBytes / sizeof(A);
    const int64_t stride = max_span + line;
    storage.resize(K * stride);
    const int64_t lead = (line - head % line) % line;
    std::array<A*, K> arrays;
    for (int k = 0; k < K; ++k) arrays[k] = storage.data() + k * stride + lead;
    return arrays;
  }
  // out[(c - c0) * HW + p] = per_channel[c] for the block's channels and every position p
  template <typename A>
  void spread(int64_t blk, const A* per_channel, A* out) const {
    const EqualRuns<A> runs(HW);
    for (int64_t c = c0(blk); c < c1(blk); ++c) runs.fill(out + (c - c0(blk)) * HW, per_channel[c]);
  }
  // per_channel[c] = sum of in over channel c's positions
  template <typename A>
  void gather_sums(int64_t blk, const A* in, A* per_channel) const {
    const EqualRuns<A> runs(HW);
    for (int64_t c = c0(blk); c < c1(blk); ++c) per_channel[c] = runs.sum(in + (c - c0(blk)) * HW);
  }
};

// Whether the forward passes on short planes (inference; training's statistics and normalize)
// walk bf16 in its lane order (even/odd, see Chunk::load_lanes; LaneColumns puts the block's
// per-element arrays in that order once per block). Under AVX2 the even/odd load and
// OR-interleaved store cost less than the in-order conversions: 16x512x7x7 bf16 inference
// 0.051 -> 0.047 ms, side by side in one process on the Xeon guest with
// ATEN_CPU_CAPABILITY=avx2 (torch 0.053); on an AVX2-only Zen 3, paired in one process, training
// forwards 0.90x the time at 16x512x7x7 (0.107 -> 0.095 ms; torch 0.165), 0.82-0.83x at 32 and
// 64 samples, 0.91x at 16x256x4x4, within noise at 8x256x7x7. Under AVX-512 the in-order
// conversions are cheap enough that reordering the arrays costs more: inference 0.028 -> 0.034
// ms with AVX512_BF16, 0.038 -> 0.043 ms with its use switched off.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kShortPlaneForwardLanes = true;
#else
constexpr bool kShortPlaneForwardLanes = false;
#endif
// Samples from which the short-plane backward (where kShortPlaneForwardLanes) walks in lane order
// too: its four per-element arrays and two sums are put in lane order and back once per block
// (LaneColumns), which pays over enough rows. Zen 3, bf16 forward+backward steps, paired in one
// process against natural order (runs with the forward in either order): 8x512x7x7 1.07x the
// time, 16x512x7x7 0.95-1.02x (five runs), 16x256x4x4 0.99-1.04x, 32x512x7x7 0.86-0.98x (three),
// 64x512x7x7 0.85-0.94x (three), 128x512x7x7 0.94x, 32x1024x4x4 0.94x, 32x256x7x7 0.99x.
constexpr int64_t kShortPlaneBackwardLanesFrom = 32;

// grain_for tasks of one NCHW channel each (its N planes). A plane costs its masked ends and its
// per-plane sums besides its elements, about what kPlaneCost more elements do; counted by
// elements alone, a batch-1 7x7 step of 512 channels (25K elements, 20-35 us of work) ran on one
// thread. Zen 3 guest, paired in one process against counting elements alone (fp32/bf16):
// 1x512x7x7 training forward 0.62/0.62x the time (bf16 35.8 -> 22.1 us; ATen's 53.5), backward
// 0.75/0.69x (fp32 25.7 -> 19.3 us; ATen's 19.6), 1x512x6x6 0.63-0.78x, 1x128x14x14
// 0.75-0.84x; 1x64..256 channels of 7x7, 2-8 samples of 8x8 and 16x16, 1x64x28x28 unchanged
// (0.98-1.05x: they stay on the calling thread or already split). 128 split 4x64x8x8 too, whose
// fp32 backward took 1.23x the time on two threads.
constexpr int64_t kPlaneCost = 64;
inline int64_t channel_grain(const NormShape& s) { return grain_for(s.N * (s.HW + kPlaneCost)); }

// shift[c] - center[c] * scale[c], in one rounding (fma): the shift of y = x * scale + shift,
// the center folded in (batch_norm_elemt)
template <typename A>
static Scratch<A> fold_center(int64_t C, const A* center, const A* scale, const A* shift) {
  Scratch<A> folded(C);
  for (int64_t c = 0; c < C; ++c) folded[c] = std::fma(-center[c], scale[c], shift[c]);
  return folded;
}

// channel_affine on short NCHW planes as y = x * scale + shift, a center folded into the shift
// first (fold_center): a block lays out and loads two per-element arrays instead of three and
// spends no subtraction an element. ATen's CPU batch norm applies the same fold; its extra error
// is at most half an ulp of center * scale, the size of x's own rounding where x is near the
// center (and small against y where it is not). Only batch_norm_elemt's pass comes here
// (inference, InstanceNorm with running statistics, SyncBatchNorm's elementwise op); the
// training forward keeps x - mean, whose channels can be constant (x == mean, where the fold's
// rounding would show against y == shift). Zen 4, 16x512x7x7 inference paired in one process
// against the three arrays: fp32 0.89x the time (0.0325 -> 0.0290 ms), bf16 0.91x (0.024 ->
// 0.023 ms), capped to AVX2 fp32 0.89x, bf16 0.96x (its lane-order copies of the arrays remain).
template <typename T>
static void short_planes_affine(const T* xp, T* yp, const NormShape& s, const acc_t<T>* scale,
                                const acc_t<T>* shift, bool low_nans) {
  using A = acc_t<T>;
  const ShortPlanes<T> sp(s, 1024);
  at::parallel_for(0, sp.count, sp.grain, [&](int64_t b0, int64_t b1) {
    Scratch<A> storage;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t head = sp.template head<kShortPlaneForwardLanes>(yp, blk);
      const auto [sc, sh] = sp.template scratch<2>(storage, head);
      sp.spread(blk, scale, sc);
      sp.spread(blk, shift, sh);
      const int64_t off = sp.c0(blk) * s.HW;
      columns_affine<kShortPlaneForwardLanes>(xp + off, yp + off, 0, s.N, sp.span(blk),
                                              sp.ld(), /*center=*/nullptr, sc, sh,
                                              /*stream=*/false, low_nans, head);
    }
  });
}

// The training passes over NCHW walk the tensor one channel at a time (a task per channel, its
// planes across the batch: statistics, then the normalize pass or dx while the planes are in L2,
// one read of memory). On planes under kChannelWalkPlaneBytes, tensors that do not fit the cache
// (stream_stores) lose that way: the channel's planes are short runs of memory far apart, and their
// partial first and last lines, shared with the neighbouring channels' planes that other tasks
// write long before or after, are stored plainly (only whole lines stream, whole_line_chunk) and
// read for ownership from memory. There the passes walk memory in order twice instead: the
// statistics (or the backward's sums) plane by plane into per-plane results merged per channel in
// sample order (the same whatever the threads), then one run of planes whose stores stream
// (plane_run). Zen 4 guest, paired in one process against the channel walk as it was (streaming
// whole lines), time ratios fp32/bf16: 32x1024x14x14 forward 0.63-0.78x (1.77 -> 1.36 ms; bf16: a
// 26 MB pass, in the cache, unchanged), backward 0.67-0.69/0.48x (fp32 3.30 -> 2.32 ms, ATen's
// kernel 4.27); 64x1024x14x14 forward 0.51-0.68/0.50x, backward 0.79/0.41x; 16x1024x14x14 backward
// 0.76/0.57x; 28x28 bf16 planes (1568 bytes) forward 0.64-0.89x, backward 0.72-0.87x. On longer
// planes the channel walk keeps its single read of memory: 28x28 fp32 (3136 bytes) and 56x56 planes
// took 1.04-1.27x the time in memory order, bar 56x56 bf16 0.90-0.99x. Only not streaming the
// channel walk's short planes (plain stores against streaming: 32x1024x14x14 bf16 backward 0.64x
// the time, 64x1024x14x14 bf16 forward 0.72x) fell short of this.
constexpr int64_t kChannelWalkPlaneBytes = 2048;
template <typename T>
static bool short_for_channel_walk(const NormShape& s) {
  return !s.channels_last && s.HW * static_cast<int64_t>(sizeof(T)) < kChannelWalkPlaneBytes;
}

// Batch norm's NCHW passes run their planes as one (plane_run, reductions.h) where walked alone
// they would end in masked chunks: a 7x7 bf16 plane under AVX2 is three or four chunks, one or two
// of them masked (most planes start misaligned); so for the few samples over which per-element
// arrays (ShortPlanes) do not pay, up to kPlaneRunSamples. Zen 3 guest, 512 channels, inference
// paired in one process (time ratios, fp32/bf16), with every chunk blended: against the plane walk
// at one sample 0.86/0.85x (4x4), 0.84/0.64x (5x5), 1.01/0.77x (7x7; bf16 15.1 -> 11.7 us, ATen's
// kernel 18.4), at two samples of 6x6 and 7x7 0.94-0.95/0.73-0.81x; against ShortPlanes at 2, 3
// and 4 samples 0.75-0.99/0.55-0.79x, at 8 0.95-1.26x, at 16 1.01-1.13x. Blending only the
// boundary's chunk, Zen 4 guest: 1x512x7x7 and 2x2048x7x7 0.89-0.96x the time again (AVX2 build
// 0.71-0.75x), the rest 0.99-1.00x. Bit-identical to the plane walk (inference).
// Also for tensors that stream from memory (stream_stores): there the plane walk stores each
// plane's partial first and last lines plainly (only whole lines stream, whole_line_chunk), a read
// for ownership of a line written around the cache, and short planes are mostly such lines (a 14x14
// bf16 plane is 392 bytes). Paired in one process on the Zen 4 guest, inference against the plane
// walk: 64x1024x14x14 bf16 0.42x the time (2.47 -> 1.00 ms; ATen's kernel 1.33), fp32 0.83x,
// 32x1024x14x14 fp32 0.89x, 112x112 planes 1.00x. For short planes the blocks' walk, a short run of
// every sample's planes in turn (80 KB apart at 2048 channels of 7x7 fp32), loses to it in fp32
// (Zen 3: 64x2048x7x7 inference 0.68-0.75x the time, 1.86 -> 1.28 ms, ATen's kernel 2.08;
// 128x1024x7x7 0.71x); 16-bit tensors keep the blocks there: their blends cost twice as much a byte
// (96x2048x7x7 bf16 1.25x the time).
constexpr int64_t kPlaneRunSamples = 4;

// y = (x - center[c]) * scale[c] + shift[c] over the whole tensor, in its own memory order;
// center nullptr, for 16-bit T (rows_affine's fp32/fp64 rows take a center): y = x * scale[c] +
// shift[c] (batch_norm_elemt). after_stats: the statistics pass has just read channels_last x,
// split over the threads in the same proportions, so each thread walks its rows back to front
// (for_rows_back_to_front). low_nans: some coefficient may be a low_nan (reductions.h).
template <typename T>
static void channel_affine(const T* xp, T* yp, const NormShape& s, const acc_t<T>* center,
                           const acc_t<T>* scale, const acc_t<T>* shift, bool after_stats,
                           bool low_nans) {
  TORCH_INTERNAL_ASSERT(center != nullptr || sizeof(T) < sizeof(acc_t<T>));
  const bool stream = stream_stores(2 * s.N * s.C * s.HW * static_cast<int64_t>(sizeof(T)),
                                    Pass::kForward);
  // Longer planes run as one too where they are short and walked one by one would end in a
  // masked chunk (a length not a whole number of chunks; most then start misaligned, a masked
  // head as well). Zen 1, 2 threads, inference, paired against the plane walk in alternated
  // processes: 16x256x14x14 fp16 0.71-0.87x the time (0.144 -> 0.122 ms), bf16 0.74-0.78x, fp32
  // 0.69-1.12x; 16x256x10x10 fp16 0.70-0.82x, fp32 0.57-0.77x; 2x512x14x14 bf16 0.66-0.86x.
  // Planes of whole chunks keep the walk (fp32 16x256x16x16 0.99-1.14x the time as a run).
  const bool masked_short_planes = s.HW % Chunk<T>::size != 0 &&
                                   s.HW * static_cast<int64_t>(sizeof(T)) < kChannelWalkPlaneBytes;
  const bool plane_run =
      !s.channels_last && s.HW >= Chunk<T>::size &&
      (ShortPlanes<T>::short_nchw(s)
           ? s.N <= kPlaneRunSamples || (stream && sizeof(T) == sizeof(acc_t<T>))
           : stream || masked_short_planes);
  if (plane_run) {
    at::parallel_for(0, s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      if (center != nullptr) {
        plane_run_affine<T, 3>(xp, yp, begin, end, s.C, s.HW, {center, scale, shift}, stream,
                               low_nans);
      } else {
        plane_run_affine<T, 2>(xp, yp, begin, end, s.C, s.HW, {scale, shift}, stream, low_nans);
      }
    });
  } else if (ShortPlanes<T>::applies(s, /*elementwise=*/true)) {
    const Scratch<acc_t<T>> folded =
        center != nullptr ? fold_center(s.C, center, scale, shift) : Scratch<acc_t<T>>();
    short_planes_affine(xp, yp, s, scale, center != nullptr ? folded.data() : shift, low_nans);
  } else if (!s.channels_last) {
    // No software prefetch ahead of x (stream_ahead) in this single pass: the hardware
    // prefetchers keep up with one sequential stream a thread. Zen 4, inference paired in one
    // process against asking 8 KB ahead: 16x64x56x56 fp32 0.88x the time, bf16 0.89x,
    // 16x128x28x28 fp32 0.89x, 8x64x112x112 bf16 0.89x, 48x1024x14x14 fp32 (from memory)
    // 0.93x; only a 205 MB 32x256x56x56 fp32 lost, 1.04x.
    with_flag(center != nullptr, [&](auto kCentered) NK_INLINE_LAMBDA {
      at::parallel_for(0, s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end) {
        const StreamFence fence(stream);
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t c = nc % s.C;
          segment_affine<kCentered.value>(xp + nc * s.HW, yp + nc * s.HW, s.HW,
                                          kCentered.value ? center[c] : acc_t<T>(0), scale[c],
                                          shift[c], stream, low_nans);
        }
      });
    });
  } else {
    at::parallel_for(0, s.N * s.HW, grain_for(s.C), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      const auto affine = [&](int64_t r0, int64_t r1) {
        rows_affine(xp, yp, r0, r1, s.C, s.C, center, scale, shift, stream, low_nans);
      };
      if (after_stats)
        for_rows_back_to_front(begin, end, s.C * static_cast<int64_t>(sizeof(T)), affine);
      else
        affine(begin, end);
    });
  }
}

template <typename T>
static void batch_norm_fwd_typed(const at::Tensor& x, const NormShape& s,
                                 const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 at::Tensor& y, at::Tensor& mean_t, at::Tensor& invstd_t,
                                 at::Tensor& var_t) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A* w = weight.defined() ? weight.const_data_ptr<A>() : nullptr;
  const A* b = bias.defined() ? bias.const_data_ptr<A>() : nullptr;
  A* mean = mean_t.data_ptr<A>();
  A* invstd = invstd_t.data_ptr<A>();
  A* var = var_t.data_ptr<A>();
  const A a_eps = static_cast<A>(eps);
  const int64_t count = s.N * s.HW;
  // the batch statistics come from x; so every coefficient is clean unless these are
  const bool low_nans = any_low_nan<T>({&weight, &bias});

  if (ShortPlanes<T>::applies(s, /*elementwise=*/false)) {
    // Per block of channels: Welford statistics of every position over the N samples, merged
    // per channel exactly, then the normalize pass while the block is in L2.
    const ShortPlanes<T> sp(s, 1024);
    at::parallel_for(0, sp.count, sp.grain, [&](int64_t b0, int64_t b1) {
      Scratch<A> storage;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t head = sp.template head<kShortPlaneForwardLanes>(yp, blk);
        const auto [pos_mean, pos_m2, ce, sc, sh] = sp.template scratch<5>(storage, head);
        const int64_t off = sp.c0(blk) * s.HW, span = sp.span(blk);
        columns_welford<kShortPlaneForwardLanes>(xp + off, 0, s.N, span, sp.ld(), pos_mean,
                                                 pos_m2, head);
        // every position saw the N samples; var holds m2 until divided
        const int64_t c0 = sp.c0(blk);
        merge_equal_runs(pos_mean, pos_m2, s.HW, static_cast<A>(s.N), sp.c1(blk) - c0, mean + c0,
                         var + c0);
        for (int64_t c = c0; c < sp.c1(blk); ++c) {
          var[c] = count > 0 ? var[c] / static_cast<A>(count) : A(0);
          invstd[c] = A(1) / std::sqrt(var[c] + a_eps);
        }
        const EqualRuns<A> runs(s.HW);
        for (int64_t c = c0; c < sp.c1(blk); ++c) {
          const int64_t at = (c - c0) * s.HW;
          runs.fill(ce + at, mean[c]);
          runs.fill(sc + at, invstd[c] * param_or(w, c, A(1)));
          runs.fill(sh + at, param_or(b, c, A(0)));
        }
        columns_affine<kShortPlaneForwardLanes>(xp + off, yp + off, 0, s.N, span, sp.ld(), ce, sc,
                                                sh, /*stream=*/false, low_nans, head);
      }
    });
    return;
  }

  // channel c's mean, biased variance and 1 / std from its mean and sum of squared deviations;
  // returns the normalize pass's scale (the shift is the bias)
  const auto set_channel_stats = [&](int64_t c, A mu, A m2) {
    const A v = count > 0 ? m2 / static_cast<A>(count) : A(0);
    const A rs = A(1) / std::sqrt(v + a_eps);
    mean[c] = mu;
    var[c] = v;
    invstd[c] = rs;
    return rs * param_or(w, c, A(1));
  };
  const bool past_cache = stream_stores(2 * x.nbytes(), Pass::kForward);
  if (past_cache && short_for_channel_walk<T>(s) && !ShortPlanes<T>::short_nchw(s)) {
    // memory order (short_for_channel_walk); channel c's planes at [c * N, c * N + N)
    Scratch<A> plane_mean(s.N * s.C), plane_m2(s.N * s.C);
    at::parallel_for(0, s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const auto [mu, m2] = plane_moments<true>(xp + nc * s.HW, 1, s.HW, s.HW);
        const int64_t at = (nc % s.C) * s.N + nc / s.C;
        plane_mean[at] = mu;
        plane_m2[at] = m2;
      }
    });
    Scratch<A> channel_mean(s.C), channel_m2(s.C), scale(s.C), shift(s.C);
    merge_equal_runs(plane_mean.data(), plane_m2.data(), s.N, static_cast<A>(s.HW), s.C,
                     channel_mean.data(), channel_m2.data());
    for (int64_t c = 0; c < s.C; ++c) {
      scale[c] = set_channel_stats(c, channel_mean[c], channel_m2[c]);
      shift[c] = param_or(b, c, A(0));
    }
    channel_affine(xp, yp, s, mean, scale.data(), shift.data(), /*after_stats=*/false, low_nans);
    return;
  }
  if (!s.channels_last) {
    // Statistics and normalization in one task per channel, so the second read of a
    // channel's planes comes from cache when they fit.
    const bool stream = past_cache && !short_for_channel_walk<T>(s);
    at::parallel_for(0, s.C, channel_grain(s), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      for (int64_t c = begin; c < end; ++c) {
        const auto [mu, m2] = plane_moments<true>(xp + c * s.HW, s.N, s.HW, s.C * s.HW);
        const A sc = set_channel_stats(c, mu, m2);
        const A sh = param_or(b, c, A(0));
        // last plane first: the statistics just read them in order (see for_rows_back_to_front)
        for (int64_t n = s.N - 1; n >= 0; --n) {
          const int64_t off = (n * s.C + c) * s.HW;
          segment_affine(xp + off, yp + off, s.HW, mu, sc, sh, stream, low_nans);
        }
      }
    });
    return;
  }

  const Blocks blocks(count, std::max<int64_t>(1, 8192 / std::max<int64_t>(s.C, 1)));
  const int64_t nb = blocks.count;
  Scratch<A> bmean(nb * s.C), bm2(nb * s.C);
  at::parallel_for(0, nb, blocks.grain(s.C), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      columns_welford(xp, blocks.begin(blk), blocks.end(blk), s.C, s.C, bmean.data() + blk * s.C,
                      bm2.data() + blk * s.C);
    }
  });
  Scratch<A> block_count(nb), m2(s.C);
  for (int64_t blk = 0; blk < nb; ++blk)
    block_count[blk] = static_cast<A>(blocks.end(blk) - blocks.begin(blk));
  columns_merge(block_count.data(), nb, bmean.data(), bm2.data(), s.C, mean, m2.data());
  const A inv_count = count > 0 ? A(1) / static_cast<A>(count) : A(0);
  Scratch<A> scale(s.C), shift(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    const A v = m2[c] * inv_count;
    const A rs = A(1) / std::sqrt(v + a_eps);
    var[c] = v;
    invstd[c] = rs;
    scale[c] = rs * param_or(w, c, A(1));
    shift[c] = param_or(b, c, A(0));
  }
  channel_affine(xp, yp, s, mean, scale.data(), shift.data(), /*after_stats=*/true, low_nans);
}

void batch_norm_fwd(const at::Tensor& x, const NormShape& s, const at::Tensor& weight,
                    const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor& mean,
                    at::Tensor& invstd, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd",
                                  [&] {
                                    batch_norm_fwd_typed<scalar_t>(x, s, weight, bias, eps, y,
                                                                   mean, invstd, var);
                                  });
}

template <typename T>
static void batch_norm_elemt_typed(const at::Tensor& x, const NormShape& s,
                                   const at::Tensor& coef, at::Tensor& y) {
  using A = acc_t<T>;
  const A* k = coef.const_data_ptr<A>();  // center, scale, shift: C values each
  const bool low_nans = any_low_nan<T>({&coef});
  if constexpr (sizeof(T) < sizeof(A)) {
    // 16-bit x: y = x * scale + (shift - center * scale), the center folded into the shift once
    // a channel (one rounding, by fma), in every walk, as ATen's CPU batch norm does: one
    // subtraction an element less. It counts where F16C's conversions bound the pass (Zen 1, in
    // L1: widen, FMA and narrow 16 fp16 values 6.7 TSC cycles, with the subtraction 8.2). Its extra
    // error, at most half an fp32 ulp of center * scale, is far below y's rounding to 16 bits:
    // against an fp64 reference, the largest errors of fp16 and bf16 outputs (means 0 and 100
    // std from zero, NCHW and channels_last) came out the same as centered, and as ATen's. Zen 1,
    // one thread, 16x{256,128,64}x{14,28,56}^2 inference against centered, builds alternated,
    // four pairs (median time ratios): fp16 NCHW 0.80-0.82x (14x14: 0.31 -> 0.27 ms),
    // channels_last 0.83-0.89x; bf16 0.76-0.94x. fp32 and fp64 keep x - center and its digits
    // (but on short planes, short_planes_affine): with a mean 100 std from zero, fp32
    // 16x64x14x14 inference's largest error is 7.1e-7 centered, 7.3e-6 folded (ATen's).
    const Scratch<A> shift = fold_center(s.C, k, k + s.C, k + 2 * s.C);
    channel_affine(x.const_data_ptr<T>(), y.data_ptr<T>(), s, /*center=*/nullptr, k + s.C,
                   shift.data(), /*after_stats=*/false, low_nans);
  } else {
    channel_affine(x.const_data_ptr<T>(), y.data_ptr<T>(), s, k, k + s.C, k + 2 * s.C,
                   /*after_stats=*/false, low_nans);
  }
}

void batch_norm_elemt(const at::Tensor& x, const NormShape& s, const at::Tensor& coef,
                      at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_elemt", [&] {
                                    batch_norm_elemt_typed<scalar_t>(x, s, coef, y);
                                  });
}

template <typename T>
static void batch_norm_bwd_typed(const at::Tensor& dy, const at::Tensor& x, const NormShape& s,
                                 const at::Tensor& mean_t, const at::Tensor& invstd_t,
                                 const at::Tensor& weight, bool train, at::Tensor& dx,
                                 at::Tensor& dweight, at::Tensor& dbias) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  const A* w = weight.defined() ? weight.const_data_ptr<A>() : nullptr;
  const A* mean = mean_t.const_data_ptr<A>();
  const A* invstd = invstd_t.const_data_ptr<A>();
  const int64_t count = s.N * s.HW;
  const bool need_sums = train || dweight.defined() || dbias.defined();
  // dx's coefficients come from these, x and dy (see low_nan)
  const bool low_nans = any_low_nan<T>({&mean_t, &invstd_t, &weight});
  T* dxp = dx.defined() ? dx.data_ptr<T>() : nullptr;

  Scratch<A> sum_dy(s.C, A(0)), sum_dy_xc(s.C, A(0));
  // train: dx = w * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
  // eval:  dx = w * invstd * dy
  Scratch<A> k_dy(s.C), k_x(s.C, A(0)), k_0(s.C, A(0));
  const A inv_count = count > 0 ? A(1) / static_cast<A>(count) : A(0);
  const auto grad_coeffs = [&](int64_t c) {
    const A rs = invstd[c];
    k_dy[c] = rs * param_or(w, c, A(1));
    if (train) {
      const A proj = rs * rs * sum_dy_xc[c] * inv_count;
      k_x[c] = -k_dy[c] * proj;
      k_0[c] = -k_dy[c] * sum_dy[c] * inv_count;
    }
  };
  // Each plane summed in lanes of its own, then added to the channel's: summed across all planes
  // in one set of lanes, a lane took N * HW / 32 additions in a row (6272 for 64x64x56x56 under
  // AVX-512), and the fp32 dbias, a plain sum of dy, had 8x the error of ATen's cascade sums
  // (5.6e-7 against 7.0e-8 relative; now 1.0e-7). (dweight's larger error was the mean's: see
  // plane_moments.)
  const auto channel_sums = [&](int64_t c) {
    VecSum<T> sg, sd;
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t off = (n * s.C + c) * s.HW;
      VecSum<T> pg, pd;
      accumulate_grad_sums<true>(gp + off, xp + off, s.HW, mean[c], pg, pd);
      sg += pg;
      sd += pd;
    }
    sum_dy[c] = sg.total();
    sum_dy_xc[c] = sd.total();
  };
  // last plane first: after channel_sums, the last planes are the ones still in L2
  const auto channel_grad_input = [&](int64_t c, bool stream) {
    for (int64_t n = s.N - 1; n >= 0; --n) {
      const int64_t off = (n * s.C + c) * s.HW;
      segment_grad_input(gp + off, xp + off, dxp + off, s.HW, mean[c], k_dy[c], k_x[c], k_0[c],
                         stream, low_nans);
    }
  };
  const bool past_cache = dxp != nullptr && stream_stores(3 * x.nbytes(), Pass::kBackward);
  const bool stream = past_cache && !short_for_channel_walk<T>(s);
  // NCHW planes too short to walk one by one (see ShortPlanes): fused per block of channels.
  const bool short_planes =
      dxp != nullptr && ShortPlanes<T>::applies(s, /*elementwise=*/!need_sums);
  // memory order on planes too short for the channel walk (short_for_channel_walk)
  const bool memory_order =
      past_cache && short_for_channel_walk<T>(s) && !ShortPlanes<T>::short_nchw(s);
  // NCHW with a channel per thread at least: one task per channel sums its planes and then
  // writes their dx while they are in L2 (16 planes of 56x56 are 200 KB of x and of dy), one
  // pass over memory instead of two.
  const bool fused =
      !s.channels_last && dxp != nullptr && s.C >= at::get_num_threads() && !memory_order;

  if (short_planes) {
    const ShortPlanes<T> sp(s, 512);
    // kLanes: the column helpers' order for T's chunks (see kShortPlaneBackwardLanesFrom)
    const auto run = [&](auto lanes) {
      constexpr bool kLanes = decltype(lanes)::value;
      at::parallel_for(0, sp.count, sp.grain, [&](int64_t b0, int64_t b1) {
        Scratch<A> storage;
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t head = sp.template head<kLanes>(dxp, blk);
          const auto [ce, sg, sd, kd, kx, k0] = sp.template scratch<6>(storage, head);
          const int64_t off = sp.c0(blk) * s.HW, span = sp.span(blk);
          sp.spread(blk, mean, ce);
          if (need_sums) {
            columns_grad_sums<kLanes>(gp + off, xp + off, 0, s.N, span, sp.ld(), ce, sg, sd,
                                      head);
            sp.gather_sums(blk, sg, sum_dy.data());
            sp.gather_sums(blk, sd, sum_dy_xc.data());
          }
          for (int64_t c = sp.c0(blk); c < sp.c1(blk); ++c) grad_coeffs(c);
          sp.spread(blk, k_dy.data(), kd);
          sp.spread(blk, k_x.data(), kx);
          sp.spread(blk, k_0.data(), k0);
          columns_grad_input<kLanes>(gp + off, xp + off, dxp + off, 0, s.N, span, sp.ld(), ce,
                                     kd, kx, k0, /*stream=*/false, low_nans, head);
        }
      });
    };
    if constexpr (kShortPlaneForwardLanes) {  // only those builds compile the lane-order walk
      with_flag(s.N >= kShortPlaneBackwardLanesFrom, run);
    } else {
      run(std::false_type());
    }
  } else if (memory_order) {
    if (need_sums) {
      Scratch<A> plane_dy(s.N * s.C), plane_dy_xc(s.N * s.C);  // channel c's: [c * N, c * N + N)
      at::parallel_for(0, s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t c = nc % s.C, at = c * s.N + nc / s.C;
          std::tie(plane_dy[at], plane_dy_xc[at]) =
              segment_grad_sums<true>(gp + nc * s.HW, xp + nc * s.HW, s.HW, mean[c]);
        }
      });
      for (int64_t c = 0; c < s.C; ++c) {
        A g = 0, d = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          g += plane_dy[c * s.N + n];
          d += plane_dy_xc[c * s.N + n];
        }
        sum_dy[c] = g;
        sum_dy_xc[c] = d;
      }
    }
  } else if (fused) {
    at::parallel_for(0, s.C, channel_grain(s), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      for (int64_t c = begin; c < end; ++c) {
        if (need_sums) channel_sums(c);
        grad_coeffs(c);
        channel_grad_input(c, stream);
      }
    });
  } else if (need_sums && !s.channels_last) {
    at::parallel_for(0, s.C, channel_grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) channel_sums(c);
    });
  } else if (need_sums) {
    const Blocks blocks(count, std::max<int64_t>(1, 8192 / std::max<int64_t>(s.C, 1)));
    // each block writes its own sums (columns_grad_sums)
    Scratch<A> part_dy(blocks.count * s.C), part_dyx(blocks.count * s.C);
    at::parallel_for(0, blocks.count, blocks.grain(s.C), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        columns_grad_sums(gp, xp, blocks.begin(blk), blocks.end(blk), s.C, s.C, mean,
                          part_dy.data() + blk * s.C, part_dyx.data() + blk * s.C);
      }
    });
    for (int64_t blk = 0; blk < blocks.count; ++blk)
      for (int64_t c = 0; c < s.C; ++c) {
        sum_dy[c] += part_dy[blk * s.C + c];
        sum_dy_xc[c] += part_dyx[blk * s.C + c];
      }
  }

  if (dweight.defined()) {
    A* dw = dweight.data_ptr<A>();
    for (int64_t c = 0; c < s.C; ++c) dw[c] = sum_dy_xc[c] * invstd[c];
  }
  if (dbias.defined()) {
    A* db = dbias.data_ptr<A>();
    for (int64_t c = 0; c < s.C; ++c) db[c] = sum_dy[c];
  }
  if (dxp == nullptr || fused || short_planes) return;

  for (int64_t c = 0; c < s.C; ++c) grad_coeffs(c);
  if (memory_order) {
    at::parallel_for(0, s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end) {
      const StreamFence fence(true);
      plane_run_grad_input(gp, xp, dxp, begin, end, s.C, s.HW, mean, k_dy.data(), k_x.data(),
                           k_0.data(), /*stream=*/true, low_nans);
    });
  } else if (!s.channels_last) {
    at::parallel_for(0, s.C, channel_grain(s), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      for (int64_t c = begin; c < end; ++c) channel_grad_input(c, stream);
    });
  } else {
    // After the sums pass over the same rows when it ran (need_sums), back to front, so the
    // first rows a segment reads are still in L2; from there the row walk is bound by its loads,
    // eight a chunk of dx for its four coefficients, which the register tiles of
    // columns_grad_input load once per kTileRows rows. Only on rows of 512 bytes or less, whose
    // tile of kTileRows rows is one run of memory: on wider rows a tile reads four runs a row
    // apart (for three tensors), and from memory that lost: 32x1024x14x14 backward (4 KB rows)
    // 1.75x the time in fp32, 1.40x in bf16. Paired in one process, Zen 3 guest: 16x64x56x56
    // 0.85-0.89x the time in fp32, 0.92-0.96x in bf16, 16x128x28x28 0.92x / 0.96x,
    // 8x32x56x56 fp32 0.68-0.82x, 32x64x56x56 fp32 0.99-1.04x. (The forward's normalize pass,
    // three coefficients to one input, stays on the row walk: tiled, fp32 16x64x56x56 and
    // 16x128x28x28 took 1.15x the time.)
    const bool tiled = need_sums && s.C * static_cast<int64_t>(sizeof(T)) <= 512;
    at::parallel_for(0, count, grain_for(s.C), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      const auto grad_input = [&](int64_t r0, int64_t r1) {
        if (tiled) {
          columns_grad_input(gp, xp, dxp, r0, r1, s.C, s.C, mean, k_dy.data(), k_x.data(),
                             k_0.data(), stream, low_nans);
        } else {
          rows_grad_input(gp, xp, dxp, r0, r1, s.C, s.C, mean, k_dy.data(), k_x.data(),
                          k_0.data(), stream, low_nans);
        }
      };
      if (need_sums)
        for_rows_back_to_front(begin, end, 2 * s.C * static_cast<int64_t>(sizeof(T)), grad_input);
      else
        grad_input(begin, end);
    });
  }
}

void batch_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const NormShape& s,
                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                    bool train, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd",
                                  [&] {
                                    batch_norm_bwd_typed<scalar_t>(dy, x, s, mean, invstd,
                                                                   weight, train, dx, dweight,
                                                                   dbias);
                                  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace normkernels
