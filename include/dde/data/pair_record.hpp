// One Pick-a-Pic preference pair as stored in a shard: the three members KEY.json,
// KEY.0.jpg and KEY.1.jpg (docs/formats.md section 2), in any order within the group.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dde/data/data_error.hpp"
#include "dde/data/tar_reader.hpp"

namespace dde::data {

// Where a member's data lies in its shard (TarMember::data_offset, size).
struct MemberSpan {
  int64_t offset = 0;
  int64_t size = 0;
};

struct PairRecord {
  std::string key, caption, source;
  double label_0 = 0.0, label_1 = 0.0;          // 1/0, 0/1, or 0.5/0.5 for a tie
  std::string jpg_0, jpg_1;                     // JPEG bytes; empty when read with Images::kSkip
  std::vector<std::vector<int64_t>> input_ids;  // one [L] list per tokenizer of the export
  MemberSpan jpg_0_span, jpg_1_span;            // where the JPEG bytes lie in the shard
  int64_t position = 0;                         // 0-based, among the pairs of its shard
  // Set when KEY.json does not parse or validate: the pair keeps its place in the order and
  // the loader skips it as a bad pair (the fields above are then incomplete).
  std::optional<BadPairError> problem;

  bool is_tie() const { return label_0 == 0.5; }
};

class ShardPairReader {
 public:
  // kSkip: only the JSON member is read, images are seeked over; kHeadersOnly: nothing but
  // the tar headers is read (key and spans only: the start-up count of the pairs).
  enum class Images { kRead, kSkip, kHeadersOnly };

  explicit ShardPairReader(std::string shard_path, Images images = Images::kRead);

  // The next pair of the shard, or nullopt at its end.
  std::optional<PairRecord> next();
  int64_t pairs_read() const { return pairs_read_; }
  const std::string& path() const { return tar_.path(); }

 private:
  TarReader tar_;
  Images images_;
  int64_t pairs_read_ = 0;
};

}  // namespace dde::data
