// When kernels write their outputs around the caches (see stream_stores in kernels.h).
#include "kernels.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace normkernels {
namespace cpu {
namespace {

// Bytes of last-level cache the OS reports, 0 if it says nothing. VMs report it loosely: this
// AMD EPYC guest's sysfs gives cpu0's 32 MiB CCX L3 while glibc's sysconf sums the socket's
// (320 MiB); a Xeon guest's sysfs and sysconf both give the host's 480 MiB, shared with every
// other guest. So: the smaller of the two reports.
int64_t reported_llc_bytes() {
  int64_t from_sysfs = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string path =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
    FILE* f = std::fopen(path.c_str(), "r");
    if (f == nullptr) break;
    long long value = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &value, &unit);
    std::fclose(f);
    if (got < 1) continue;
    if (unit == 'K') value <<= 10;
    if (unit == 'M') value <<= 20;
    from_sysfs = std::max<int64_t>(from_sysfs, value);
  }
  int64_t from_sysconf = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
  from_sysconf = std::max<int64_t>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
  return from_sysfs > 0 && from_sysconf > 0 ? std::min(from_sysfs, from_sysconf)
                                            : std::max(from_sysfs, from_sysconf);
}

// The cache a pass can count on: at most 32 MiB, about what one core complex shares on current
// servers, whatever a guest is told (with NORMKERNELS_STREAM_STORES to override). On the Xeon
// guest, forward passes of 32-96 MB looped alone ran 0.86-0.90x the time with plain stores, but
// in the bench suite, among the other providers' tensors, a 128 MiB cap lost (LayerNorm
// 8192x768 fp32 forward 1.28 -> 1.93 ms, 2048x4096 2.12 -> 2.93 ms): 32 MiB stays. So did a
// 40 MiB cap for forwards alone (plain stores for the 32 MB passes of 16 MB tensors): three full
// runs on the Xeon guest against one with 32 MiB the same day, the fp32 LayerNorm forwards it was
// for moved within noise (0.70-0.87 ms both ways), while steps whose forward output nothing
// reads back lost: fp32 LayerNorm 4096x1024 forward+backward 2.03 -> 2.49-2.54 ms, bf16 RMS
// norm 2048x4096 forward 1.08 -> 1.41-1.58 ms, geomean 2.12 -> 2.07-2.10x.
constexpr int64_t kLlcCap = int64_t{32} << 20;

// -1: decide by size; 0: never; 1: always.
int forced_mode() {
  const char* env = std::getenv("NORMKERNELS_STREAM_STORES");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return -1;
  return std::atoi(env) != 0 ? 1 : 0;
}

}  // namespace

