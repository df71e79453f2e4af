// Group norm (and instance norm: one channel per group), CPU, forward and backward, for
// NCHW ([N, C, HW]) and channels_last ([N, HW, C]) memory, walked in its own order.
//   NCHW         : one task per (n, group), whose D * HW elements are contiguous: statistics
//                  in one read (two passes per L1-sized block, plane_moments), then one fused
//                  normalize + affine pass per channel plane (fp32/fp64 planes of a vector or
//                  more vector by vector, vector_planes; per group on planes of a few chunks or
//                  less, group_runs; groups shorter than a chunk in scalar code, short_groups;
//                  bf16 planes under 2 KB that end in masked chunks as one run per group,
//                  planes_as_run). 1x1 maps walk this way too (group_walk).
//   channels_last: where a stripe of whole groups (all HW pixels of some channels) fits in L2
//                  with rows of 1 KB or more, one task per (n, stripe): statistics, then the
//                  normalize pass reading the stripe back from L2 (GroupStripes). Otherwise
//                  per-(n, channel) statistics over L2-sized blocks of pixels (groups of eight
//                  rows merged in order for fp32/fp64, Welford tiles for 16-bit; vectorized
//                  along C, split over HW so that batch 1 still uses every thread), merged
//                  exactly per block and then per group; the normalize pass walks rows of C,
//                  each thread its rows back to front (for_rows_back_to_front); both passes a
//                  chunk of images at a time (ImageChunks), or, for batches of images that fit
//                  in L2, one task per image runs both (ImageTasks). Pixels of few channels go
//                  several to a row (PixelRows).
//   backward     : per-(n, channel) sums of dy and dy * (x - mean), then
//                  dx = dy * k_dy[c] + (x - mean) * k_x + k_0; for NCHW both in turn per
//                  block of consecutive groups (kGroupBlockPlanes), the second pass reading
//                  the block from L1 or L2 (one group's planes one by one last first: the
//                  planes the first pass read last are the ones still there); for
//                  channels_last by stripes as the forward where they fit, else one task per
//                  image (ImageTasks) or two passes a chunk of images at a time, the second
//                  back to front;
//                  dweight/dbias from the same sums, reduced over n in a fixed order.
// Included by capability/*.cpp, never compiled on its own.
#include "kernels.h"
#include "reductions.h"

#include <ATen/Dispatch.h>

namespace normkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename A>
struct GroupView {
  int64_t N, C, HW, G, D;  // D channels per group
  const A* w;              // may be null
  const A* b;              // may be null
  A wt(int64_t c) const { return w != nullptr ? w[c] : A(1); }
  A bs(int64_t c) const { return b != nullptr ? b[c] : A(0); }
};

// Coefficients of y = (x - center) * scale + shift for image n's channels [c0, c1) (stored from
// index 0), from per-(n, g) mean and rstd.
template <typename A>
static void group_affine_coeffs(const GroupView<A>& v, int64_t n, int64_t c0, int64_t c1,
                                const A* mean, const A* rstd, A* center, A* scale, A* shift) {
  // group by group: an integer division per channel cost more than the rest of the loop
  for (int64_t g = c0 / v.D; g * v.D < c1; ++g) {
    const int64_t ng = n * v.G + g;
    for (int64_t c = std::max(c0, g * v.D); c < std::min(c1, (g + 1) * v.D); ++c) {
      center[c - c0] = mean[ng];
      scale[c - c0] = rstd[ng] * v.wt(c);
      shift[c - c0] = v.bs(c);
    }
  }
}

// channels_last forward by stripes: one task per (n, stripe of whole groups) computes the
// stripe's statistics, then normalizes it reading it back from L2: x is read from memory once,
// in one parallel region. Only for stripes that fit in L2 and whose rows are at least 1 KB:
// narrower stripes walk memory with a stride the prefetchers serve badly (480-byte rows: a
// 2x640x32x32 fp32 forward 0.137 -> 0.181 ms; 120-byte rows: 2x320x64x64 0.50 -> 1.10 ms).
// Where it applies (2x1280x16x16, 32 groups) a bf16 forward went 0.072 -> 0.059 ms.
struct GroupStripes {
  int64_t count = 0;  // stripes per image; 0: the layout does not suit stripes
  int64_t HW, G, D, inputs;
  // inputs: the tensors a task reads and reads back (x; dy and x), within budget bytes of them
  GroupStripes(int64_t N, int64_t HW_, int64_t G_, int64_t D_, int64_t elem_bytes,
               int64_t inputs_, int64_t budget)
      : HW(HW_), G(G_), D(D_), inputs(inputs_) {
    const int64_t group_bytes = HW * D * elem_bytes;
    const int64_t fit = budget / std::max<int64_t>(1, group_bytes * inputs);
    if (group_bytes == 0 || fit < 1 || G < 1) return;
    // at least two tasks a thread, for balance
    int64_t n_stripes = std::max((G + fit - 1) / fit,
                                 (2 * at::get_num_threads() + N - 1) / std::max<int64_t>(1, N));
    n_stripes = std::min(n_stripes, G);
    if ((G / n_stripes) * D * elem_bytes < 1024) return;
    count = n_stripes;
  }
  // Channels of the widest stripe (they differ by at most one group).
  int64_t max_width() const { return (G / count + 1) * D; }
  // grain_for tasks of a stripe's inputs
  int64_t grain() const { return grain_for(inputs * HW * max_width()); }
  // Task t of at::parallel_for(0, N * count): image n, groups [g0, g1), channels [c0, c1).
  struct Task {
    int64_t n, g0, g1, c0, c1;
  };
  Task task(int64_t t) const {
    const int64_t n = t / count, s = t % count;
    const int64_t g0 = G * s / count, g1 = G * (s + 1) / count;
    return {n, g0, g1, g0 * D, g1 * D};
  }
};

// channels_last where stripes do not apply: both passes (statistics, then normalize or dx) read
// every image, so each chunk of images runs both before the next, for the second pass to find
// its images still in the L3. per_chunk: the images whose inputs fit in 16 MiB (half a 32 MiB
// L3, where backward passes start streaming), at least one. Side by side against all images in
// one chunk, three times: 8x320x64x64 forward+backward 0.85-0.90x the time in fp32 and
// 0.85-0.99x in bf16. With 8 MiB, 2x320x64x64 fp32 went either way (forward 0.87x, 0.99x,
// 1.25x): its 5.2 MB images are then one to a chunk, where at 16 MiB its forward keeps one chunk.
constexpr int64_t kImageChunkBudget = int64_t{16} << 20;
struct ImageChunks {
  int64_t per_chunk;
  ImageChunks(int64_t N, int64_t image_bytes) {
    const int64_t images = std::max<int64_t>(N, 1);
    per_chunk =
        std::clamp<int64_t>(kImageChunkBudget / std::max<int64_t>(image_bytes, 1), 1, images);
  }
  // fn(n0, n1) for each chunk of images [n0, n1) of N, in order.
  template <typename F>
  void for_each(int64_t N, F&& fn) const {
    for (int64_t n0 = 0; n0 < N; n0 += per_chunk) fn(n0, std::min(N, n0 + per_chunk));
  }
};

// channels_last where stripes do not apply, for batches of small images: one task per image runs
// both passes (statistics or sums, then y or dx, the second back to front) while the image is in
// L2, in one parallel region, with its merges on its own thread. ImageChunks' walk instead runs the
// first pass of a chunk of images in blocks of rows over the threads, merges every image on the
// calling thread, then runs the second pass: at a batch of eight 32x32 images of 32 channels
// (GroupNorm with one group, 128 KB an image) the serial merges and two parallel regions made its
// forward 0.70x torch's speed. Bit-identical to that walk (the same blocks, merged in the same
// order). Zen 4, paired in one process against it (with its rows of up to 1024 elements, before
// PixelRows' shorter rows): GroupNorm with one group 8x32x32x32 fp32 forward 0.56x the time (0.084
// -> 0.047 ms), forward+backward 0.67x, bf16 0.54x and 0.66x, 8x8x64x64 bf16 forward 0.74x;
// 4x256x16x16 with 8 groups bf16 0.83x and 0.93x; InstanceNorm forward+backward 8x64x32x32 fp32
// 0.91x, 8x3x64x64 bf16 0.81x. apply: each image's inputs within budget, and the images even over
// the threads or two a thread at least (balanced enough): at one image a thread, paired against the
// chunked walk, GroupNorm 2x32x32x32 one group fp32 forward 0.88x the time, forward+backward 0.93x,
// 2x256x16x16 8 groups bf16 0.96x, InstanceNorm 2x64x32x32 fp32 0.94x; at three images on two
// threads 3x32x32x32 one group forward+backward 1.04x. Images past the L2 budget take it too where
// they divide evenly over the threads and a thread's image fits its share of the chunks' L3 budget:
// the chunked walk then gives each thread whole images in both passes anyway (the same traffic: the
// second pass back to front, finding the image's end in L2 and the rest in L3), but merges on one
// thread between two parallel regions. Zen 4, paired in one process against the chunked walk (time
// ratios): channels_last fp32 GroupNorm 2x640x32x32 forward 0.97-1.01x, 4x320x32x32 0.92x,
// 2x64x48x48 0.89x, bf16 2x640x32x32 0.93-0.97x, forward+backward 0.95x; InstanceNorm 4x128x64x64
// fp32 forward+backward 0.95x, bf16 forward 0.92x; 2x320x64x64 (5.2 MB images) 0.96-1.04x.
// Splitting each image over the threads instead (the chunked walk, one image a chunk: each
// thread's share of the image nearer its L2 for the second pass), against one task per image,
// alternated processes: channels_last GroupNorm 2x640x32x32 forward 1.06x the time (fp32 and
// bf16), forward+backward 1.04x, 2x320x64x64 forward 1.15x; InstanceNorm 4x128x64x64 forward
// 1.16x, forward+backward 1.03-1.04x: the merges on one thread between two parallel regions cost
// more than the L2 saves.
struct ImageTasks {
  static bool apply(int64_t N, int64_t input_bytes, int64_t budget) {
    const int64_t threads = at::get_num_threads();
    if (N <= 0) return false;
    if (N % threads == 0 && threads * input_bytes <= kImageChunkBudget) return true;
    return (N % threads == 0 || N >= 2 * threads) && input_bytes <= budget;
  }
};
// The L2 share of an image's inputs (x; dy and x), as GroupStripes' budgets.
constexpr int64_t kImageTaskBudget = int64_t{512} << 10;
constexpr int64_t kImageTaskBackwardBudget = int64_t{768} << 10;

