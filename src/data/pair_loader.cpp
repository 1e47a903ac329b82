#include "dde/data/pair_loader.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <fstream>
#include <initializer_list>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>

#include "dde/data/data_error.hpp"
#include "dde/data/image.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/latent_cache.hpp"
#include "dde/data/limits.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::data {
namespace {

// splitmix64 (Steele, Lea & Flood 2014): tiny, well mixed, and the same on every platform,
// unlike the distributions of <random>.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

uint64_t hash_seed(std::initializer_list<uint64_t> parts) {
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

  std::ifstream& open(const std::string& shard_path) {
    if (shard_path != path || !stream.is_open()) {
      stream.close();
      stream.clear();
      stream.open(shard_path, std::ios::binary);
      if (!stream) {
        path.clear();
        throw Error({"cannot open shard", shard_path, "", "open failed",
                     "was the file removed while training?"});
      }
      path = shard_path;
    }
    return stream;
  }
};

}  // namespace

struct PairLoader::Impl {
  PairLoaderOptions options;
  ShardIndex index;
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
  Counters counters;
  std::vector<BadPair> bad_pairs;  // skipped since the last take_bad_pairs()
  int64_t last_counted_epoch = -1;
  std::exception_ptr failure;  // sticky: next() keeps rethrowing it

  explicit Impl(PairLoaderOptions opts);
  void start(PairLoaderState from);
  void stop();
  void run_sequencer(PairLoaderState from);
  bool emit(PairTask task);
  void run_worker();
  void check_record(const PairRecord& record, const ShardInfo& shard) const;
  int64_t vocab_limit(size_t tokenizer) const;
  PairSample prepare(const PairTask& task, ShardFile& file) const;
  void open_cache();
  void read_cached(PairSample& sample, const PairTask& task, ShardFile& file, int winner_index,
                   bool flip_winner, bool flip_loser) const;
};

namespace {

void check_options(const PairLoaderOptions& o) {
  const auto bad = [](const std::string& key, const std::string& expected,
                      const std::string& actual) {
    throw Error({"bad data loader option", "PairLoaderOptions." + key, expected, actual, ""});
  };
  if (o.resolution <= 0 || o.resolution > kMaxResolution)
    bad("resolution", fmt::format("in [1, {}]", kMaxResolution), std::to_string(o.resolution));
  if (o.caption_dropout < 0.0 || o.caption_dropout > 1.0)
    bad("caption_dropout", "in [0, 1]", fmt::format("{}", o.caption_dropout));
  if (o.shuffle_buffer < 1 || o.shuffle_buffer > kMaxShuffleBuffer)
    bad("shuffle_buffer", fmt::format("in [1, {}]", kMaxShuffleBuffer),
        std::to_string(o.shuffle_buffer));
  if (o.workers < 1 || o.workers > kMaxWorkers)
    bad("workers", fmt::format("in [1, {}]", kMaxWorkers), std::to_string(o.workers));
  if (o.prefetch_batches < 1 || o.prefetch_batches > kMaxPrefetchBatches)
    bad("prefetch_batches", fmt::format("in [1, {}]", kMaxPrefetchBatches),
        std::to_string(o.prefetch_batches));
  if (o.batch_size < 1 || o.batch_size > kMaxBatchPixels)
    bad("batch_size", ">= 1", std::to_string(o.batch_size));
  if (o.max_image_pixels < 1 || o.max_image_pixels > kMaxImagePixels)
    bad("max_image_pixels", fmt::format("in [1, {}]", kMaxImagePixels),
        std::to_string(o.max_image_pixels));
  const int64_t pixels = o.resolution * o.resolution;  // <= 2^26
  if (o.batch_size > kMaxBatchPixels / pixels)
    bad("batch_size", fmt::format("batch_size x resolution^2 <= {}", kMaxBatchPixels),
        fmt::format("{} x {}^2", o.batch_size, o.resolution));
  if ((o.prefetch_batches + 1) * o.batch_size > kMaxQueuedPixels / pixels)
    bad("prefetch_batches",
        fmt::format("(prefetch_batches + 1) x batch_size x resolution^2 <= {}", kMaxQueuedPixels),
        fmt::format("({} + 1) x {} x {}^2", o.prefetch_batches, o.batch_size, o.resolution));
  if (o.world_size < 1) bad("world_size", ">= 1", std::to_string(o.world_size));
  if (o.pin_memory && !torch::cuda::is_available())
    bad("pin_memory", "a CUDA device (pinned host memory is for host->GPU copies)",
        "true, without CUDA");
  if (o.rank < 0 || o.rank >= o.world_size)
    bad("rank", fmt::format("in [0, {})", o.world_size), std::to_string(o.rank));
}

// torch::stack, into page-locked memory when `pin`: the trainer's non-blocking copy to the GPU
// then goes by DMA without a staging copy or a host wait.
torch::Tensor collate(const std::vector<torch::Tensor>& samples, bool pin) {
  if (!pin) return torch::stack(samples);
  std::vector<int64_t> shape = samples.front().sizes().vec();
  shape.insert(shape.begin(), static_cast<int64_t>(samples.size()));
  torch::Tensor out = torch::empty(
      shape, torch::TensorOptions().dtype(samples.front().dtype()).pinned_memory(true));
  return torch::stack_out(out, samples, 0);
}

}  // namespace

