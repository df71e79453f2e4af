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

// Bytes of the largest cache level the OS reports, 0 if none.
int64_t last_level_cache_bytes() {
  int64_t best = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
  best = std::max<int64_t>(best, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
  if (best <= 0) best = std::max<int64_t>(best, sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
  if (best > 0) return best;
  // sysconf knows nothing here (some libcs, Arm): sysfs lists each cache level of cpu0.
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
    best = std::max<int64_t>(best, value);
  }
  return best;
}

// -1: decide by size; 0: never; 1: always.
int forced_mode() {
  const char* env = std::getenv("NORMKERNELS_STREAM_STORES");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return -1;
  return std::atoi(env) != 0 ? 1 : 0;
}

}  // namespace

bool stream_stores(int64_t bytes) {
  static const int mode = forced_mode();
  static const int64_t llc = last_level_cache_bytes();
  if (mode >= 0) return mode == 1;
  return llc > 0 && bytes >= llc;
}

}  // namespace cpu
}  // namespace normkernels