// channels_last where stripes do not apply, walked as rows of `width` = k * C elements, k pixels
// a row: k = 1 unless a pixel is narrower than two chunks, where k is the smallest divisor of HW
// that makes a row two chunks or more within 1024 elements (else the largest divisor within
// 1024 elements). A pixel of a 3-channel instance norm is 6 bytes of bf16: walked pixel by
// pixel, every pass was one masked chunk per pixel (1x3x256x256 bf16 forward 0.40 ms against
// torch's 0.17, which transposes to NCHW and back). Rows of up to 1024 elements came next; the
// shortest rows of whole chunks beat them, as the per-position statistics and coefficients
// (W values each, merged per block and per image) cost less: Zen 4, paired in one process
// against the longest rows, InstanceNorm 1x3x256x256 bf16 forward 0.67x the time, forward+
// backward 0.81x, 8x3x64x64 0.64x; GroupNorm with one group 8x32x32x32 fp32 forward 0.77x,
// forward+backward 0.86x, bf16 0.82x, 8x8x64x64 bf16 forward 0.63x, 1x32x128x128 fp32 0.93x;
// 2x16x128x128 with 4 groups bf16 forward 0.71x. Position j of a row is channel j % C; its
// statistics count HW / k pixels.
struct PixelRows {
  int64_t C, k = 1, width, rows;  // rows: an image's
  PixelRows(int64_t HW, int64_t C_, int64_t chunk) : C(C_) {
    if (C > 0 && C < 2 * chunk) {
      const int64_t most = std::max<int64_t>(1, 1024 / C);  // pixels a row at most
      for (int64_t d = 1; d <= most; ++d) {
        if (HW % d == 0 && d * C >= 2 * chunk) {
          k = d;
          break;
        }
      }
      for (int64_t d = most; k == 1 && d > 1; --d) {  // no row of two chunks: the longest
        if (HW % d == 0) k = d;
      }
    }
    width = k * C;
    rows = k > 0 ? HW / k : 0;
  }
  // An image's rows in blocks of 8192 values or more (Blocks: at most four a thread), the
  // blocks of both passes, forward and backward.
  Blocks blocks() const {
    return Blocks(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1)));
  }
  // p[i * C + c] = p[c] for the row's other pixels i (the first C values given)
  template <typename A>
  void repeat(A* p) const {
    for (int64_t i = 1; i < k; ++i) std::copy(p, p + C, p + i * C);
  }
  // row[i * C + c] = per_channel[c] for every pixel i of a row
  template <typename A>
  void spread(const A* per_channel, A* row) const {
    std::copy_n(per_channel, C, row);
    repeat(row);
  }
};

// The second pass over channels_last rows [n0 * rows, n1 * rows) (`rows` rows of `width`
// elements an image, see PixelRows) in parallel, back to front (for_rows_back_to_front: the first
// pass split its blocks of rows over the threads in the same proportions): fn(n, r0, r1) on each
// run of one image's rows, since a task's rows may span several images and each image has its
// own coefficients.
template <typename F>
static void for_image_rows(int64_t n0, int64_t n1, int64_t rows, int64_t width,
                           int64_t row_bytes, bool stream, F&& fn) {
  at::parallel_for(n0 * rows, n1 * rows, grain_for(width), [&](int64_t begin, int64_t end) {
    const StreamFence fence(stream);
    for_rows_back_to_front(begin, end, row_bytes, [&](int64_t s0, int64_t s1) {
      for (int64_t r = s0; r < s1;) {
        const int64_t n = r / rows;
        const int64_t stop = std::min(s1, (n + 1) * rows);
        fn(n, r, stop);
        r = stop;
      }
    });
  });
}

// The two passes of a channels_last walk by blocks of rows (PixelRows: R rows of W values an
// image, blocks.count blocks of them): first(n, blk, a, b) fills two W-value arrays for image
// n's block blk; merge(n, a, b, work) turns an image's arrays (block by block, blocks.count * W
// values each) into its coefficients, with work_values of scratch; second(n, r0, r1) is the
// second pass over rows [r0, r1) of image n, run unless second_pass is false. One task per image
// runs all three where ImageTasks applies (image_bytes of inputs an image, within budget), else
// a chunk of images at a time (ImageChunks): the first pass split over the threads, the merges
// on the calling thread, the second pass back to front (for_image_rows). The same blocks merged
// in the same order either way, so the same results.
template <typename A, typename First, typename Merge, typename Second>
static void image_passes(int64_t N, int64_t R, int64_t W, const Blocks& blocks,
                         int64_t image_bytes, int64_t budget, int64_t work_values,
                         bool second_pass, bool stream, First&& first, Merge&& merge,
                         Second&& second) {
  const int64_t nb = blocks.count;
  const int64_t row_bytes = image_bytes / std::max<int64_t>(R, 1);  // of inputs, a row
  if (second_pass && ImageTasks::apply(N, image_bytes, budget)) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      Scratch<A> a(nb * W), b(nb * W), work(work_values);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t blk = 0; blk < nb; ++blk)
          first(n, blk, a.data() + blk * W, b.data() + blk * W);
        merge(n, a.data(), b.data(), work.data());
        for_rows_back_to_front(n * R, (n + 1) * R, row_bytes,
                               [&](int64_t r0, int64_t r1) { second(n, r0, r1); });
      }
    });
    return;
  }
  const ImageChunks chunks(N, image_bytes);
  Scratch<A> a(chunks.per_chunk * nb * W), b(chunks.per_chunk * nb * W), work(work_values);
  chunks.for_each(N, [&](int64_t n0, int64_t n1) {
    at::parallel_for(0, (n1 - n0) * nb, blocks.grain(W), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        first(n0 + t / nb, t % nb, a.data() + t * W, b.data() + t * W);
    });
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t0 = (n - n0) * nb;
      merge(n, a.data() + t0 * W, b.data() + t0 * W, work.data());
    }
    if (second_pass) for_image_rows(n0, n1, R, W, row_bytes, stream, second);
  });
}

// The NCHW tasks' grain counts each group as this many elements more than it holds: a group's fixed
// costs (its statistics' latency chain: sums, a division, a square root, the merges) are worth
// about that many elements of its passes, so batches of small groups (2x2 maps, 16 or 64 values a
// group) went to one thread where their time would pay for two. Zen 3 guest, 2 threads, paired
// against torch round by round in one process, without -> with this cost: 16x512x2x2 forward bf16
// 1.78-2.15x torch -> 2.36-2.52x, fp32 1.46-1.95x -> 1.64-2.00x, forward+backward bf16 1.12-1.20x
// -> 1.42-1.70x; 16x128x4x4 fp32 forward 0.88-1.02x -> 1.38-1.55x; 8x256x2x2 fp32 forward, now
// split in two, 1.39-1.59x -> 1.34-1.71x.
constexpr int64_t kGroupFixedCost = 128;

