// Bounds on the data options that size allocations (checked by config validation, naming the
// config key, and again by PairLoader for its own callers). Torch-free.
#pragma once

#include <cstdint>

namespace dde::data {

inline constexpr int64_t kMaxResolution = 8192;  // pixels per side of a training image
// micro_batch x resolution^2: one micro-batch is 24 bytes per pixel (two float32 RGB images),
// so this is 6 GiB of pixels (e.g. 256 pairs at 1024).
inline constexpr int64_t kMaxBatchPixels = int64_t{1} << 28;
// (prefetch_batches + 1) x micro_batch x resolution^2: decoded pairs held ahead (12 GiB).
inline constexpr int64_t kMaxQueuedPixels = int64_t{1} << 29;
inline constexpr int64_t kMaxWorkers = 256;
inline constexpr int64_t kMaxPrefetchBatches = 1024;
inline constexpr int64_t kMaxShuffleBuffer = int64_t{1} << 20;  // records (~1.5 KB each)
inline constexpr int64_t kMaxImagePixels = int64_t{1} << 30;    // 3 GiB of RGB per decode

}  // namespace dde::data
