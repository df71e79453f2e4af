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

// From half the cache: the L3 is shared (with the other cores of its complex, and on a cloud
// host with other tenants), and a pass does not keep its data there up to the cache's nominal
// size. On this 32 MiB EPYC guest, a second read of data just read comes back at 85 GB/s for
// 8 MB, 74 for 16 MB and only 56 for 24 MB (about 20 from memory). Side by side, over the 28
// suite cases whose passes touch 16-32 MB (2 threads, four runs), streaming from half the cache
// made the forward+backward steps 0.69-1.03x the time (about 0.85x typical; GroupNorm and
// InstanceNorm fp32 0.69-0.87x), training forwards mostly faster (BatchNorm 56x56 fp32
// 0.71-0.75x); a single forward looped alone on the same tensors, which then stay warm in the
// L3, went either way (0.70-1.34x; RMSNorm 4096x1024 bf16 and BatchNorm 56x56 fp32 inference
// mostly slower).
bool stream_stores(int64_t bytes) {
  static const int mode = forced_mode();
  static const int64_t llc = last_level_cache_bytes();
  if (mode >= 0) return mode == 1;
  return llc > 0 && bytes >= llc / 2;
}

}  // namespace cpu
}  // namespace normkernels