PairLoader::Impl::Impl(PairLoaderOptions opts) : options(std::move(opts)) {
  check_options(options);
  index = ShardIndex::load(options.index_path);

  const size_t tokenizers = index.tokenizers.size();
  if (options.expected_vocab_sha256.size() != tokenizers) {
    throw Error({"shards were tokenized with a different number of tokenizers",
                 options.index_path + ": tokenizers",
                 fmt::format("{} (from the model manifest)", options.expected_vocab_sha256.size()),
                 std::to_string(tokenizers),
                 "re-export the shards with the manifest's tokenizers (--tokenizer DIR ...)"});
  }
  for (size_t t = 0; t < tokenizers; ++t) {
    if (index.tokenizers[t].vocab_sha256 != options.expected_vocab_sha256[t]) {
      throw Error(
          {"shards were tokenized with a different vocabulary",
           fmt::format("{}: tokenizers[{}] ({})", options.index_path, t, index.tokenizers[t].name),
           "vocab_sha256 " + options.expected_vocab_sha256[t], index.tokenizers[t].vocab_sha256,
           "re-export the shards with the manifest's tokenizers (--tokenizer DIR ...)"});
    }
  }
  if (options.caption_dropout > 0.0 || !options.empty_prompt_ids.empty()) {
    if (options.empty_prompt_ids.size() != tokenizers) {
      throw Error(
          {"empty-prompt ids do not match the shards' tokenizers",
           "PairLoaderOptions.empty_prompt_ids",
           fmt::format("{} lists (one per tokenizer in {})", tokenizers, options.index_path),
           std::to_string(options.empty_prompt_ids.size()),
           "pass the manifest's empty_prompt_ids"});
    }
    for (size_t t = 0; t < tokenizers; ++t) {
      if (static_cast<int64_t>(options.empty_prompt_ids[t].size()) !=
          index.tokenizers[t].max_length) {
        throw Error({"empty-prompt ids have the wrong length",
                     fmt::format("PairLoaderOptions.empty_prompt_ids[{}]", t),
                     fmt::format("{} (max_length of {})", index.tokenizers[t].max_length,
                                 index.tokenizers[t].name),
                     std::to_string(options.empty_prompt_ids[t].size()),
                     "pass the manifest's empty_prompt_ids"});
      }
    }
  }

  if (!options.vocab_sizes.empty() && options.vocab_sizes.size() != tokenizers) {
    throw Error({"vocabulary sizes do not match the shards' tokenizers",
                 "PairLoaderOptions.vocab_sizes",
                 fmt::format("{} (tokenizers in {})", tokenizers, options.index_path),
                 std::to_string(options.vocab_sizes.size()), "pass one size per text encoder"});
  }
  for (size_t t = 0; t < options.empty_prompt_ids.size() && t < tokenizers; ++t) {
    for (const int64_t id : options.empty_prompt_ids[t]) {
      if (id < 0 || (vocab_limit(t) > 0 && id >= vocab_limit(t))) {
        throw Error({"empty-prompt id outside the vocabulary",
                     fmt::format("PairLoaderOptions.empty_prompt_ids[{}]", t),
                     fmt::format("ids in [0, {})", vocab_limit(t)), std::to_string(id),
                     "re-export the model and the shards with the same tokenizers"});
      }
    }
  }
  if (!options.cache_index.empty()) open_cache();
  const ShardCheckReport checked =
      check_shards(index, options.verify_sha256, options.rank, options.world_size);
  log::info("data: checked {} shards against {} ({} pairs in the tar headers{})", checked.shards,
            options.index_path, checked.pairs,
            options.verify_sha256 ? fmt::format(", sha256 of {} bytes", checked.bytes_hashed)
                                  : std::string(", sha256 not verified (data.verify: false)"));

  epoch_ties = options.keep_ties ? 0 : index.total_ties();
  epoch_pairs = index.total_pairs() - epoch_ties;
  share = epoch_pairs / options.world_size;
  if (share == 0) {
    throw Error({"not enough pairs for every rank", options.index_path,
                 fmt::format(">= {} pairs (world size)", options.world_size),
                 std::to_string(epoch_pairs), "export more data or train on fewer ranks"});
  }
  window = options.prefetch_batches * options.batch_size;
  log::info("data: {} shards, {} pairs per epoch ({} ties {}), rank {}/{} reads {} per epoch",
            index.shards.size(), epoch_pairs, options.keep_ties ? index.total_ties() : epoch_ties,
            options.keep_ties ? "kept" : "dropped", options.rank, options.world_size, share);
}

