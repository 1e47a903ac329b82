// Private to the pair loader's sources: the state PairLoader::Impl shares between its seams.
// pair_loader.cpp (options, start-up checks, threads), pair_loader_read.cpp (the ordering:
// shard order, shuffle buffer, routing to ranks), pair_loader_decode.cpp (the workers: per-pair
// choices, images or cache rows), pair_loader_batch.cpp (next(): samples in order, collation),
// pair_loader_state.cpp (the position: state, load_state, counters).
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <fstream>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dde/data/image_tensor.hpp"
#include "dde/data/latent_cache.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"

namespace dde::data::pair_loader_detail {

// splitmix64 (Steele, Lea & Flood 2014): tiny, well mixed, and the same on every platform,
// unlike the distributions of <random>.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline uint64_t hash_seed(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x243F6A8885A308D3ULL;
  for (const uint64_t part : parts) {
    h = splitmix64(h ^ part);
  }
  return h;
}

// Independent random streams derived from (seed, epoch, ...).
enum Stream : uint64_t { kShardOrder = 1, kShuffleBuffer = 2, kPairChoices = 3 };

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    state_ += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), unbiased (rejection of the short top range).
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) {
        return r % n;
      }
    }
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)

 private:
  uint64_t state_;
};

struct PairTask {
  int64_t position = 0;  // in the output stream since the last (re)start
  int64_t epoch = 0, local_index = 0, global_index = 0;
  size_t shard = 0;
  PairRecord record;  // without image bytes: spans only
};

struct PairSample {
  int64_t epoch = 0, local_index = 0, global_index = 0;
  std::exception_ptr error;                     // fatal
  std::optional<BadPair> bad;                   // skipped by next()
  CroppedImage winner, loser;                   // from a cache: geometry only, no pixels
  torch::Tensor winner_moments, loser_moments;  // cache: [2 (mean, logvar), C, h, w]
  torch::Tensor text, pooled;                   // cache: [L, D], [P] (of "" where dropped)
  bool caption_dropped = false;
  const std::vector<std::vector<int64_t>>* input_ids = nullptr;  // record's or the empty prompt's
  std::vector<std::vector<int64_t>> record_ids;
  std::string key, caption;
};

// One open shard file per worker, reopened when the worker moves to another shard.
struct ShardFile {
  std::string path;
  std::ifstream stream;

  std::ifstream& open(const std::string& shard_path);
};

// The random choices of one pair, drawn in a fixed order (pair_loader.hpp).
struct PairChoices {
  bool caption_dropped = false;
  bool flip_winner = false, flip_loser = false;
  uint64_t winner_y = 0, winner_x = 0, loser_y = 0, loser_x = 0;
};

// A shard's pair on its way through the shuffle buffer: (shard index, record).
using ShardPair = std::pair<size_t, PairRecord>;

}  // namespace dde::data::pair_loader_detail

namespace dde::data {

struct PairLoader::Impl {
  using PairTask = pair_loader_detail::PairTask;
  using PairSample = pair_loader_detail::PairSample;
  using ShardFile = pair_loader_detail::ShardFile;
  using PairChoices = pair_loader_detail::PairChoices;
  using ShardPair = pair_loader_detail::ShardPair;

  PairLoaderOptions options;
  ShardIndex index;
  // Caption-only shards: the model's tokenizers, whose infos index.tokenizers then holds.
  std::unique_ptr<CaptionTokenizer> caption_tokenizer;
  // With options.cache_index: the cache, a reader per shard, and the embedding of "".
  std::optional<LatentCacheIndex> cache;
  std::vector<LatentCacheShard> cache_shards;
  EmptyCaption empty_caption;
  int64_t epoch_pairs = 0;  // pairs of one epoch, all ranks (ties dropped unless keep_ties)
  int64_t epoch_ties = 0;   // ties left out of one epoch
  int64_t share = 0;        // pairs of one epoch for each rank
  int64_t window = 0;       // pairs in flight ahead of next()

  // Pipeline, guarded by mutex.
  mutable std::mutex mutex;
  std::condition_variable sequencer_cv, worker_cv, consumer_cv;
  std::deque<PairTask> tasks;
  std::map<int64_t, PairSample> done;
  int64_t produced = 0;  // positions handed out by the sequencer
  int64_t consumed = 0;  // positions taken by next()
  std::atomic<bool> stopping{false};
  std::exception_ptr sequencer_error;
  std::thread sequencer;
  std::vector<std::thread> workers;

  // Consumer side (also guarded by mutex for the const accessors).
  PairLoaderState position;
  double wait_seconds = 0.0;
  double worker_cpu_seconds = 0.0;  // the workers' CPU time in prepare() (util/thread_tuner.hpp)
  Counters counters;
  std::vector<BadPair> bad_pairs;  // skipped since the last take_bad_pairs()
  int64_t last_counted_epoch = -1;
  std::exception_ptr failure;  // sticky: next() keeps rethrowing it

  // Start-up and threads (pair_loader.cpp).
  explicit Impl(PairLoaderOptions opts);
  void adopt_caption_tokenizer();
  void check_tokenizers() const;
  void check_empty_prompt_ids() const;
  void check_vocab_sizes() const;
  void open_cache();
  void start(PairLoaderState from);
  void stop();

  // Reading: the ordering (pair_loader_read.cpp).
  class EpochSequencer;  // one epoch of the ordering
  void run_sequencer(PairLoaderState from);
  bool emit(PairTask task);

  // Decoding (pair_loader_decode.cpp).
  void run_worker();
  int64_t vocab_limit(size_t tokenizer) const;
  void check_record(const PairRecord& record, const std::vector<std::vector<int64_t>>& ids,
                    const ShardInfo& shard) const;
  PairChoices draw_choices(const PairTask& task) const;
  PairSample prepare(const PairTask& task, ShardFile& file) const;
  [[noreturn]] void fail_cached_bad_pair(const PairTask& task, ShardFile& file,
                                         int winner_index) const;
  void read_cached(PairSample& sample, const PairTask& task, ShardFile& file, int winner_index,
                   bool flip_winner, bool flip_loser) const;

  // Batching (pair_loader_batch.cpp).
  std::vector<PairSample> take_samples();
  PairSample take_sample(std::unique_lock<std::mutex>& lock);
  PairBatch assemble(std::vector<PairSample>& samples) const;

  // Position (pair_loader_state.cpp).
  PairLoaderState position_after(const PairSample& sample) const;
  void skip_bad(PairSample& sample, int64_t skipped_in_row);
  void count_returned(const std::vector<PairSample>& samples);
};

}  // namespace dde::data
