// The size limits of everything dde reads from its own formats, in one place: each is checked
// before anything is allocated for it (from the file size, a length field or a count), and an
// input over one is a dde::Error naming the file (or config key), the limit and the size.
// Generous for real data; a larger input is a damaged or hostile file. Torch-free.
#pragma once

#include <cstdint>

namespace dde::util {

inline constexpr int64_t kKiB = int64_t{1} << 10;
inline constexpr int64_t kMiB = int64_t{1} << 20;

// --- The YAML config (a file, a --set value, a checkpoint's config.yaml); docs/config.md.
// The shipped configs are ~2 KB.
inline constexpr int64_t kMaxConfigFileBytes = kMiB;
// Entries of one list (eval.t_bins: T = 1000 timesteps at most in practice).
inline constexpr int64_t kMaxConfigListEntries = 4096;
// Keys of one map (a section has ~20).
inline constexpr int64_t kMaxConfigMapEntries = 1024;
// Bytes of one scalar (a path: PATH_MAX is 4096).
inline constexpr int64_t kMaxConfigStringBytes = 4096;
// Levels of nesting (the config has 4: file, section, subsection, list).
inline constexpr int64_t kMaxConfigDepth = 32;

// --- The JSON and binary formats (docs/formats.md).
// manifest.json of an export: a few KB per model.
inline constexpr int64_t kMaxManifestBytes = 16 * kMiB;
// index.json of the shards (data.index, data.eval_index) and of a latent cache (data.cache):
// ~300 bytes per shard, so 100k shards are ~30 MB.
inline constexpr int64_t kMaxIndexBytes = 256 * kMiB;
// The JSON files of a checkpoint (trainer_state.json, rank-*.json, correction_ema.json,
// unet/config.json): a few KB.
inline constexpr int64_t kMaxCheckpointJsonBytes = 64 * kMiB;
// The JSON header of a safetensors file (the reference reader's MAX_HEADER_SIZE, 100 MB): SDXL's
// UNet has ~200 KB; a latent cache shard's holds the keys of its pairs.
inline constexpr int64_t kMaxSafetensorsHeaderBytes = 100'000'000;
// One line of metrics.jsonl (logging.per_sample writes t, z and loss of every pair of a step:
// ~100 KB at a global batch of 2048).
inline constexpr int64_t kMaxMetricsLineBytes = 64 * kMiB;

// --- A CLIP tokenizer folder (vocab.json ~1.6 MB, merges.txt ~0.5 MB) and one caption
// (dde_tokenize's input lines; Pick-a-Pic's longest are a few KB).
inline constexpr int64_t kMaxTokenizerFileBytes = 64 * kMiB;
inline constexpr int64_t kMaxCaptionBytes = kMiB;

}  // namespace dde::util