void PairLoader::Impl::start(PairLoaderState from) {
  stopping = false;
  try {
    sequencer = std::thread([this, from] { run_sequencer(from); });
    for (int64_t w = 0; w < options.workers; ++w) {
      workers.emplace_back([this] { run_worker(); });
    }
  } catch (const std::system_error& e) {
    const size_t started = workers.size();
    stop();
    throw Error({"cannot start data loader threads", "data.workers",
                 fmt::format("1 sequencer + {} worker threads", options.workers),
                 fmt::format("{} workers started, then: {}", started, e.what()),
                 "lower data.workers, or raise the process/thread limit (ulimit -u, the "
                 "container's pids limit)"});
  }
}

void PairLoader::Impl::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex);
    stopping = true;
  }
  sequencer_cv.notify_all();
  worker_cv.notify_all();
  consumer_cv.notify_all();
  if (sequencer.joinable()) {
    sequencer.join();
  }
  for (std::thread& worker : workers) {
    worker.join();
  }
  workers.clear();
  tasks.clear();
  done.clear();
  produced = consumed = 0;
  sequencer_error = nullptr;
}

int64_t PairLoader::Impl::vocab_limit(size_t tokenizer) const {
  int64_t limit = index.tokenizers[tokenizer].vocab_size;
  if (tokenizer < options.vocab_sizes.size() && options.vocab_sizes[tokenizer] > 0) {
    limit = limit > 0 ? std::min(limit, options.vocab_sizes[tokenizer])
                      : options.vocab_sizes[tokenizer];
  }
  return limit;
}