// NCHW planes shorter than a chunk (AVX2: 1x1 to 3x3 maps): walked channel by channel, each plane
// is one masked chunk and the walk's fixed costs come C times an image. There a group's D planes go
// as one run of D * HW elements, the weight (and bias) per element from an array laid out once a
// call (w_run: w[c] at c * HW + i, the same for every image and group, a chunk of zeros past the
// end), in the plane walk's arithmetic (rstd * w[c] rounded once, then segment_affine's and
// segment_grad_input's closed forms): y bit-identical. The backward's per-plane sums of the
// shortest planes go in scalar code, in order (a masked chunk and two horizontal sums a plane
// cost more than its few values): their roundings differ from the lane sums' (dx, dweight, dbias
// within an ulp or two of the plane walk's; largest errors against fp64 as before); longer ones
// as kShortPlaneVectorSumsFrom says. Zen 3 guest, 2 threads, paired against torch
// round by round in one process, the plane walk -> runs (with kGroupFixedCost): forward 16x512x2x2
// fp32 0.58x torch -> 1.63x, bf16 0.60x -> 1.86x, 16x256x2x2 bf16 0.67x -> 1.74x, 8x256x3x3 bf16
// 0.85x -> 1.29x; forward+backward 16x512x2x2 bf16 0.63x -> 1.35x, fp32 1.36x -> 2.40x, 8x512x2x2
// bf16 0.77x -> 1.24x. Groups of two values (64 channels of 1x1 in 32 groups) stay behind torch:
// forward 0.80-0.90x, their fixed costs per group.
struct ShortPlaneRuns {
  template <typename T>
  static bool applies(const NormShape& s) {
    return !s.channels_last && s.HW < Chunk<T>::size;
  }
  // values[c] (fill where values is null) repeated HW times each, then pad zeros
  template <typename A>
  static Scratch<A> spread(const A* values, A fill, int64_t C, int64_t HW, int64_t pad) {
    Scratch<A> run(C * HW + pad, A(0));
    for (int64_t c = 0; c < C; ++c)
      std::fill_n(run.data() + c * HW, HW, values != nullptr ? values[c] : fill);
    return run;
  }
  // Per plane of `planes` planes of hw values from dy and x: sum(dy) and sum(dy * (x - center)),
  // in order, in scalar code
  template <typename T>
  static void sums(const T* dy, const T* x, int64_t planes, int64_t hw, acc_t<T> center,
                   acc_t<T>* sum_dy, acc_t<T>* sum_dy_xc) {
    using A = acc_t<T>;
    if (hw == 1) {  // (1x1 maps) the same sums as one flat loop, which the compiler vectorizes
      for (int64_t p = 0; p < planes; ++p) {
        const A g = static_cast<A>(dy[p]);
        sum_dy[p] = A(0) + g;  // (0 + g, as below: a -0 sums to +0)
        sum_dy_xc[p] = A(0) + g * (static_cast<A>(x[p]) - center);
      }
      return;
    }
    for (int64_t p = 0; p < planes; ++p, dy += hw, x += hw) {
      A s_dy = 0, s_dy_xc = 0;
      for (int64_t i = 0; i < hw; ++i) {
        const A g = static_cast<A>(dy[i]);
        s_dy += g;
        s_dy_xc += g * (static_cast<A>(x[i]) - center);
      }
      sum_dy[p] = s_dy;
      sum_dy_xc[p] = s_dy_xc;
    }
  }
};

// Values a plane from which the backward's sums of planes shorter than a chunk go a chunk a
// plane, loaded whole (short_planes_grad_sums: lane sums, as planes_grad_sums' bit for bit,
// eight planes' horizontal sums at once) instead of in scalar code, where each value cost two
// dependent adds, and a 16-bit one two conversions through the integer registers. Zen 3 guest,
// the backward op alone, one thread, builds with scalar and with vector sums alternated three
// times (min of 41 batches; time ratios vector / scalar; 32 groups): bf16 128x64x3x3 0.79x,
// 64x256x2x4 0.70x, 2x3 0.80x, 1x5 0.89x, 2x2 0.95x, 1x3 1.06x, 1x2 1.22x; fp16 128x64x3x3 0.83x;
// fp32 128x64x3x3 0.87x, 2x6 0.73x, 2x5 0.78x, 2x4 0.86x, 1x7 0.97x, 2x3 1.04x, 1x5 1.08x, 2x2
// 1.18x, 1x2 1.19x; InstanceNorm bf16 128x64x3x3 0.82x (fp32 needs no conversion: scalar code
// holds out longer). Two threads: bf16 128x64x3x3 0.82x, 64x256x3x3 0.70x, 32x512x3x3 0.67x.
// Tried with it and dropped: the dx runs of these planes (group_run_grad_input) walked without
// their masked head and tail, whole chunks from the run's start and the last one overlapping
// the one before: fp16 128x64x3x3 0.83x, but bf16 0.99x, 64x256x2x2 1.05x, and forwards the same
// way 1.05-1.07x at five shapes of six (bf16 128x64x3x3 0.99x; stores across lines).
template <typename T>
constexpr int64_t kShortPlaneVectorSumsFrom = Chunk<T>::widened ? 4 : 7;

// Groups shorter than a chunk (GroupNorm 64 channels in 32 groups on 1x1 maps: two values a
// group) in scalar code. Their vector statistics (two masked chunks, four horizontal sums, the
// fp64 merge's division) and masked stores cost 30-40 ns a group where the values are a few;
// straight scalar loops run several groups at once in the core. The same arithmetic as the
// vector passes (two passes, the mean's and squared deviations' roundings but the order of
// the sum; y and dx in the closed forms of affine_lanes and grad_input_lanes, fused as they
// are): mean and rstd within an ulp or two of the lane sums' (see short_group_moments), y and dx
// the same to an ulp. Zen 3 guest, 2 threads, paired against torch in one process, runs ->
// scalar: forward 8x64x3x3 in 64 groups (9 values) fp32 1.30-1.48x torch -> 1.73-1.91x, bf16
// 1.62x -> 1.82-2.26x; 4x32x3x3 bf16 1.45-1.57x -> 1.85-1.86x (groups of two: see group_walk).
template <typename T>
static bool short_groups(const NormShape& s, int64_t G) {
  const int64_t group_size = s.C / G * s.HW;  // (none for empty maps: no first value)
  return !s.channels_last && group_size > 0 && group_size < Chunk<T>::size;
}

// bf16 NCHW planes of a chunk or more but short (under kPlaneRunBytes), walked one by one, end in
// masked chunks where their length is not a whole number of chunks (5x5, 7x7, 14x14), and most
// start misaligned, a masked head as well: bf16 has no masked loads and stores, and emulates them.
// There a group's D planes go as one run (plane_run, reductions.h: a chunk across a boundary
// blends two channels' coefficients), as batch norm's short planes do; bit-identical. Zen 3
// guest, 2 threads, paired against torch in one process, plane walk -> run: forward
// 32x1024x14x14 0.84-0.86x torch -> 1.39-1.41x, 32x2048x7x7 0.82-0.87x -> 1.29-1.51x, 16x512x7x7
// 0.97-1.01x -> 1.35-1.43x; forward+backward 32x2048x7x7 0.80-0.83x -> 1.12-1.13x, 32x1024x14x14
// 0.95-1.01x -> 1.36-1.39x. Not for fp32 (native masked moves: forward 8x256x5x5 1.36-1.39x ->
// 0.85x, 8x2048x7x7 1.17-1.37x -> 0.82-1.00x), fp16 (8x2048x7x7 forward 2.70-2.78x -> 1.94-2.12x)
// or planes of whole chunks streamed from memory (bf16 64x512x8x8 forward+backward 1.05-1.06x ->
// 0.86-0.96x); one channel per group (instance norm) has no boundary to cross.
constexpr int64_t kPlaneRunBytes = 2048;
template <typename T>
static bool planes_as_run(const NormShape& s, int64_t G) {
  return std::is_same_v<T, at::BFloat16> && !s.channels_last && s.C / G > 1 &&
         s.HW >= Chunk<T>::size && s.HW % Chunk<T>::size != 0 &&
         s.HW * static_cast<int64_t>(sizeof(T)) < kPlaneRunBytes;
}

