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

// Bytes of last-level cache a pass can count on, 0 if the OS says nothing. VMs report it
// loosely: this AMD EPYC guest's sysfs gives cpu0's 32 MiB CCX L3 while glibc's sysconf sums
// the socket's (320 MiB); a Xeon guest's sysfs gave the host's 480 MiB. So: the smaller of the
// two reports, and at most 32 MiB, about what one core complex shares on current servers (with
// NORMKERNELS_STREAM_STORES to override).
int64_t last_level_cache_bytes() {
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
  int64_t llc = from_sysfs > 0 && from_sysconf > 0 ? std::min(from_sysfs, from_sysconf)
                                                   : std::max(from_sysfs, from_sysconf);
  return std::min<int64_t>(llc, int64_t{32} << 20);
}

// -1: decide by size; 0: never; 1: always.
int forced_mode() {
  const char* env = std::getenv("NORMKERNELS_STREAM_STORES");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return -1;
  return std::atoi(env) != 0 ? 1 : 0;
}

}  // namespace

// Forward passes from the whole cache, backward passes from half of it. A pass that fits the
// cache can leave its output there for whatever reads it next (the next layer; in a loop, the
// pool's block of the same output, rewritten in place). A backward pass in training reads an
// input saved long before (x), from memory, while it writes dx: there streaming dx saves the
// read for ownership and keeps the cache for dy and x. Until this rule every pass streamed from
// half the cache (the L3 is shared: on this 32 MiB EPYC guest a second read of 24 MB just read
// ran at 56 GB/s against 85 for 8 MB), and forwards looped alone lost to torch's plain stores
// whenever the L3 held their x and y (GroupNorm 2x320x64x64 fp32 0.72-0.99x torch's speed,
// BatchNorm 16x64x56x56 fp32 inference 0.66x). Side by side in one process, over the suite
// cases with passes of 16-32 MB, against half the cache for both:
//   L3 quiet (torch's GroupNorm 2x320x64x64 fp32 forward at 0.44-0.52 ms): forwards looped
//   alone took 0.49-0.77x the time with the whole cache, and ran at 1.28x torch's speed or more;
//   L3 busy (that forward at 0.82-1.10 ms): the whole cache for both passes made forward+
//   backward steps 1.02-1.49x the time (bf16 LayerNorm 4096x1024 4.05x -> 2.95x torch's
//   speed); whole for forwards and half for backwards, 0.90-1.38x (median 1.07), and it kept
//   BatchNorm 16x64x56x56 fp32 inference at 1.64x torch's speed, where half for both had it at
//   1.01x.
bool stream_stores(int64_t bytes, Pass pass) {
  static const int mode = forced_mode();
  static const int64_t llc = last_level_cache_bytes();
  if (mode >= 0) return mode == 1;
  return llc > 0 && bytes >= (pass == Pass::kForward ? llc : llc / 2);
}

}  // namespace cpu
}  // namespace normkernels
