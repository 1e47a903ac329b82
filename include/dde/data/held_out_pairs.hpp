// The pairs of a held-out shard export (config data.eval_index), read for evaluation: every
// non-tie pair in file order (shards in index.json order, pairs in shard order), preprocessed
// without augmentation (shorter side resized to the resolution, center crop, no flip, caption
// kept). Pair i (0-based among the non-tie pairs) has id i and belongs to rank i % world_size, so
// the ids and the shares are fixed by the export alone: not by a seed, a shuffle or a resume.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dde/data/pair_loader.hpp"

namespace dde::data {

struct HeldOutOptions {
  std::string index_path;
  int64_t resolution = 512;
  int64_t rank = 0, world_size = 1;
  std::vector<std::string> expected_vocab_sha256;  // per tokenizer, checked against index.json
  // The model's tokenizers, for held-out shards exported without ids (as PairLoaderOptions).
  std::vector<CaptionTokenizerSpec> caption_tokenizers;
  // Pairs that fail the training set's checks (an image that does not decode, token ids outside
  // index.json's vocabulary) are left out and counted; more than this many (this rank's) is an
  // error (config eval.max_bad_pairs).
  int64_t max_bad_pairs = 10;
};

class HeldOutPairs {
 public:
  // Loads and checks index.json (tokenizers against expected_vocab_sha256). Throws dde::Error.
  explicit HeldOutPairs(HeldOutOptions options);
  ~HeldOutPairs();
  HeldOutPairs(const HeldOutPairs&) = delete;
  HeldOutPairs& operator=(const HeldOutPairs&) = delete;

  // Up to max_pairs of this rank's next pairs (pair_ids = their ids; caption_dropped all false),
  // or nullopt after the last one. Reads and decodes on the calling thread.
  std::optional<PairBatch> next(int64_t max_pairs);

  int64_t total_pairs() const;  // non-tie pairs of the export, all ranks
  // This rank's pairs left out so far (each logged with its file, key and reason).
  const std::vector<BadPair>& bad_pairs() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dde::data