// Where a group's planes go as one run with per-element weights (ShortPlaneRuns' w_run, b_run;
// bit-identical to the plane walk): planes shorter than a chunk, and planes of a few chunks too,
// whose walk one by one paid a segment walk's fixed costs (its coefficients, alignment, head and
// tail) a plane for a few chunks of work: in the forward, planes under four chunks (fp32 4x4 to
// 7x7); in the backward's dx, planes of 256 bytes or less (fp32 up to 8x8) and planes of 1 KB or
// less that end in a masked chunk (fp32 9x9 to 15x15). Zen 3 guest, 2 threads, paired in one
// process, plane walk -> runs (time ratios): forward fp32 128x256x4x4 0.73-0.77x, 64x512x5x5
// 0.63x, 64x256x6x6 0.77x, 64x2048x7x7 0.72x, 32x1024x4x4 0.90x, bf16 128x256x4x4 0.89x, fp16
// 64x256x7x7 0.73x; backward (torch autograd's: x, weight and bias) fp32 64x512x4x4 0.75x,
// 64x512x5x5 0.57x, 64x256x6x6 0.71x, 64x2048x7x7 0.60x, 32x512x8x8 0.91x, 64x512x10x10 0.69x,
// 32x256x13x13 0.78x, 16x2048x15x15 0.87x, 16x2048x4x4 0.91x, bf16 64x2048x4x4 0.61x. Left to
// the plane walk, where runs lost: forward fp32 8x8 (0.91-1.33x), 13x13 (1.44x), bf16 8x8
// (1.16-1.20x); backward bf16 16x16 (1.20x), 2x1280x16x16 fp32 (1.33x); batches too small to
// pay for laying out the weights, C * HW values a call (forward 16x2048x4x4 1.11x, 8x256x4x4
// 1.25x: so 32 images or more forward, 16 backward), and groups of fewer than four planes (a
// backward 128x64x8x8, two a group, 1.10x; instance norm, one, saves nothing). bf16 planes that
// end in masked chunks go as plane_run (planes_as_run), groups under a chunk in scalar code
// (short_groups). fp32/fp64 planes of a vector or more walk vector by vector instead (see
// vector_planes): in the forward where the weights exceed kRunWeightsBytes, in the backward
// (measured above against the plane walk before these runs) always unless stored streaming.
template <typename T>
static bool group_runs(const NormShape& s, int64_t G, Pass pass) {
  if (s.channels_last || short_groups<T>(s, G) || planes_as_run<T>(s, G)) return false;
  if (ShortPlaneRuns::applies<T>(s)) return true;
  // the weights laid out per element cost C * HW values a call (and bias too, forward), the
  // batch must pay for them; a group of one or two planes saves little of the plane walk
  const bool forward = pass == Pass::kForward;
  if (s.C / G < 4 || s.N < (forward ? 32 : 16)) return false;
  constexpr int64_t chunk = Chunk<T>::size;
  const int64_t bytes = s.HW * static_cast<int64_t>(sizeof(T));
  if (forward) return s.HW < 4 * chunk;
  return bytes <= 256 || (s.HW % chunk != 0 && bytes <= 1024);
}

// fp32/fp64 NCHW planes of a vector or more walk plane by plane and vector by vector, a plane's
// last vector ending at its end, overlapping the one before it (plane_vectors: planes_affine,
// planes_grad_input): no masked moves (~50 cycles each on this Zen 3), no alignment head, none
// of a segment walk's fixed costs a plane, and front to back. Not where stores stream and planes
// end mid-chunk (their vector stores would not align). Bit-identical (elementwise). Zen 3 guest,
// 2 threads, the op alone, paired in one process against the walks before (time ratios):
// forward, against the plane walk, fp32 64x512x8x8 0.61x, 32x256x16x16 0.80x, 8x512x5x5 0.80x,
// 64x256x10x10 0.81x, 32x256x14x14 0.81x, 128x64x8x8 0.88x, InstanceNorm 64x256x7x7 0.88x,
// 8x256x32x32 0.90x, 16x64x56x56 0.92x, 2x320x64x64 0.94x, 1x128x128x128 1.00x; against
// group_runs, 32x2048x7x7 0.86x, 64x1024x5x5 0.98x, but 64x256x5x5 1.08x, 64x512x5x5 1.08x,
// 64x256x6x6 1.06x: where the runs' weights (w_run and b_run, 2 * C * HW values) stay near,
// their whole chunks beat the vectors' overlaps, so the forward keeps the runs within
// kRunWeightsBytes of weights (there 64x256x7x7 and 64x128x7x7, 100 and 50 KB of them, measured
// 0.97x as vectors: left). Backward (in blocks; x, weight and bias gradients), against group_runs
// or the plane walk: InstanceNorm 64x256x7x7 0.77x, 64x128x3x3 0.81x, GroupNorm 8x512x5x5
// 0.83x, 32x256x10x10 0.85x, 128x64x3x3 0.85x, 64x256x6x6 0.90x, 16x512x7x7 0.91x, 64x256x5x5
// 0.99x, 64x512x7x7 1.01x; planes of whole chunks, over four, 16x64x56x56 0.96x, 2x640x32x32
// 0.97x, 32x256x16x16 0.98x, 2x320x64x64 1.01x.
constexpr int64_t kRunWeightsBytes = int64_t{128} << 10;
template <typename T>
static bool vector_planes(const NormShape& s, bool stream) {
  if constexpr (Chunk<T>::widened) {
    return false;
  } else {
    return !s.channels_last && s.HW >= Chunk<T>::V::size() &&
           (!stream || s.HW % Chunk<T>::size == 0);
  }
}

// (mean, sum of squared deviations from it) of n > 0 values, two passes in order. The mean
// from the deviations from the first value: summed in order, values far from zero (a mean of 50
// and a standard deviation of 1) lost more digits than the lane sums' pairwise order did
// (largest y error of GroupNorm 16x64x1x1 in 8 groups fp32 1.7x that of the vector statistics);
// their small differences keep them.
template <typename T>
static std::pair<acc_t<T>, acc_t<T>> short_group_moments(const T* x, int64_t n) {
  using A = acc_t<T>;
  const A first = static_cast<A>(x[0]);
  A sum = 0;
  for (int64_t i = 1; i < n; ++i) sum += static_cast<A>(x[i]) - first;
  const A mean = first + sum / static_cast<A>(n);
  A m2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A d = static_cast<A>(x[i]) - mean;
    m2 = fused(d, d, m2);
  }
  return {mean, m2};
}

// y = (x - mean) * (rstd * w[c]) + b[c] over group g's D planes of HW values
template <typename T>
static void short_group_affine(const T* x, T* y, const GroupView<acc_t<T>>& v, int64_t g,
                               acc_t<T> mean, acc_t<T> rstd) {
  using A = acc_t<T>;
  for (int64_t k = 0; k < v.D; ++k, x += v.HW, y += v.HW) {
    const int64_t c = g * v.D + k;
    const A scale = rstd * v.wt(c), shift = v.bs(c);
    for (int64_t i = 0; i < v.HW; ++i)
      y[i] = static_cast<T>(fused(static_cast<A>(x[i]) - mean, scale, shift));
  }
}

// dx = dy * k_dy[c] + ((x - mean) * k_x + k_0) over group ng's D planes (k_* per (n, c))
template <typename T>
static void short_group_grad_input(const T* dy, const T* x, T* dx, int64_t D, int64_t HW,
                                   acc_t<T> mean, const acc_t<T>* k_dy, const acc_t<T>* k_x,
                                   const acc_t<T>* k_0) {
  using A = acc_t<T>;
  for (int64_t k = 0; k < D; ++k, dy += HW, x += HW, dx += HW) {
    for (int64_t i = 0; i < HW; ++i)
      dx[i] = static_cast<T>(fused(static_cast<A>(dy[i]), k_dy[k],
                                   fused(static_cast<A>(x[i]) - mean, k_x[k], k_0[k])));
  }
}

// y = (x - mean) * (rstd * w_run) + b_run over a group's run of n elements
template <typename T>
static void group_run_affine(const T* x, T* y, int64_t n, acc_t<T> mean, acc_t<T> rstd,
                             const acc_t<T>* w_run, const acc_t<T>* b_run, bool stream) {
  using C = Chunk<T>;
  using V = typename C::V;
  const V vm(mean), vr(rstd);
  const auto affine = [&](int64_t i, const V& v) {
    return affine_lanes(v, vm, vr * V::loadu(w_run + i), V::loadu(b_run + i));
  };
  // in natural order (load, put), as w_run and b_run are laid out
  segment_walk(
      y, n, stream, /*low_nans=*/true,
      [&](int64_t i, bool st, auto) {
        V a, b;
        C::load(x + i, a, b);
        C::put(y + i, affine(i, a), affine(i + V::size(), b), st);
      },
      [&](int64_t i, int64_t m) {
        V a, b;
        C::load_first(x + i, m, a, b);
        C::store_first(y + i, m, affine(i, a), affine(i + V::size(), b));
      });
}

// dx = dy * (rstd * w_run) + ((x - mean) * k_x + k_0) over a group's run of n elements
template <typename T>
static void group_run_grad_input(const T* dy, const T* x, T* dx, int64_t n, acc_t<T> mean,
                                 acc_t<T> rstd, const acc_t<T>* w_run, acc_t<T> k_x,
                                 acc_t<T> k_0, bool stream) {
  using C = Chunk<T>;
  using V = typename C::V;
  const V vm(mean), vr(rstd), vx(k_x), v0(k_0);
  const auto grad = [&](int64_t i, const V& g, const V& v) {
    return grad_input_lanes(g, v, vm, vr * V::loadu(w_run + i), vx, v0);
  };
  segment_walk(
      dx, n, stream, /*low_nans=*/true,
      [&](int64_t i, bool st, auto) {
        V ga, gb, xa, xb;
        C::load(dy + i, ga, gb);
        C::load(x + i, xa, xb);
        C::put(dx + i, grad(i, ga, xa), grad(i + V::size(), gb, xb), st);
      },
      [&](int64_t i, int64_t m) {
        V ga, gb, xa, xb;
        C::load_first(dy + i, m, ga, gb);
        C::load_first(x + i, m, xa, xb);
        C::store_first(dx + i, m, grad(i, ga, xa), grad(i + V::size(), gb, xb));
      });
}

