#include "dde/dist/bad_pair_rows.hpp"

#include <string>

#include "dde/util/error.hpp"

namespace dde::dist {
namespace {

// Columns: rank (-1 = padding), pair_id, then three strings of kChars bytes each, zero padded.
constexpr int64_t kChars = 64;
constexpr int64_t kRank = 0, kPairId = 1, kReason = 2, kShard = kReason + kChars,
                  kKey = kShard + kChars, kColumns = kKey + kChars;

void put(torch::TensorAccessor<int64_t, 1> row, int64_t column, const std::string& text) {
  for (int64_t i = 0; i < kChars && i < static_cast<int64_t>(text.size()); ++i) {
    row[column + i] = static_cast<unsigned char>(text[static_cast<size_t>(i)]);
  }
}

std::string get(torch::TensorAccessor<int64_t, 1> row, int64_t column) {
  std::string text;
  for (int64_t i = 0; i < kChars && row[column + i] != 0; ++i) {
    text += static_cast<char>(row[column + i]);
  }
  return text;
}

}  // namespace

torch::Tensor bad_pair_rows(const std::vector<data::BadPair>& bad, int64_t rank, int64_t rows) {
  if (rows < static_cast<int64_t>(bad.size())) {
    throw Error({"too few rows for the bad pairs", "bad_pair_rows",
                 ">= " + std::to_string(bad.size()), std::to_string(rows), "this is a bug"});
  }
  torch::Tensor out = torch::zeros({rows, kColumns}, torch::kInt64);
  auto a = out.accessor<int64_t, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    if (r >= static_cast<int64_t>(bad.size())) {
      a[r][kRank] = -1;
      continue;
    }
    const data::BadPair& b = bad[static_cast<size_t>(r)];
    a[r][kRank] = rank;
    a[r][kPairId] = b.pair_id;
    put(a[r], kReason, b.reason);
    put(a[r], kShard, b.shard);
    put(a[r], kKey, b.key);
  }
  return out;
}

std::vector<RankedBadPair> bad_pairs_from_rows(const torch::Tensor& rows) {
  std::vector<RankedBadPair> out;
  const torch::Tensor cpu = rows.to(torch::kCPU, torch::kInt64).contiguous();
  auto a = cpu.accessor<int64_t, 2>();
  for (int64_t r = 0; r < cpu.size(0); ++r) {
    if (a[r][kRank] < 0) {
      continue;
    }
    RankedBadPair ranked;
    ranked.rank = a[r][kRank];
    ranked.pair.pair_id = a[r][kPairId];
    ranked.pair.reason = get(a[r], kReason);
    ranked.pair.shard = get(a[r], kShard);
    ranked.pair.key = get(a[r], kKey);
    out.push_back(std::move(ranked));
  }
  return out;
}

}  // namespace dde::dist