// The pair's token ids against the tokenizers of index.json (and the text encoders'
// vocabularies): a bad list skips the pair instead of failing inside the text encoder.
void PairLoader::Impl::check_record(const PairRecord& record, const ShardInfo& shard) const {
  const std::string where = fmt::format("{}: key {}", shard.path, escape_preview(record.key, 100));
  if (record.input_ids.size() != index.tokenizers.size()) {
    throw BadPairError("bad_input_ids",
                       {"pair has the wrong number of input_ids lists", where,
                        fmt::format("{} (tokenizers in {})", index.tokenizers.size(), index.path),
                        std::to_string(record.input_ids.size()), kReexportHint});
  }
  for (size_t t = 0; t < record.input_ids.size(); ++t) {
    const std::vector<int64_t>& ids = record.input_ids[t];
    if (static_cast<int64_t>(ids.size()) != index.tokenizers[t].max_length) {
      throw BadPairError(
          "bad_input_ids",
          {"pair has input_ids of the wrong length", fmt::format("{}: input_ids[{}]", where, t),
           fmt::format("{} (max_length of {})", index.tokenizers[t].max_length,
                       index.tokenizers[t].name),
           std::to_string(ids.size()), kReexportHint});
    }
    const int64_t limit = vocab_limit(t);
    for (size_t j = 0; j < ids.size(); ++j) {
      if (ids[j] < 0 || (limit > 0 && ids[j] >= limit)) {
        throw BadPairError("token_id_out_of_range",
                           {"token id outside the text encoder's vocabulary",
                            fmt::format("{}: input_ids[{}][{}]", where, t, j),
                            limit > 0 ? fmt::format("an id in [0, {}) (vocabulary of {})", limit,
                                                    index.tokenizers[t].name)
                                      : std::string("an id >= 0"),
                            std::to_string(ids[j]),
                            "the shard was tokenized with another tokenizer or is corrupt: " +
                                std::string(kReexportHint)});
      }
    }
  }
}

// The ordering of docs in pair_loader.hpp; emits this rank's pairs from `from` on, forever.
void PairLoader::Impl::run_sequencer(PairLoaderState from) {
  try {
    const int64_t world = options.world_size;
    const int64_t limit = share * world;  // global pairs used per epoch
    const size_t capacity =
        static_cast<size_t>(std::min<int64_t>(options.shuffle_buffer, epoch_pairs));
    int64_t skip = from.pairs_consumed;
    for (int64_t epoch = from.epoch;; ++epoch, skip = 0) {
      const uint64_t seed = options.seed, e = static_cast<uint64_t>(epoch);
      std::vector<size_t> order(index.shards.size());
      std::iota(order.begin(), order.end(), 0);
      Rng shard_rng(hash_seed({seed, e, kShardOrder}));
      for (size_t i = order.size(); i > 1; --i) {
        std::swap(order[i - 1], order[shard_rng.below(i)]);
      }

      Rng buffer_rng(hash_seed({seed, e, kShuffleBuffer}));
      std::vector<std::pair<size_t, PairRecord>> buffer;
      buffer.reserve(capacity);
      int64_t global = 0;
      const auto route = [&](std::pair<size_t, PairRecord>&& item) {
        const int64_t i = global++;
        if (i >= limit || i % world != options.rank || i / world < skip) {
          return true;
        }
        return emit(PairTask{0, epoch, i / world, i, item.first, std::move(item.second)});
      };

      for (const size_t s : order) {
        const ShardInfo& shard = index.shards[s];
        ShardPairReader reader(shard.path, ShardPairReader::Images::kSkip);
        int64_t ties = 0, unreadable = 0;  // unreadable: bad metadata, tie or not unknown
        while (std::optional<PairRecord> record = reader.next()) {
          if (stopping) {
            return;
          }
          unreadable += record->problem ? 1 : 0;
          if (!record->problem && record->is_tie()) {
            ++ties;
            if (!options.keep_ties) {
              continue;
            }
          }
          if (buffer.size() < capacity) {
            buffer.emplace_back(s, std::move(*record));
            continue;
          }
          std::pair<size_t, PairRecord> item(s, std::move(*record));
          std::swap(item, buffer[buffer_rng.below(capacity)]);
          if (!route(std::move(item))) {
            return;
          }
        }
        if (reader.pairs_read() != shard.pairs || ties > shard.ties ||
            ties + unreadable < shard.ties) {
          throw Error({"shard does not match index.json", shard.path,
                       fmt::format("{} pairs, {} ties (index.json)", shard.pairs, shard.ties),
                       fmt::format("{} pairs, {} ties", reader.pairs_read(), ties), kReexportHint});
        }
      }
      while (!buffer.empty()) {
        std::swap(buffer[buffer_rng.below(buffer.size())], buffer.back());
        std::pair<size_t, PairRecord> item = std::move(buffer.back());
        buffer.pop_back();
        if (!route(std::move(item))) {
          return;
        }
      }
    }
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      sequencer_error = std::current_exception();
    }
    consumer_cv.notify_all();
  }
}

