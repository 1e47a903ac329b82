// The streaming batcher of preference pairs used by the trainer.
//
// Determinism (what makes exact resume and multi-rank sharding cheap):
// - The order of the pairs of an epoch is a pure function of (seed, epoch): the shards are
//   shuffled with a seeded RNG, their pairs (ties dropped first unless keep_ties) streamed
//   through one seeded shuffle buffer. Pair i of that global sequence goes to rank
//   i % world_size; the last N % world_size pairs of an epoch are left out (different ones
//   every epoch) so that every rank holds the same number of pairs and the same state.
// - The random choices of a pair (caption dropout, winner flip, loser flip, crop offsets) come
//   from an RNG seeded by hash(seed, epoch, global pair index): independent of thread timing.
// - The ordering reads only the small KEY.json members (JPEGs are seeked over), so load_state
//   re-runs it and skips the consumed pairs without decoding any image.
// Threads: one sequencer runs the ordering; `workers` threads read, decode and preprocess
// pairs at most prefetch_batches batches ahead; next() returns them in sequence order and
// rethrows a worker's error (naming the shard and key) when it reaches that pair.
// A state resumes exactly under the same shards, seed, keep_ties and world_size; it counts
// pairs, not batches, so batch_size, workers and prefetch may change across a resume.
// Bad pairs: a pair whose own bytes fail (image that does not decode or breaks the limits,
// metadata that does not parse, token ids outside the vocabulary: BadPairError) is skipped
// and reported by take_bad_pairs(); next() fills the batch with the following pairs. It
// keeps its place in the order, so a resumed run skips exactly the same pairs. Any other
// error (I/O, a shard that changed) is rethrown. The budget (data.max_bad_pairs) is the
// trainer's, over all ranks.
// Start-up: the constructor checks the shards against index.json (check_shards).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dde/data/caption_tokenizer.hpp"
#include "dde/data/latent_cache.hpp"

namespace dde::data {

struct PairLoaderOptions {
  std::string index_path;
  int64_t resolution = 512;
  bool random_crop = false;
  bool random_flip = true;
  double caption_dropout = 0.2;
  int64_t shuffle_buffer = 1000;
  int64_t workers = 4;
  int worker_nice = 0;  // added to each worker thread's niceness (util/threads.hpp)
  int64_t prefetch_batches = 4;
  bool keep_ties = false;
  uint64_t seed = 0;
  int64_t batch_size = 1;            // per-rank micro-batch
  int64_t rank = 0, world_size = 1;  // disjoint shares of the stream
  std::vector<std::vector<int64_t>>
      empty_prompt_ids;  // per tokenizer: ids used when the caption is dropped
  std::vector<std::string> expected_vocab_sha256;  // per tokenizer, checked against index.json
  // The model's tokenizers (one per text encoder), for shards exported without ids (an
  // index.json without tokenizers): the decode workers then tokenize each caption. Shards with
  // ids never read them.
  std::vector<CaptionTokenizerSpec> caption_tokenizers;
  // Per tokenizer: token ids must lie in [0, vocab_sizes[t]) (e.g. the text encoder's
  // embedding rows); empty or 0 = only index.json's vocab_size, if it records one.
  std::vector<int64_t> vocab_sizes;
  int64_t max_image_pixels = 89478485;  // Pillow's MAX_IMAGE_PIXELS
  bool verify_sha256 = false;           // hash the shards at start (this rank's 1/world_size)
  // Batches in page-locked host memory, for non-blocking copies to a GPU. Needs CUDA.
  bool pin_memory = false;
  // Latent cache (latent_cache.hpp): index.json of it, or "" to decode the images. With a cache
  // the order and every per-pair choice stay as from the images; the batch then carries the
  // moments and text embeddings instead of pixels and token ids. Needs random_crop false.
  std::string cache_index;
  CacheExpectation cache_expected;
};

struct BadPair {
  std::string reason;  // BadPairError::reason(): undecodable_image, image_too_large, ...
  std::string shard;   // shard file as listed in index.json
  int64_t shard_index = 0;
  std::string key;
  int64_t pair_id = 0;  // as PairBatch::pair_ids
  std::string message;  // the full error: what, where, expected, actual, what to do
};

struct PairBatch {
  // [B, 3, H, W] uint8 (data::to_pm1 makes them the models' [-1, 1] floats); undefined from a
  // cache. Pinned (like the cache's tensors) with PairLoaderOptions::pin_memory.
  torch::Tensor winner, loser;
  std::vector<torch::Tensor>
      input_ids;  // per tokenizer [B, L] int64 (empty prompt ids where dropped)
  // From a latent cache only (else undefined): the VAE posterior of each image as it would have
  // been flipped, [B, 2 (mean, logvar), C, h, w] float32; the text embedding (of "" where
  // dropped) [B, L, D] and pooled [B, P] (sdxl) float32.
  torch::Tensor winner_moments, loser_moments, text_hidden, text_pooled;
  torch::Tensor caption_dropped;  // [B] bool
  // [B, 2] int64 each. SDXL add_time_ids = (orig_h, orig_w, crop_top, crop_left, res, res):
  // original size = before the resize, crop offsets in resized coordinates (before the flip).
  torch::Tensor winner_original_hw, winner_crop_tl, loser_original_hw, loser_crop_tl;
  torch::Tensor pair_ids;             // [B] int64: epoch << 32 | position in the epoch's global
                                      // order; the same pair has the same id whatever the world
                                      // size (the trainer seeds its per-pair noise with it)
  std::vector<std::string> keys;      // for per-pair logs
  std::vector<std::string> captions;  // "" where dropped
};

struct PairLoaderState {
  int64_t epoch = 0;
  int64_t pairs_consumed = 0;  // in this epoch, this rank (skipped bad pairs included)
  int64_t bad_pairs = 0;       // skipped by this rank since the start of the run
};

class PairLoader {
 public:
  explicit PairLoader(PairLoaderOptions options);
  ~PairLoader();  // joins threads, also mid-epoch
  PairLoader(const PairLoader&) = delete;
  PairLoader& operator=(const PairLoader&) = delete;

  // Blocks until the next batch is ready; wraps to the next epoch (reshuffled) at the end of
  // the data, so a batch may hold the last pairs of one epoch and the first of the next.
  PairBatch next();
  // Position after the last batch returned by next().
  PairLoaderState state() const;
  // Exact resume: the next batch equals what an uninterrupted run would have returned.
  void load_state(const PairLoaderState& state);
  // The bad pairs next() skipped since the last call, in stream order.
  std::vector<BadPair> take_bad_pairs();
  // Total time next() spent blocked waiting for workers.
  double wait_seconds() const;
  // Total CPU time the workers spent reading and decoding pairs (their demand, over wall time).
  double worker_cpu_seconds() const;

  struct Counters {
    int64_t ties_skipped = 0;   // ties left out of each epoch next() has returned pairs from
    int64_t pairs_yielded = 0;  // pairs returned by next()
    int64_t bad_pairs = 0;      // skipped since the start of the run (restored by load_state)
  };
  Counters counters() const;

  int64_t pairs_per_epoch() const;  // this rank's share of one epoch

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dde::data