// Forward passes from the whole cache (seven eighths of it: see the end), backward passes from
// half of it. A pass that fits the cache can leave its output there for whatever reads it next
// (the next layer; in a loop, the pool's block of the same output, rewritten in place). A
// backward pass in training reads an input saved long before (x), from memory, while it writes
// dx: there streaming dx saves the read for ownership and keeps the cache for dy and x. Until
// this rule every pass streamed from half the cache (the L3 is shared: on this 32 MiB EPYC guest
// a second read of 24 MB just read ran at 56 GB/s against 85 for 8 MB), and forwards looped alone
// lost to torch's plain stores whenever the L3 held their x and y (GroupNorm 2x320x64x64 fp32
// 0.72-0.99x torch's speed, BatchNorm 16x64x56x56 fp32 inference 0.66x). Side by side in one
// process, over the suite cases with passes of 16-32 MB, against half the cache for both:
//   L3 quiet (torch's GroupNorm 2x320x64x64 fp32 forward at 0.44-0.52 ms): forwards looped
//   alone took 0.49-0.77x the time with the whole cache, and ran at 1.28x torch's speed or more;
//   L3 busy (that forward at 0.82-1.10 ms): the whole cache for both passes made forward+
//   backward steps 1.02-1.49x the time (bf16 LayerNorm 4096x1024 4.05x -> 2.95x torch's
//   speed); whole for forwards and half for backwards, 0.90-1.38x (median 1.07), and it kept
//   BatchNorm 16x64x56x56 fp32 inference at 1.64x torch's speed, where half for both had it at
//   1.01x.
//
// Half the reported cache for backward passes, but not below the cap: where the OS reports far
// more than the cap (the Xeon guest's 480 MiB), the capped size is already a conservative share
// and halving it again streamed passes the cache held. On that guest, bench cases whose backward
// passes are 16-32 MB (BatchNorm 16x128x28x28 fp32 and 16x64x56x56 bf16, GroupNorm
// 2x320x64x64 fp32, InstanceNorm 4x128x64x64 fp32, bf16 LayerNorm 4096x1024, 1024x4096,
// 512x8192), forward+backward steps with plain stores against streaming, two runs each: 0.74-0.98x
// the time (LayerNorm alone looped, backward passes of 24-48 MB: 0.91-0.94x; 120 MB and more
// streaming won, 0.67-0.83x). Where the report is 32 MiB (the EPYC guest), nothing changes.
//
// A pass streams once it is larger than its share, not once it reaches it: a forward pass of
// exactly the cache (the 32 MiB of x and y of a 16 MiB LayerNorm or RMSNorm) fits it and stores
// plainly. On the Xeon guest, a LayerNorm whose y the next op reads (LayerNorm then GELU,
// inference, 60 steps, three runs each): fp32 4096x1024 2.40-2.52 -> 1.53-1.76 ms a step, 512x8192
// 2.55-2.59 -> 1.68-1.88, bf16 2048x4096 4.35-5.16 -> 2.69-2.70, fp32 RMSNorm 4096x1024 2.36 ->
// 1.52-1.54; with training's backward after 64 MB of other traffic (standing in for the other
// layers), the step took the same time either way (12.8-17.3 ms, within 3%). The bench's
// forward+backward step of the same tensors, whose backward follows the forward at once and
// nothing reads y, lost: 1.27-1.34x the time (fp32 LayerNorm 4096x1024 1.85 -> 2.35 ms), as
// the forward's y pushes out of the L3 the x the backward reads; its forwards looped alone went
// 0.86-0.92x -> 1.04-1.11x torch's speed (torch's plain stores keep x and y in the L3 there).
//
// That held where the reported cache is far larger than the cap (the Xeon guest's 480 MiB: the
// cap is a share of it). Where the cap is the whole reported cache (the Zen 3 guest's 32 MiB CCX
// L3), a pass of exactly that size cannot fit beside anything else: every line is gone before it
// is reused, and plain stores only add the read for ownership. So a forward pass counts on seven
// eighths of the reported cache, at most the cap (on the Xeon guest, the cap as before). Zen 3
// guest, the suite's cases with 25-32 MiB forward passes, three bench runs (--chain) with
// streaming forced against two without, ratios to torch paired per round: fp32 LayerNorm
// 4096x1024 forward 1.92-2.00x against 1.13-1.52x, 1024x4096 1.50-1.62x against 1.02-1.20x,
// 512x8192 1.33-1.60x against 0.99-1.10x, fp32 RMSNorm 4096x1024 4.4-5.3x against 2.7-3.3x, bf16
// LayerNorm 2048x4096 1.80-2.04x against 1.72-1.73x; their chains (forward, then y.sum()) and
// forward+backward steps within the runs' spread (LayerNorm 4096x1024 chain 0.99-1.21x against
// 1.04-1.11x, ours 1.88-1.96 ms against 2.60-2.68). The 25.7 MB passes of BatchNorm 16x64x56x56
// fp32 lost with streaming (inference 1.03-1.07x against 1.33-1.85x, channels_last training
// forward 1.60-1.87x against 2.17-2.30x): they fit, so they stay below the mark.
bool stream_stores(int64_t bytes, Pass pass) {
  static const int mode = forced_mode();
  static const int64_t reported = reported_llc_bytes();
  static const int64_t forward_from = std::min(reported / 8 * 7, kLlcCap);
  static const int64_t backward_from = std::min(reported / 2, kLlcCap);
  if (mode >= 0) return mode == 1;
  return reported > 0 && bytes > (pass == Pass::kForward ? forward_from : backward_from);
}

}  // namespace cpu
}  // namespace normkernels