bool PairLoader::Impl::emit(PairTask task) {
  std::unique_lock<std::mutex> lock(mutex);
  sequencer_cv.wait(lock, [&] { return stopping || produced < consumed + window; });
  if (stopping) {
    return false;
  }
  task.position = produced++;
  tasks.push_back(std::move(task));
  worker_cv.notify_one();
  return true;
}

void PairLoader::Impl::run_worker() {
  ShardFile file;
  for (;;) {
    PairTask task;
    {
      std::unique_lock<std::mutex> lock(mutex);
      worker_cv.wait(lock, [&] { return stopping || !tasks.empty(); });
      if (stopping) {
        return;
      }
      task = std::move(tasks.front());
      tasks.pop_front();
    }
    PairSample sample;
    try {
      sample = prepare(task, file);
    } catch (const BadPairError& e) {
      const ShardInfo& shard = index.shards[task.shard];
      sample.bad = BadPair{e.reason(),
                           shard.file,
                           static_cast<int64_t>(task.shard),
                           task.record.key,
                           (task.epoch << 32) | task.global_index,
                           e.what()};
    } catch (...) {
      sample.error = std::current_exception();
    }
    sample.epoch = task.epoch;
    sample.local_index = task.local_index;
    sample.global_index = task.global_index;
    {
      std::lock_guard<std::mutex> lock(mutex);
      done.emplace(task.position, std::move(sample));
    }
    consumer_cv.notify_all();
  }
}

void PairLoader::Impl::open_cache() {
  if (options.random_crop) {
    throw Error({"random crop with a latent cache",
                 "PairLoaderOptions.random_crop (data.random_crop)",
                 "false: the cache holds center crops", "true",
                 "set data.random_crop: false, or train from the images"});
  }
  cache = LatentCacheIndex::load(options.cache_index);
  check_latent_cache(*cache, index, options.cache_expected);
  for (size_t s = 0; s < cache->shards.size(); ++s) cache_shards.emplace_back(*cache, s);
  empty_caption = load_empty_caption(*cache);
  log::info("data: latent cache {} ({} shards, {} bytes per pair, stored as {})",
            options.cache_index, cache->shards.size(), cache->bytes_per_pair, cache->dtype);
}

