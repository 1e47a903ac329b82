// The wire format of a collective: bad pairs as fixed-width int64 rows, so the trainer can
// all_gather every rank's skipped pairs to rank 0 (which writes them to metrics.jsonl) over the
// tensor-only collectives.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "dde/data/pair_loader.hpp"

namespace dde::dist {

struct RankedBadPair {
  int64_t rank = 0;
  data::BadPair pair;  // reason, shard, key (cut to 64 bytes) and pair_id; message and index empty
};

// [rows, columns] int64: `bad` of `rank`, then padding rows up to `rows` (>= bad.size()).
torch::Tensor bad_pair_rows(const std::vector<data::BadPair>& bad, int64_t rank, int64_t rows);
// The real rows of an all_gather of bad_pair_rows tensors, in rank order.
std::vector<RankedBadPair> bad_pairs_from_rows(const torch::Tensor& rows);

}  // namespace dde::dist