template <typename T>
static void group_norm_fwd_typed(const at::Tensor& x, const NormShape& s, int64_t G,
                                 const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 at::Tensor& y, at::Tensor& mean_t, at::Tensor& rstd_t) {
  using A = acc_t<T>;
  const GroupView<A> v{s.N, s.C, s.HW, G, s.C / G,
                       weight.defined() ? weight.const_data_ptr<A>() : nullptr,
                       bias.defined() ? bias.const_data_ptr<A>() : nullptr};
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  A* mean = mean_t.data_ptr<A>();
  A* rstd = rstd_t.data_ptr<A>();
  const A a_eps = static_cast<A>(eps);
  const int64_t group_size = v.D * v.HW;
  // the statistics come from x; so every coefficient is clean unless these are (see low_nan)
  const bool low_nans = any_low_nan<T>({&weight, &bias});
  const A inv_group_size = group_size > 0 ? A(1) / static_cast<A>(group_size) : A(0);

  const bool stream = stream_stores(2 * x.nbytes(), Pass::kForward);
  if (!s.channels_last) {
    const int64_t group_grain = grain_for(group_size + kGroupFixedCost);
    const bool scalar_groups = short_groups<T>(s, G);
    // fp32/fp64 planes of a vector or more vector by vector (planes_affine), but where
    // group_runs' per-element weights fit kRunWeightsBytes (see vector_planes)
    const bool runs = group_runs<T>(s, G, Pass::kForward);
    const bool vector_walk =
        vector_planes<T>(s, stream) && !scalar_groups &&
        !(runs && 2 * v.C * v.HW * static_cast<int64_t>(sizeof(A)) <= kRunWeightsBytes);
    const bool run_planes = runs && !vector_walk;
    Scratch<A> w_run, b_run;
    if (run_planes) {
      w_run = ShortPlaneRuns::spread(v.w, A(1), v.C, v.HW, Chunk<T>::size);
      b_run = ShortPlaneRuns::spread(v.b, A(0), v.C, v.HW, Chunk<T>::size);
    }
    const bool plane_run = planes_as_run<T>(s, G);
    at::parallel_for(0, v.N * G, group_grain, [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      // the group's coefficients per plane, for plane_run
      Scratch<A> center(plane_run ? v.D : 0), scale(center.size()), shift(center.size());
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        const T* xg = xp + (n * v.C + g * v.D) * v.HW;
        T* yg = yp + (n * v.C + g * v.D) * v.HW;
        const auto [mu, m2] = scalar_groups ? short_group_moments(xg, group_size)
                                          : plane_moments<true>(xg, 1, group_size, group_size);
        const A rs = A(1) / std::sqrt(m2 / static_cast<A>(group_size) + a_eps);
        mean[ng] = mu;
        rstd[ng] = rs;
        if (scalar_groups) {
          short_group_affine(xg, yg, v, g, mu, rs);
          continue;
        }
        if constexpr (!Chunk<T>::widened) {
          if (vector_walk) {
            planes_affine(xg, yg, v.D, v.HW, mu, [&](int64_t k) {
              const int64_t c = g * v.D + k;
              return std::pair<A, A>(rs * v.wt(c), v.bs(c));
            }, stream);
            continue;
          }
        }
        if (run_planes) {
          group_run_affine(xg, yg, group_size, mu, rs, w_run.data() + g * group_size,
                           b_run.data() + g * group_size, stream);
          continue;
        }
        if (plane_run) {
          for (int64_t k = 0; k < v.D; ++k) {
            center[k] = mu;
            scale[k] = rs * v.wt(g * v.D + k);
            shift[k] = v.bs(g * v.D + k);
          }
          plane_run_affine<T, 3>(xg, yg, 0, v.D, v.D, v.HW,
                                 {center.data(), scale.data(), shift.data()}, stream, low_nans);
          continue;
        }
        for (int64_t k = v.D - 1; k >= 0; --k) {  // last plane first: still in L2
          const int64_t c = g * v.D + k;
          segment_affine(xg + k * v.HW, yg + k * v.HW, v.HW, mu, rs * v.wt(c), v.bs(c), stream,
                         low_nans);
        }
      }
    });
    return;
  }

  const GroupStripes stripes(v.N, v.HW, G, v.D, sizeof(T), 1, int64_t{512} << 10);
  if (stripes.count > 0) {
    const int64_t max_width = stripes.max_width();
    at::parallel_for(0, v.N * stripes.count, stripes.grain(), [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      Scratch<A> chan_mean(max_width), chan_m2(max_width), group_m2(G);
      Scratch<A> center(max_width), scale(max_width), shift(max_width);
      for (int64_t t = begin; t < end; ++t) {
        const auto [n, g0, g1, c0, c1] = stripes.task(t);
        const int64_t off = n * v.HW * v.C + c0;
        columns_welford(xp + off, 0, v.HW, c1 - c0, v.C, chan_mean.data(), chan_m2.data());
        merge_equal_runs(chan_mean.data(), chan_m2.data(), v.D, static_cast<A>(v.HW), g1 - g0,
                         mean + n * G + g0, group_m2.data());
        for (int64_t g = g0; g < g1; ++g)
          rstd[n * G + g] = A(1) / std::sqrt(group_m2[g - g0] * inv_group_size + a_eps);
        group_affine_coeffs(v, n, c0, c1, mean, rstd, center.data(), scale.data(), shift.data());
        rows_affine(xp + off, yp + off, 0, v.HW, c1 - c0, v.C, center.data(), scale.data(),
                    shift.data(), stream, low_nans);
      }
    });
    return;
  }

  // channels_last: per-(n, block of rows) Welford along the rows (PixelRows), merged per image,
  // then the normalize pass: one task per image (ImageTasks) or a chunk of images at a time
  // (ImageChunks).
  const PixelRows pr(v.HW, v.C, Chunk<T>::size);
  const int64_t W = pr.width, R = pr.rows;
  const Blocks blocks = pr.blocks();
  const int64_t nb = blocks.count;
  Scratch<A> block_count(nb);
  for (int64_t blk = 0; blk < nb; ++blk)
    block_count[blk] = static_cast<A>(blocks.end(blk) - blocks.begin(blk));
  Scratch<A> center(v.N * W), scale(v.N * W), shift(v.N * W);
  // the statistics of image n's block of rows blk, per position of a row
  const auto block_stats = [&](int64_t n, int64_t blk, A* block_mean, A* block_m2) {
    const T* xn = xp + n * v.HW * v.C;
    if constexpr (sizeof(T) == sizeof(A)) {  // rows in order (see columns_row_groups)
      columns_row_groups(xn, blocks.begin(blk), blocks.end(blk), W, W, block_mean, block_m2);
    } else {
      columns_welford(xn, blocks.begin(blk), blocks.end(blk), W, W, block_mean, block_m2);
    }
  };
  // image n's group statistics from its nb blocks' (bmean, bm2: nb * W each) and its
  // coefficients: blocks -> per-position statistics over R rows (columns_merge) -> per group
  // over its k * D positions of R rows each (merge_equal_parts). work: 2 * W + 2 * k * D values.
  const auto image_coeffs = [&](int64_t n, const A* bmean, const A* bm2, A* work) {
    A* pos_mean = work;
    A* pos_m2 = pos_mean + W;
    A* group_mean = pos_m2 + W;
    A* group_m2 = group_mean + pr.k * v.D;
    columns_merge(block_count.data(), nb, bmean, bm2, W, pos_mean, pos_m2);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < pr.k; ++i) {
        std::copy_n(pos_mean + i * v.C + g * v.D, v.D, group_mean + i * v.D);
        std::copy_n(pos_m2 + i * v.C + g * v.D, v.D, group_m2 + i * v.D);
      }
      const int64_t ng = n * G + g;
      const A m2 = merge_equal_parts(group_mean, group_m2, pr.k * v.D, static_cast<A>(R),
                                     mean + ng);
      rstd[ng] = A(1) / std::sqrt(m2 * inv_group_size + a_eps);
    }
    A* ce = center.data() + n * W;
    A* sc = scale.data() + n * W;
    A* sh = shift.data() + n * W;
    group_affine_coeffs(v, n, 0, v.C, mean, rstd, ce, sc, sh);
    pr.repeat(ce);
    pr.repeat(sc);
    pr.repeat(sh);
  };
  const auto image_affine = [&](int64_t n, int64_t r0, int64_t r1) {
    rows_affine(xp, yp, r0, r1, W, W, center.data() + n * W, scale.data() + n * W,
                shift.data() + n * W, stream, low_nans);
  };
  image_passes<A>(v.N, R, W, blocks, v.HW * v.C * static_cast<int64_t>(sizeof(T)),
                  kImageTaskBudget, 2 * W + 2 * pr.k * v.D, /*second_pass=*/true, stream,
                  block_stats, image_coeffs, image_affine);
}