// The pair's rows of the cache in place of its decoded images and encoded caption. A pair the
// encoder found bad is decoded from its images, to fail (and be skipped) as it would there.
void PairLoader::Impl::read_cached(PairSample& sample, const PairTask& task, ShardFile& file,
                                   int winner_index, bool flip_winner, bool flip_loser) const {
  const PairRecord& record = task.record;
  const LatentCacheShard& shard = cache_shards[task.shard];
  const CachedPair p = shard.read(file.open(shard.path()), record.position, record.key);
  if (!p.ok) {
    const ShardInfo& source = index.shards[task.shard];
    const ImagePrepOptions prep{options.resolution, false, false, options.max_image_pixels};
    // Winner first, as from the images, so the same error names the pair.
    for (const int which : {winner_index, 1 - winner_index}) {
      const MemberSpan& span = which == 0 ? record.jpg_0_span : record.jpg_1_span;
      prepare_training_image(
          read_file_range(file.open(source.path), source.path, span.offset, span.size),
          fmt::format("{}: key {}, at offset {}", source.path, escape_preview(record.key, 100),
                      span.offset),
          prep, false, 0, 0);
    }
    throw Error({"latent cache marks a pair bad whose images decode",
                 fmt::format("{}: row {}", shard.path(), record.position), "a bad pair",
                 "images that decode at data.max_image_pixels = " +
                     std::to_string(options.max_image_pixels),
                 "rebuild the cache with the training config's data.max_image_pixels"});
  }
  // NaN or Inf in the cache (a bad encode, a flipped bit) is a bad pair, named by its cache
  // row, not a "non-finite loss" steps later. One reduction over the pair's rows.
  std::vector<torch::Tensor> rows{p.moments.flatten(), p.text.flatten()};
  if (p.pooled.defined()) rows.push_back(p.pooled.flatten());
  if (!torch::isfinite(torch::cat(rows)).all().item<bool>()) {
    throw BadPairError("cache_non_finite",
                       {"non-finite values in the latent cache",
                        fmt::format("{}: row {}, key {}", shard.path(), record.position,
                                    escape_preview(record.key, 100)),
                        "finite posterior moments and caption embeddings", "NaN or Inf",
                        "re-encode the cache (dde_encode_cache); the pair is skipped and counted"});
  }
  const auto side = [&](int which, bool flip, CroppedImage& geometry) {
    const auto g = p.geometry.accessor<int64_t, 2>();
    geometry.original_h = g[which][0];
    geometry.original_w = g[which][1];
    geometry.crop_top = g[which][2];
    geometry.crop_left = g[which][3];
    return p.moments[which][options.random_flip && flip ? 1 : 0];
  };
  sample.winner_moments = side(winner_index, flip_winner, sample.winner);
  sample.loser_moments = side(1 - winner_index, flip_loser, sample.loser);
  sample.text = sample.caption_dropped ? empty_caption.text : p.text;
  sample.pooled = sample.caption_dropped ? empty_caption.pooled : p.pooled;
}

PairSample PairLoader::Impl::prepare(const PairTask& task, ShardFile& file) const {
  const PairRecord& record = task.record;
  const ShardInfo& shard = index.shards[task.shard];
  if (record.problem) {
    throw *record.problem;
  }
  check_record(record, shard);

  // Fixed draw order, whatever the options, so a pair's choices never shift.
  Rng rng(hash_seed({options.seed, static_cast<uint64_t>(task.epoch), kPairChoices,
                     static_cast<uint64_t>(task.global_index)}));
  const bool dropped = rng.uniform() < options.caption_dropout;
  const bool flip_winner = rng.uniform() < 0.5;
  const bool flip_loser = rng.uniform() < 0.5;
  const uint64_t winner_y = rng.next(), winner_x = rng.next();
  const uint64_t loser_y = rng.next(), loser_x = rng.next();

  // label_0 == 1: image 0 wins; label_0 == 0: image 1 wins; a kept tie keeps the shard order.
  const int winner_index = record.label_0 == 0.0 ? 1 : 0;
  const auto load = [&](int which, bool flip, uint64_t crop_y, uint64_t crop_x) {
    const MemberSpan& span = which == 0 ? record.jpg_0_span : record.jpg_1_span;
    const std::string where = fmt::format("{}: key {}, member {}.{}.jpg at offset {}", shard.path,
                                          escape_preview(record.key, 100),
                                          escape_preview(record.key, 100), which, span.offset);
    const ImagePrepOptions prep{options.resolution, options.random_crop, options.random_flip,
                                options.max_image_pixels};
    return prepare_training_image(
        read_file_range(file.open(shard.path), shard.path, span.offset, span.size), where, prep,
        flip, crop_y, crop_x);
  };

  PairSample sample;
  sample.caption_dropped = dropped;
  if (cache) {
    read_cached(sample, task, file, winner_index, flip_winner, flip_loser);
  } else {
    sample.winner = load(winner_index, flip_winner, winner_y, winner_x);
    sample.loser = load(1 - winner_index, flip_loser, loser_y, loser_x);
  }
  sample.key = record.key;
  if (dropped) {
    sample.input_ids = &options.empty_prompt_ids;
  } else {
    sample.record_ids = record.input_ids;
    sample.caption = record.caption;
  }
  return sample;
}

