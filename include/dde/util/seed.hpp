// Seeds of per-item random streams: the same item gets the same draws whatever the world size,
// batch or resume point. scripts and tests that recompute a draw in Python mirror this function.
#pragma once

#include <cstdint>

namespace dde {

// splitmix64 chained over (id, stream), starting from `seed`.
inline uint64_t mix_seed(uint64_t seed, int64_t id, uint64_t stream) {
  uint64_t h = seed;
  for (uint64_t part : {static_cast<uint64_t>(id), stream}) {
    h ^= part;
    h += 0x9E3779B97F4A7C15ULL;
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
    h ^= h >> 31;
  }
  return h;
}

}  // namespace dde
