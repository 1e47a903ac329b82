// Decoding: the workers. Each takes the next task of the ordering, draws the pair's random
// choices from its own seeded RNG and reads its images (or its latent cache rows), so the
// result does not depend on which worker ran it or when.
#include <fmt/format.h>
#include <time.h>

#include <algorithm>
#include <exception>
#include <fstream>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "dde/data/data_error.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/latent_cache.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/data/tar_reader.hpp"
#include "dde/util/error.hpp"
#include "dde/util/threads.hpp"
#include "pair_loader_impl.hpp"

namespace dde::data {

namespace pair_loader_detail {

std::ifstream& ShardFile::open(const std::string& shard_path) {
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

}  // namespace pair_loader_detail

namespace {
// The calling thread's CPU time (Linux: per thread), 0 where the clock is missing.
double thread_cpu_seconds() {
  timespec now{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) != 0) return 0.0;
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}
}  // namespace

void PairLoader::Impl::run_worker() {
  util::lower_this_thread_priority(options.worker_nice);  // best effort
  util::serial_operators_in_this_thread();  // no OpenMP team of its own (util/threads.hpp)
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
    const double cpu_before = thread_cpu_seconds();
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
    const double cpu = thread_cpu_seconds() - cpu_before;
    {
      std::lock_guard<std::mutex> lock(mutex);
      done.emplace(task.position, std::move(sample));
      worker_cpu_seconds += cpu;
    }
    consumer_cv.notify_all();
  }
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
void PairLoader::Impl::check_record(const PairRecord& record,
                                    const std::vector<std::vector<int64_t>>& input_ids,
                                    const ShardInfo& shard) const {
  const std::string where = fmt::format("{}: key {}", shard.path, escape_preview(record.key, 100));
  if (input_ids.size() != index.tokenizers.size()) {
    throw BadPairError("bad_input_ids",
                       {"pair has the wrong number of input_ids lists", where,
                        fmt::format("{} (tokenizers in {})", index.tokenizers.size(), index.path),
                        std::to_string(input_ids.size()), kReexportHint});
  }
  for (size_t t = 0; t < input_ids.size(); ++t) {
    const std::vector<int64_t>& ids = input_ids[t];
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

// Fixed draw order, whatever the options, so a pair's choices never shift.
PairLoader::Impl::PairChoices PairLoader::Impl::draw_choices(const PairTask& task) const {
  pair_loader_detail::Rng rng(pair_loader_detail::hash_seed(
      {options.seed, static_cast<uint64_t>(task.epoch), pair_loader_detail::kPairChoices,
       static_cast<uint64_t>(task.global_index)}));
  PairChoices c;
  c.caption_dropped = rng.uniform() < options.caption_dropout;
  c.flip_winner = rng.uniform() < 0.5;
  c.flip_loser = rng.uniform() < 0.5;
  c.winner_y = rng.next();
  c.winner_x = rng.next();
  c.loser_y = rng.next();
  c.loser_x = rng.next();
  return c;
}

PairLoader::Impl::PairSample PairLoader::Impl::prepare(const PairTask& task,
                                                       ShardFile& file) const {
  const PairRecord& record = task.record;
  const ShardInfo& shard = index.shards[task.shard];
  if (record.problem) {
    throw *record.problem;
  }
  // Ids from the shard when it has them; from the caption for caption-only shards.
  std::vector<std::vector<int64_t>> tokenized;
  if (caption_tokenizer && record.input_ids.empty()) {
    tokenize_record_caption(*caption_tokenizer, record.caption,
                            fmt::format("{}: key {}", shard.path, escape_preview(record.key, 100)),
                            tokenized);
  }
  const std::vector<std::vector<int64_t>>& input_ids =
      caption_tokenizer && record.input_ids.empty() ? tokenized : record.input_ids;
  check_record(record, input_ids, shard);
  const PairChoices c = draw_choices(task);

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
  sample.caption_dropped = c.caption_dropped;
  if (cache) {
    read_cached(sample, task, file, winner_index, c.flip_winner, c.flip_loser);
  } else {
    sample.winner = load(winner_index, c.flip_winner, c.winner_y, c.winner_x);
    sample.loser = load(1 - winner_index, c.flip_loser, c.loser_y, c.loser_x);
  }
  sample.key = record.key;
  if (c.caption_dropped) {
    sample.input_ids = &options.empty_prompt_ids;
  } else {
    sample.record_ids = input_ids;
    sample.caption = record.caption;
  }
  return sample;
}

// A pair the encoder found bad: decoded from its images, to fail (and be skipped) as it would
// there. Images that decode mean the cache and the training config disagree.
void PairLoader::Impl::fail_cached_bad_pair(const PairTask& task, ShardFile& file,
                                            int winner_index) const {
  const PairRecord& record = task.record;
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
  throw Error(
      {"latent cache marks a pair bad whose images decode",
       fmt::format("{}: row {}", cache_shards[task.shard].path(), record.position), "a bad pair",
       "images that decode at data.max_image_pixels = " + std::to_string(options.max_image_pixels),
       "rebuild the cache with the training config's data.max_image_pixels"});
}

// The pair's rows of the cache in place of its decoded images and encoded caption.
void PairLoader::Impl::read_cached(PairSample& sample, const PairTask& task, ShardFile& file,
                                   int winner_index, bool flip_winner, bool flip_loser) const {
  const PairRecord& record = task.record;
  const LatentCacheShard& shard = cache_shards[task.shard];
  const CachedPair p = shard.read(file.open(shard.path()), record.position, record.key);
  if (!p.ok) {
    fail_cached_bad_pair(task, file, winner_index);
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

}  // namespace dde::data