PairLoader::PairLoader(PairLoaderOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->start(PairLoaderState{});
}

PairLoader::~PairLoader() { impl_->stop(); }

PairBatch PairLoader::next() {
  Impl& d = *impl_;
  if (d.failure) {
    std::rethrow_exception(d.failure);
  }
  const int64_t batch = d.options.batch_size;
  std::vector<PairSample> samples;
  samples.reserve(static_cast<size_t>(batch));
  try {
    std::unique_lock<std::mutex> lock(d.mutex);
    int64_t skipped_in_row = 0;
    while (static_cast<int64_t>(samples.size()) < batch) {
      const int64_t pos = d.consumed;
      const auto ready = [&] {
        return d.done.count(pos) > 0 || (d.sequencer_error && d.produced <= pos);
      };
      if (!ready()) {
        const auto begin = std::chrono::steady_clock::now();
        d.consumer_cv.wait(lock, ready);
        d.wait_seconds +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
      }
      const auto it = d.done.find(pos);
      if (it == d.done.end()) {
        std::rethrow_exception(d.sequencer_error);
      }
      PairSample sample = std::move(it->second);
      d.done.erase(it);
      ++d.consumed;
      d.sequencer_cv.notify_one();
      if (sample.error) {
        std::rethrow_exception(sample.error);
      }
      if (sample.bad) {
        // Skipped: its place in the order is consumed, so a resume skips it again.
        d.position = sample.local_index + 1 == d.share
                         ? PairLoaderState{sample.epoch + 1, 0, 0}
                         : PairLoaderState{sample.epoch, sample.local_index + 1, 0};
        ++d.counters.bad_pairs;
        log::warn("data: skipped bad pair ({}): {}", sample.bad->reason, sample.bad->message);
        d.bad_pairs.push_back(std::move(*sample.bad));
        if (++skipped_in_row >= d.share) {
          throw Error({"every pair of an epoch is bad", d.options.index_path,
                       fmt::format("at most {} bad pairs in a row (this rank's epoch)", d.share),
                       std::to_string(skipped_in_row),
                       "the data cannot be trained on: check the export (see the skipped pairs "
                       "in the log)"});
        }
        continue;
      }
      skipped_in_row = 0;
      samples.push_back(std::move(sample));
    }
    for (const PairSample& sample : samples) {
      if (sample.epoch > d.last_counted_epoch) {
        d.counters.ties_skipped += d.epoch_ties;
        d.last_counted_epoch = sample.epoch;
      }
    }
    d.counters.pairs_yielded += batch;
    const PairSample& last = samples.back();
    d.position = last.local_index + 1 == d.share
                     ? PairLoaderState{last.epoch + 1, 0, 0}
                     : PairLoaderState{last.epoch, last.local_index + 1, 0};
  } catch (...) {
    d.failure = std::current_exception();
    throw;
  }

  PairBatch out;
  std::vector<torch::Tensor> winners, losers, texts, pooled;
  out.caption_dropped = torch::empty({batch}, torch::kBool);
  out.winner_original_hw = torch::empty({batch, 2}, torch::kInt64);
  out.winner_crop_tl = torch::empty({batch, 2}, torch::kInt64);
  out.loser_original_hw = torch::empty({batch, 2}, torch::kInt64);
  out.loser_crop_tl = torch::empty({batch, 2}, torch::kInt64);
  out.pair_ids = torch::empty({batch}, torch::kInt64);
  auto pair_ids = out.pair_ids.accessor<int64_t, 1>();
  auto dropped = out.caption_dropped.accessor<bool, 1>();
  auto winner_hw = out.winner_original_hw.accessor<int64_t, 2>();
  auto winner_tl = out.winner_crop_tl.accessor<int64_t, 2>();
  auto loser_hw = out.loser_original_hw.accessor<int64_t, 2>();
  auto loser_tl = out.loser_crop_tl.accessor<int64_t, 2>();
  for (const TokenizerInfo& tokenizer : d.index.tokenizers) {
    out.input_ids.push_back(torch::empty({batch, tokenizer.max_length}, torch::kInt64));
  }
  for (int64_t b = 0; b < batch; ++b) {
    PairSample& s = samples[static_cast<size_t>(b)];
    winners.push_back(d.cache ? s.winner_moments : s.winner.pixels);
    losers.push_back(d.cache ? s.loser_moments : s.loser.pixels);
    if (d.cache) texts.push_back(s.text);
    if (s.pooled.defined()) pooled.push_back(s.pooled);
    pair_ids[b] = (s.epoch << 32) | s.global_index;
    dropped[b] = s.caption_dropped;
    winner_hw[b][0] = s.winner.original_h;
    winner_hw[b][1] = s.winner.original_w;
    winner_tl[b][0] = s.winner.crop_top;
    winner_tl[b][1] = s.winner.crop_left;
    loser_hw[b][0] = s.loser.original_h;
    loser_hw[b][1] = s.loser.original_w;
    loser_tl[b][0] = s.loser.crop_top;
    loser_tl[b][1] = s.loser.crop_left;
    const std::vector<std::vector<int64_t>>& ids = s.input_ids ? *s.input_ids : s.record_ids;
    for (size_t t = 0; t < out.input_ids.size(); ++t) {
      std::copy(ids[t].begin(), ids[t].end(), out.input_ids[t][b].data_ptr<int64_t>());
    }
    out.keys.push_back(std::move(s.key));
    out.captions.push_back(std::move(s.caption));
  }
  const bool pin = d.options.pin_memory;
  (d.cache ? out.winner_moments : out.winner) = collate(winners, pin);
  (d.cache ? out.loser_moments : out.loser) = collate(losers, pin);
  if (d.cache) out.text_hidden = collate(texts, pin);
  if (!pooled.empty()) out.text_pooled = collate(pooled, pin);
  return out;
}