// One value per plane (1x1 maps, (N, C) inputs): NCHW and channels_last memory are the same
// [N, C] rows, which the caller hands over as channels_last (batch norm's columns). A group is
// a run of D values of a row, so these walk as NCHW planes of one value, the groups split over
// the threads and those shorter than a chunk in scalar code (short_groups); only batches of few
// long groups keep the rows (2x2048x1x1 fp32 forward 1.42-1.77x torch as rows, 0.86-0.92x as
// runs). Zen 3 guest, 2 threads, paired against torch in one process, rows -> NCHW walk, in 32
// groups: forward 16x64x1x1 bf16 0.69-1.03x -> 1.74-1.93x, 64x64x1x1 bf16 0.73-0.80x ->
// 1.98-2.12x, fp32 1.12-1.22x -> 2.51-2.61x; 16x1280x1x1 bf16 1.32-1.72x -> 2.07-2.58x;
// 64x2048x1x1 fp32 1.63-1.84x -> 3.53-3.73x.
template <typename T>
static NormShape group_walk(NormShape s, int64_t G) {
  if (s.HW == 1) s.channels_last = s.C / G >= Chunk<T>::size && s.N * G < 256;
  return s;
}

void group_norm_fwd(const at::Tensor& x, const NormShape& s, int64_t num_groups,
                    const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor& y,
                    at::Tensor& mean, at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_fwd",
                                  [&] {
                                    group_norm_fwd_typed<scalar_t>(
                                        x, group_walk<scalar_t>(s, num_groups), num_groups,
                                        weight, bias, eps, y, mean, rstd);
                                  });
}

// Group ng = n * G + g's sums of dy * (x - mean_g), done with, become its channels' dweight
// terms: sum_dy_xc[n, c] * rstd[n, g], which group_param_grads sums over n. Multiplied here,
// where rstd is at hand for every group, group_param_grads is one flat loop over channels that
// the compiler vectorizes; multiplying by rstd there, group by group, it ran D channels at a time
// in scalar code (an eighth of a GroupNorm 128x64x4x4 fp32 backward's profile, 32 groups of two
// channels). The same products (multiplied, rounded, then summed in the same order):
// bit-identical. Not for one channel a group (instance norm), whose rstd is per channel:
// group_param_grads multiplies it in its flat loop (here, an InstanceNorm 64x256x4x4 fp32
// backward took 1.11x the time, the op alone, one thread). dweight_terms_in_sums says which:
// group_dweight_terms and group_param_grads both ask it.
template <typename A>
NK_ALWAYS_INLINE bool dweight_terms_in_sums(const GroupView<A>& v) {
  return v.D > 1;
}

template <typename A>
NK_ALWAYS_INLINE void group_dweight_terms(const GroupView<A>& v, int64_t n, int64_t g,
                                          const A* rstd, A* sum_dy_xc) {
  if (!dweight_terms_in_sums(v)) return;
  const A rs = rstd[n * v.G + g];
  for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) sum_dy_xc[n * v.C + c] *= rs;
}

// From per-(n, c) sum_dy and sum_dy_xc = sum(dy * (x - mean_g)), the coefficients of
// dx = dy * k_dy[c] + (x - mean) * k_x[n, g] + k_0[n, g] (stored per (n, c)) of one group:
//   g = dy * w,  xhat = (x - mean) * rstd,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// inv_count: 1 / (D * HW), from the caller. Called per group, dividing per group, this was a
// tenth of a GroupNorm 128x128x8x8 fp32 backward's profile; inlined with the division hoisted,
// paired in one process, the op alone took 0.91-0.96x the time (64x256x4x4 in 256 groups,
// 128x64x4x4, 128x128x8x8, 64x256x8x8; 16x256x8x8 1.00x). Then the group's sums of
// dy * (x - mean_g) become its dweight terms (group_dweight_terms).
template <typename A>
NK_ALWAYS_INLINE void group_grad_coeffs(const GroupView<A>& v, A inv_count, int64_t n, int64_t g,
                                        const A* rstd, const A* sum_dy, A* sum_dy_xc, A* k_dy,
                                        A* k_x, A* k_0) {
  const int64_t ng = n * v.G + g;
  A s_g = 0, s_gxc = 0;
  for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
    s_g += v.wt(c) * sum_dy[n * v.C + c];
    s_gxc += v.wt(c) * sum_dy_xc[n * v.C + c];
  }
  const A rs = rstd[ng];
  const A mean_g = s_g * inv_count;
  const A mean_gxhat = s_gxc * rs * inv_count;
  for (int64_t c = g * v.D; c < (g + 1) * v.D; ++c) {
    k_dy[n * v.C + c] = rs * v.wt(c);
    k_x[n * v.C + c] = -rs * rs * mean_gxhat;
    k_0[n * v.C + c] = -rs * mean_g;
  }
  group_dweight_terms(v, n, g, rstd, sum_dy_xc);
}

// dweight[c] = sum_n sum_dy_xc[n, c] * rstd[n, g];  dbias[c] = sum_n sum_dy[n, c], over n in
// order, the products as group_dweight_terms left them in sum_dy_xc, or, one channel a group,
// made here. Image by image along the rows of C values, blocks of channels in parallel
// (bit-identical to channel by channel, whose sums were C apart, a page and more at 1024
// channels and up, on one thread). Zen 3 guest, 2 threads, backward paired against torch in one
// process: 64x2048x1x1 fp32 0.49-0.54x torch -> 0.77-1.05x, 64x2048x2x2 fp32 2.48-2.65x ->
// 3.22-4.01x, 64x512x8x8 bf16 0.87-0.92x -> 1.02-1.04x. Flat loops, which the compiler
// vectorizes: with an integer division per group and image, this had been nearly half of an
// InstanceNorm 64x256x4x4 fp32 backward (the op alone took 0.55x the time without, paired in one
// process).
template <typename A>
static void group_param_grads(const GroupView<A>& v, const A* rstd, const A* sum_dy,
                              const A* sum_dy_xc, at::Tensor& dweight, at::Tensor& dbias) {
  A* dw = dweight.defined() ? dweight.data_ptr<A>() : nullptr;
  A* db = dbias.defined() ? dbias.data_ptr<A>() : nullptr;
  at::parallel_for(0, v.C, grain_for(2 * v.N), [&](int64_t c0, int64_t c1) {
    Scratch<A> sw(c1 - c0, A(0)), sb(c1 - c0, A(0));
    for (int64_t n = 0; n < v.N; ++n) {
      const A* row_dy = sum_dy + n * v.C;
      const A* row_dy_xc = sum_dy_xc + n * v.C;
      if (!dweight_terms_in_sums(v)) {  // (one channel a group: rstd per channel)
        const A* row_rstd = rstd + n * v.G;
        for (int64_t c = c0; c < c1; ++c) {
          sw[c - c0] += row_dy_xc[c] * row_rstd[c];
          sb[c - c0] += row_dy[c];
        }
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) {  // (group_dweight_terms' products)
        sw[c - c0] += row_dy_xc[c];
        sb[c - c0] += row_dy[c];
      }
    }
    if (dw != nullptr) std::copy_n(sw.data(), c1 - c0, dw + c0);
    if (db != nullptr) std::copy_n(sb.data(), c1 - c0, db + c0);
  });
}

// The NCHW backward (with a group per thread at least) walks blocks of consecutive groups,
// kGroupBlockPlanes planes or more, across images too (a group of that many planes is a block
// of its own): the block's per-plane sums eight planes at a time (planes_grad_sums: hsum_each),
// its groups' coefficients, then its dx while the block is in L1 or L2, one pass over memory
// instead of two. Group by group, each group's chain of latencies (its sums, their horizontal
// sums, its coefficients) stood between its two passes with little else to overlap; a block's
// groups' chains are independent. Bit-identical to group by group (the same sums, coefficients
// and elementwise arithmetic). Blocks of eight planes for groups of fewer than eight short
// planes came first, against group by group (torch autograd's backward: x, weight and bias;
// Zen 3 guest, 2 threads, paired in one process, time ratios): InstanceNorm bf16 64x256x4x4
// 0.73x, 64x256x6x6 0.76x, 64x256x7x7 0.74x, 32x128x8x8 0.95x, fp16 64x256x4x4 0.89x, fp32
// 64x256x4x4 0.90-0.92x. Then every group in blocks (group_runs' and the plane walk's groups
// too), the op alone, paired in one process against group by group: fp32 64x256x6x6 0.84x,
// 64x256x10x10 0.92x, 32x256x16x16 0.78x (with the requests ahead dropped in the L3, below);
// and blocks of 16 planes against 8: fp32 128x64x4x4 0.97x, 64x256x8x8 0.97x, 16x256x8x8 0.94x,
// 256x128x8x8 0.97x, bf16 128x64x4x4 0.94x, InstanceNorm bf16 64x256x4x4 0.93x, 64x256x7x7
// 0.92x, fp16 GroupNorm 128x64x8x8 0.91x (32 planes within a few percent of 16 either way; 64
// out of the L3 1.2x).
constexpr int64_t kGroupBlockPlanes = 16;

