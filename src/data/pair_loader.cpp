// The pair loader's start-up (options, tokenizers, cache, shards) and its threads. The other
// seams: pair_loader_read.cpp, pair_loader_decode.cpp, pair_loader_batch.cpp,
// pair_loader_state.cpp (pair_loader_impl.hpp lists them).
#include "dde/data/pair_loader.hpp"

#include <fmt/format.h>

#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "dde/data/limits.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"
#include "pair_loader_impl.hpp"

namespace dde::data {
namespace {

void check_loader_options(const PairLoaderOptions& o) {
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

}  // namespace

PairLoader::Impl::Impl(PairLoaderOptions opts) : options(std::move(opts)) {
  check_loader_options(options);
  index = ShardIndex::load(options.index_path);
  adopt_caption_tokenizer();
  check_tokenizers();
  check_empty_prompt_ids();
  check_vocab_sizes();
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

// Shards exported without ids: the model's tokenizers stand in for the ones index.json would
// name, and the decode workers tokenize every caption (docs/formats.md section 2).
void PairLoader::Impl::adopt_caption_tokenizer() {
  if (!index.tokenizers.empty()) return;
  if (options.caption_tokenizers.empty()) {
    throw Error({"the shards hold captions without token ids, and no tokenizer is given",
                 options.index_path + ": tokenizers", "the model's tokenizers", "none",
                 "export the model with python -m dde_tools.export_models (it copies its "
                 "tokenizer folders), or the shards with --tokenizer"});
  }
  caption_tokenizer = std::make_unique<CaptionTokenizer>(options.caption_tokenizers);
  index.tokenizers = caption_tokenizer->infos();
  log::info(
      "data: {} holds captions only: the decode workers tokenize them with the model's {} "
      "tokenizer(s)",
      options.index_path, index.tokenizers.size());
}

// The shards' tokenizers against the model manifest's (expected_vocab_sha256).
void PairLoader::Impl::check_tokenizers() const {
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
}

// One list per tokenizer, of its max_length, where captions may be dropped (or lists are given).
void PairLoader::Impl::check_empty_prompt_ids() const {
  const bool needed = options.caption_dropout > 0.0 || !options.empty_prompt_ids.empty();
  if (!needed) return;
  const size_t tokenizers = index.tokenizers.size();
  if (options.empty_prompt_ids.size() != tokenizers) {
    throw Error({"empty-prompt ids do not match the shards' tokenizers",
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

// One vocabulary size per tokenizer (or none); the empty-prompt ids inside the vocabularies.
void PairLoader::Impl::check_vocab_sizes() const {
  const size_t tokenizers = index.tokenizers.size();
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

PairLoader::PairLoader(PairLoaderOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->start(PairLoaderState{});
}

PairLoader::~PairLoader() { impl_->stop(); }

}  // namespace dde::data