PairLoaderState PairLoader::state() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  PairLoaderState state = impl_->position;
  state.bad_pairs = impl_->counters.bad_pairs;
  return state;
}

std::vector<BadPair> PairLoader::take_bad_pairs() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  std::vector<BadPair> out;
  out.swap(impl_->bad_pairs);
  return out;
}

void PairLoader::load_state(const PairLoaderState& state) {
  Impl& d = *impl_;
  if (state.epoch < 0 || state.pairs_consumed < 0 || state.pairs_consumed > d.share ||
      state.bad_pairs < 0) {
    throw Error(
        {"bad data loader state", "PairLoaderState",
         fmt::format("epoch >= 0 and pairs_consumed in [0, {}] (pairs per epoch of this rank)",
                     d.share),
         fmt::format("epoch={} pairs_consumed={} bad_pairs={}", state.epoch, state.pairs_consumed,
                     state.bad_pairs),
         "resume with the shards, seed, keep_ties and world size of the run that saved it"});
  }
  const PairLoaderState from =
      state.pairs_consumed == d.share ? PairLoaderState{state.epoch + 1, 0, 0} : state;
  d.stop();
  {
    std::lock_guard<std::mutex> lock(d.mutex);
    d.position = from;
    d.last_counted_epoch = from.epoch - 1;
    d.failure = nullptr;
    d.counters.bad_pairs = state.bad_pairs;
    d.bad_pairs.clear();
  }
  d.start(from);
}

double PairLoader::wait_seconds() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->wait_seconds;
}

PairLoader::Counters PairLoader::counters() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->counters;
}

int64_t PairLoader::pairs_per_epoch() const { return impl_->share; }

}  // namespace dde::data