// A block's dx (after its sums and coefficients), the first that applies:
//   vector_planes: fp32/fp64 planes of a vector or more, plane by plane and vector by vector
//     (planes_grad_input).
//   block_as_run: 16-bit planes of one to four chunks in groups of fewer than eight, and bf16
//     planes_as_run: the block's planes as one run (plane_run_grad_input, each plane its own
//     coefficients; masked moves are emulated for 16-bit, and a run needs none inside it).
//   otherwise group by group (group_runs' per-element weights, short_groups' scalar code, or
//     the plane walk, last plane first).
template <typename T>
static bool block_as_run(const NormShape& s, int64_t G) {
  const int64_t D = s.C / G;
  return !s.channels_last && sizeof(T) == 2 && D < 8 && s.HW >= Chunk<T>::size &&
         s.HW <= 4 * Chunk<T>::size;
}

template <typename T>
static void group_norm_bwd_typed(const at::Tensor& dy, const at::Tensor& x, const NormShape& s,
                                 int64_t G, const at::Tensor& mean_t, const at::Tensor& rstd_t,
                                 const at::Tensor& weight, at::Tensor& dx, at::Tensor& dweight,
                                 at::Tensor& dbias) {
  using A = acc_t<T>;
  const GroupView<A> v{s.N, s.C, s.HW, G, s.C / G,
                       weight.defined() ? weight.const_data_ptr<A>() : nullptr, nullptr};
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  const A* mean = mean_t.const_data_ptr<A>();
  const A* rstd = rstd_t.const_data_ptr<A>();
  T* dxp = dx.defined() ? dx.data_ptr<T>() : nullptr;
  const A inv_count = A(1) / static_cast<A>(v.D * v.HW);  // (a group's values)
  // Every walk writes each (n, c) sum (or zeroes it first) and each coefficient before reading it:
  // left unzeroed (a 64x2048x1x1 fp32 backward zeroed 2.5 MB a call for 0.5 MB of x).
  // sum_dy_xc holds a group's dweight terms once its coefficients are computed, where
  // dweight_terms_in_sums (group_dweight_terms).
  LineBuffer<A> sum_dy(v.N * v.C), sum_dy_xc(v.N * v.C);
  const int64_t coeffs = dxp != nullptr ? v.N * v.C : 0;
  LineBuffer<A> k_dy(coeffs), k_x(coeffs), k_0(coeffs);
  const bool stream = dxp != nullptr && stream_stores(3 * x.nbytes(), Pass::kBackward);
  // dx's coefficients come from these, x and dy (see low_nan)
  const bool low_nans = any_low_nan<T>({&mean_t, &rstd_t, &weight});
  // NCHW planes: plane nc = n * C + c belongs to group nc / D (= n * G + c / D).
  const auto plane_sums = [&](int64_t nc) {
    std::tie(sum_dy[nc], sum_dy_xc[nc]) =
        segment_grad_sums<true>(gp + nc * v.HW, xp + nc * v.HW, v.HW, mean[nc / v.D]);
  };
  // (center: the mean of its group, mean[nc / D], passed in: a division a plane cost)
  const auto plane_grad_input = [&](int64_t nc, A center) {
    segment_grad_input(gp + nc * v.HW, xp + nc * v.HW, dxp + nc * v.HW, v.HW, center, k_dy[nc],
                       k_x[nc], k_0[nc], stream, low_nans);
  };
  const int64_t group_grain = grain_for(v.D * v.HW + kGroupFixedCost);  // NCHW tasks by group
  // the sums of the planes of groups [ng0, ng1), planes shorter than a chunk, plane p's shift
  // center_of(p): a chunk a plane (short_planes_grad_sums), or the shortest in scalar code
  const bool short_planes = ShortPlaneRuns::applies<T>(s);
  const bool short_vector_sums = short_planes && v.HW >= kShortPlaneVectorSumsFrom<T>;
  const auto short_plane_sums = [&](int64_t ng0, int64_t ng1, const auto& center_of) {
    const int64_t off = ng0 * v.D * v.HW, nc0 = ng0 * v.D;
    if (short_vector_sums) {
      short_planes_grad_sums(gp + off, xp + off, (ng1 - ng0) * v.D, v.HW, x.numel() - off,
                             center_of, sum_dy.data() + nc0, sum_dy_xc.data() + nc0);
      return;
    }
    for (int64_t ng = ng0; ng < ng1; ++ng)
      ShortPlaneRuns::sums(gp + ng * v.D * v.HW, xp + ng * v.D * v.HW, v.D, v.HW, mean[ng],
                           sum_dy.data() + ng * v.D, sum_dy_xc.data() + ng * v.D);
  };
  // NCHW with a group per thread at least: blocks of groups (kGroupBlockPlanes), each task's
  // blocks its sums, coefficients and dx in turn.
  const bool fused = !s.channels_last && dxp != nullptr && v.N * G >= at::get_num_threads();
  const bool vector_walk = fused && vector_planes<T>(s, stream);
  // dx of group ng = n * G + g: as one run (group_runs: ShortPlaneRuns' weights), for groups
  // shorter than a chunk in scalar code (short_groups), else its planes one by one, last first
  const bool scalar_groups = short_groups<T>(s, G);
  const bool run_planes = !vector_walk && group_runs<T>(s, G, Pass::kBackward);
  const Scratch<A> w_run = run_planes && dxp != nullptr
                               ? ShortPlaneRuns::spread(v.w, A(1), v.C, v.HW, Chunk<T>::size)
                               : Scratch<A>();
  const auto group_grad_input = [&](int64_t ng) {
    const int64_t off = ng * v.D * v.HW, nc = ng * v.D;
    if (scalar_groups) {
      short_group_grad_input(gp + off, xp + off, dxp + off, v.D, v.HW, mean[ng],
                             k_dy.data() + nc, k_x.data() + nc, k_0.data() + nc);
    } else if (run_planes) {
      group_run_grad_input(gp + off, xp + off, dxp + off, v.D * v.HW, mean[ng], rstd[ng],
                           w_run.data() + (ng % G) * v.D * v.HW, k_x[nc], k_0[nc], stream);
    } else {
      for (int64_t p = nc + v.D - 1; p >= nc; --p) plane_grad_input(p, mean[ng]);
    }
  };
  // (planes_as_run and block_as_run planes hold a chunk or more: never short planes)
  const bool block_run = planes_as_run<T>(s, G) || (block_as_run<T>(s, G) && !run_planes);

  LineBuffer<A> center(s.channels_last ? v.N * v.C : 0);  // each channel's group mean, per image
  bool dx_done = fused;
  if (fused) {
    const int64_t block_groups = std::max<int64_t>(1, (kGroupBlockPlanes + v.D - 1) / v.D);
    at::parallel_for(0, v.N * G, group_grain, [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      Scratch<A> plane_center(block_groups * v.D);  // each plane's group mean
      for (int64_t ng0 = begin; ng0 < end; ng0 += block_groups) {
        const int64_t ng1 = std::min(end, ng0 + block_groups);
        const int64_t planes = (ng1 - ng0) * v.D, nc0 = ng0 * v.D, off = nc0 * v.HW;
        if (!short_planes || vector_walk || short_vector_sums) {  // (else none needs them)
          for (int64_t ng = ng0; ng < ng1; ++ng)
            std::fill_n(plane_center.data() + (ng - ng0) * v.D, v.D, mean[ng]);
        }
        if (short_planes) {
          short_plane_sums(ng0, ng1, [&](int64_t p) { return plane_center[p]; });
        } else {
          // The requests ahead (stream_ahead) only where dy and x come from memory: from the L3
          // they cost, paired in one process, GroupNorm fp32 128x128x8x8 1.14x the time (op
          // alone), 64x256x8x8 1.18x, 16x256x8x8 1.15x; from memory (stores streaming) they
          // paid at 256x128x8x8 (0.93-0.99x) and not at 128x256x8x8 in 256 groups (0.98-1.10x):
          // kept there, as every first pass from memory has them.
          with_flag(stream, [&](auto ahead) NK_INLINE_LAMBDA {
            planes_grad_sums<ahead.value>(gp + off, xp + off, planes, v.HW,
                                          [&](int64_t p) { return plane_center[p]; },
                                          sum_dy.data() + nc0, sum_dy_xc.data() + nc0);
          });
        }
        for (int64_t ng = ng0, n = ng0 / G, g = ng0 % G; ng < ng1; ++ng) {
          group_grad_coeffs(v, inv_count, n, g, rstd, sum_dy.data(), sum_dy_xc.data(),
                            k_dy.data(), k_x.data(), k_0.data());
          if (++g == G) {  // (no division a group)
            g = 0;
            ++n;
          }
        }
        if constexpr (!Chunk<T>::widened) {
          if (vector_walk) {
            planes_grad_input(gp + off, xp + off, dxp + off, planes, v.HW, plane_center.data(),
                              k_dy.data() + nc0, k_x.data() + nc0, k_0.data() + nc0, stream);
            continue;
          }
        }
        if (block_run) {
          plane_run_grad_input(gp + off, xp + off, dxp + off, 0, planes, planes, v.HW,
                               plane_center.data(), k_dy.data() + nc0, k_x.data() + nc0,
                               k_0.data() + nc0, stream, low_nans);
          continue;
        }
        for (int64_t ng = ng0; ng < ng1; ++ng) group_grad_input(ng);
      }
    });
  } else if (!s.channels_last && short_planes) {
    at::parallel_for(0, v.N * G, group_grain, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng)
        short_plane_sums(ng, ng + 1, [&](int64_t) { return mean[ng]; });
    });
  } else if (!s.channels_last) {
    at::parallel_for(0, v.N * v.C, grain_for(v.HW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) plane_sums(nc);
    });
  } else {
    for (int64_t ng = 0; ng < v.N * G; ++ng)  // (no division per channel: see group_affine_coeffs)
      std::fill_n(center.data() + ng * v.D, v.D, mean[ng]);
    // Stripes as the forward's, of dy and x together: sums, coefficients and dx per stripe, dy
    // and x read back from L2 (768 KB of them measured better than 512 KB, which left
    // 2x1280x16x16 at stripes narrower than 1 KB: its bf16 backward 0.177 -> 0.155 ms, fp32
    // 0.205 -> 0.167 ms). dx by register tiles (columns_grad_input): from L2 the row walk is
    // bound by its coefficient loads; paired in one process, fp32 2x1280x16x16 backward 0.83x
    // the time, 2x1280x8x8 0.86x, bf16 2x1280x16x16 0.97x.
    const GroupStripes stripes(v.N, v.HW, G, v.D, sizeof(T), 2, int64_t{768} << 10);
    if (dxp != nullptr && stripes.count > 0) {
      at::parallel_for(0, v.N * stripes.count, stripes.grain(), [&](int64_t begin, int64_t end) {
        const StreamFence fence(stream);
        for (int64_t t = begin; t < end; ++t) {
          const auto [n, g0, g1, c0, c1] = stripes.task(t);
          const int64_t off = n * v.HW * v.C + c0, nc0 = n * v.C + c0;
          columns_grad_sums(gp + off, xp + off, 0, v.HW, c1 - c0, v.C, center.data() + nc0,
                            sum_dy.data() + nc0, sum_dy_xc.data() + nc0);
          for (int64_t g = g0; g < g1; ++g)
            group_grad_coeffs(v, inv_count, n, g, rstd, sum_dy.data(), sum_dy_xc.data(),
                              k_dy.data(), k_x.data(), k_0.data());
          columns_grad_input(gp + off, xp + off, dxp + off, 0, v.HW, c1 - c0, v.C,
                             center.data() + nc0, k_dy.data() + nc0, k_x.data() + nc0,
                             k_0.data() + nc0, stream, low_nans);
        }
      });
      dx_done = true;
    } else {
      // A group's channels are strided through every row: blocks of rows (PixelRows), columns
      // along them; the sums and then dx one task per image (ImageTasks) or a chunk of images
      // at a time (ImageChunks).
      const PixelRows pr(v.HW, v.C, Chunk<T>::size);
      const int64_t W = pr.width, R = pr.rows;
      Scratch<A> center_w(v.N * W);
      for (int64_t n = 0; n < v.N; ++n)
        pr.spread(center.data() + n * v.C, center_w.data() + n * W);
      const Blocks blocks = pr.blocks();
      const int64_t nb = blocks.count;
      Scratch<A> k_dy_w, k_x_w, k_0_w;
      if (dxp != nullptr) {
        k_dy_w.resize(v.N * W);
        k_x_w.resize(v.N * W);
        k_0_w.resize(v.N * W);
      }
      // image n's block of rows blk: its sums per position of a row
      const auto block_sums = [&](int64_t n, int64_t blk, A* part_dy, A* part_dyx) {
        const int64_t off = n * v.HW * v.C;
        // written over what an earlier block left here
        columns_grad_sums(gp + off, xp + off, blocks.begin(blk), blocks.end(blk), W, W,
                          center_w.data() + n * W, part_dy, part_dyx);
      };
      // image n's per-channel sums from its nb blocks' (position j of a row is channel j % C),
      // in a fixed order, then (with dx) its coefficients
      const auto image_coeffs = [&](int64_t n, const A* part_dy, const A* part_dyx, A*) {
        std::fill_n(sum_dy.data() + n * v.C, v.C, A(0));
        std::fill_n(sum_dy_xc.data() + n * v.C, v.C, A(0));
        for (int64_t blk = 0; blk < nb; ++blk)
          for (int64_t j0 = 0; j0 < W; j0 += v.C)  // (pixel by pixel: no j % C)
            for (int64_t c = 0; c < v.C; ++c) {
              sum_dy[n * v.C + c] += part_dy[blk * W + j0 + c];
              sum_dy_xc[n * v.C + c] += part_dyx[blk * W + j0 + c];
            }
        if (dxp == nullptr) return;
        for (int64_t g = 0; g < G; ++g)
          group_grad_coeffs(v, inv_count, n, g, rstd, sum_dy.data(), sum_dy_xc.data(), k_dy.data(),
                            k_x.data(), k_0.data());
        pr.spread(k_dy.data() + n * v.C, k_dy_w.data() + n * W);
        pr.spread(k_x.data() + n * v.C, k_x_w.data() + n * W);
        pr.spread(k_0.data() + n * v.C, k_0_w.data() + n * W);
      };
      const auto image_grad_input = [&](int64_t n, int64_t r0, int64_t r1) {
        rows_grad_input(gp, xp, dxp, r0, r1, W, W, center_w.data() + n * W,
                        k_dy_w.data() + n * W, k_x_w.data() + n * W, k_0_w.data() + n * W,
                        stream, low_nans);
      };
      const int64_t elem_bytes = static_cast<int64_t>(sizeof(T));
      image_passes<A>(v.N, R, W, blocks, 2 * v.HW * v.C * elem_bytes, kImageTaskBackwardBudget,
                      0, /*second_pass=*/dxp != nullptr, stream, block_sums, image_coeffs,
                      image_grad_input);  // (x and dy: two inputs)
      dx_done = true;
    }
  }

  // Every group's coefficients (and with them its dweight terms) where dx is wanted: the walks
  // above computed them, except for NCHW with fewer groups than threads, computed here.
  if (dxp != nullptr && !dx_done) {
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t g = 0; g < G; ++g)
        group_grad_coeffs(v, inv_count, n, g, rstd, sum_dy.data(), sum_dy_xc.data(),
                          k_dy.data(), k_x.data(), k_0.data());
  }
  if (dweight.defined() || dbias.defined()) {
    if (dxp == nullptr && dweight_terms_in_sums(v)) {  // (no coefficients computed)
      at::parallel_for(0, v.N, grain_for(v.C), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t g = 0; g < G; ++g) group_dweight_terms(v, n, g, rstd, sum_dy_xc.data());
      });
    }
    group_param_grads(v, rstd, sum_dy.data(), sum_dy_xc.data(), dweight, dbias);
  }
  if (dxp == nullptr || dx_done) return;

  // The second pass over memory, NCHW with fewer groups than threads.
  if (short_planes) {  // (never plane_run: planes of a chunk or more go one by one below)
    at::parallel_for(0, v.N * G, group_grain, [&](int64_t begin, int64_t end) {
      const StreamFence fence(stream);
      for (int64_t ng = begin; ng < end; ++ng) group_grad_input(ng);
    });
    return;
  }
  at::parallel_for(0, v.N * v.C, grain_for(v.HW), [&](int64_t begin, int64_t end) {
    const StreamFence fence(stream);
    for (int64_t nc = begin; nc < end; ++nc) plane_grad_input(nc, mean[nc / v.D]);
  });
}

void group_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const NormShape& s,
                    int64_t num_groups, const at::Tensor& mean, const at::Tensor& rstd,
                    const at::Tensor& weight, at::Tensor& dx, at::Tensor& dweight,
                    at::Tensor& dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_bwd",
                                  [&] {
                                    group_norm_bwd_typed<scalar_t>(
                                        dy, x, group_walk<scalar_t>(s, num_groups), num_groups,
                                        mean, rstd, weight, dx, dweight, dbias);
                                  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace normkernels
