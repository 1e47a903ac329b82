#include "dde/data/pair_record.hpp"

#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <utility>

#include "dde/util/error.hpp"

namespace dde::data {
namespace {

using nlohmann::json;

constexpr int64_t kMaxMetadataBytes = 1 << 20;  // a caption and token ids: a few KB
constexpr std::array<const char*, 3> kSuffixes = {".json", ".0.jpg", ".1.jpg"};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string member_where(const std::string& shard, const TarMember& member) {
  return fmt::format("{}: member {} '{}' at offset {}", shard, member.index,
                     escape_preview(member.name, 100), member.header_offset);
}

[[noreturn]] void bad_metadata(ErrorInfo info) {
  throw BadPairError("bad_metadata", std::move(info));
}

// root[key], which must exist and pass `check` (e.g. &json::is_string).
const json& metadata_field(const json& root, const std::string& where, const char* key,
                           bool (json::*check)() const noexcept, const char* expected) {
  const auto it = root.find(key);
  if (it == root.end()) {
    bad_metadata({"missing field in pair metadata", where + ": " + key, expected, "no such field",
                  kReexportHint});
  }
  if (!((*it).*check)()) {
    bad_metadata({"wrong field type in pair metadata", where + ": " + key, expected,
                  it->type_name(), kReexportHint});
  }
  return *it;
}

// input_ids: one list of int64 token ids per tokenizer.
void parse_metadata_input_ids(const json& ids, const std::string& where, PairRecord& record) {
  if (!ids.is_array()) {
    bad_metadata({"wrong field type in pair metadata", where + ": input_ids",
                  "a list of lists of ints", ids.type_name(), kReexportHint});
  }
  for (size_t t = 0; t < ids.size(); ++t) {
    const json& list = ids[t];
    if (!list.is_array()) {
      bad_metadata({"wrong field type in pair metadata", fmt::format("{}: input_ids[{}]", where, t),
                    "a list of ints", list.type_name(), kReexportHint});
    }
    std::vector<int64_t> tokens;
    tokens.reserve(list.size());
    for (const json& token : list) {
      if (!token.is_number_integer() ||
          (token.is_number_unsigned() &&
           token.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
        bad_metadata({"wrong token id type in pair metadata",
                      fmt::format("{}: input_ids[{}]", where, t), "integers < 2^63", token.dump(),
                      kReexportHint});
      }
      tokens.push_back(token.get<int64_t>());
    }
    record.input_ids.push_back(std::move(tokens));
  }
}

void parse_json_member(const std::string& text, const std::string& where, PairRecord& record) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    bad_metadata({"pair metadata is not valid JSON", where, "JSON", escape_preview(e.what(), 160),
                  kReexportHint});
  }
  if (!root.is_object()) {
    bad_metadata(
        {"pair metadata is not a JSON object", where, "object", root.type_name(), kReexportHint});
  }
  const auto field = [&](const char* key, bool (json::*check)() const noexcept,
                         const char* expected) -> const json& {
    return metadata_field(root, where, key, check, expected);
  };
  record.caption = field("caption", &json::is_string, "a string").get<std::string>();
  record.source = field("source", &json::is_string, "a string").get<std::string>();
  record.label_0 = field("label_0", &json::is_number, "a number").get<double>();
  record.label_1 = field("label_1", &json::is_number, "a number").get<double>();
  const bool valid_label = record.label_0 == 0.0 || record.label_0 == 0.5 || record.label_0 == 1.0;
  if (!valid_label || record.label_1 != 1.0 - record.label_0) {
    bad_metadata(
        {"bad preference labels", where, "label_0 in {0, 0.5, 1} and label_1 = 1 - label_0",
         fmt::format("label_0={}, label_1={}", record.label_0, record.label_1), kReexportHint});
  }
  const auto ids = root.find("input_ids");
  if (ids != root.end()) {  // absent: exported without --tokenizer
    parse_metadata_input_ids(*ids, where, record);
  }
}

// Which of kSuffixes the member's name ends with.
size_t pair_member_suffix(const std::string& shard, const TarMember& member) {
  for (size_t s = 0; s < kSuffixes.size(); ++s) {
    if (ends_with(member.name, kSuffixes[s])) {
      return s;
    }
  }
  throw Error({"unexpected shard member", member_where(shard, member),
               "KEY.json, KEY.0.jpg or KEY.1.jpg", escape_preview(member.name, 100),
               kReexportHint});
}

// The member's part of `record`: the parsed KEY.json (a problem there is kept in the record),
// or an image's span (and its bytes with Images::kRead).
void read_pair_member(TarReader& tar, ShardPairReader::Images images, const TarMember& member,
                      size_t suffix, PairRecord& record) {
  if (suffix == 0 && images == ShardPairReader::Images::kHeadersOnly) {
    tar.skip_data();
  } else if (suffix == 0) {
    try {
      if (member.size > kMaxMetadataBytes) {
        tar.skip_data();
        bad_metadata({"pair metadata too large", member_where(tar.path(), member),
                      fmt::format("at most {} bytes", kMaxMetadataBytes),
                      fmt::format("{} bytes", member.size), kReexportHint});
      }
      parse_json_member(tar.read_data(), member_where(tar.path(), member), record);
    } catch (const BadPairError& e) {
      record.problem = e;
    }
  } else {
    MemberSpan& span = suffix == 1 ? record.jpg_0_span : record.jpg_1_span;
    span = {member.data_offset, member.size};
    if (images == ShardPairReader::Images::kRead) {
      (suffix == 1 ? record.jpg_0 : record.jpg_1) = tar.read_data();
    } else {
      tar.skip_data();
    }
  }
}

}  // namespace

ShardPairReader::ShardPairReader(std::string shard_path, Images images)
    : tar_(std::move(shard_path)), images_(images) {}

std::optional<PairRecord> ShardPairReader::next() {
  PairRecord record;
  std::array<bool, 3> seen = {false, false, false};
  const auto missing_members = [&] {
    std::string missing;
    for (size_t s = 0; s < kSuffixes.size(); ++s) {
      if (!seen[s]) {
        missing += (missing.empty() ? "" : ", ") + record.key + kSuffixes[s];
      }
    }
    return missing;
  };
  for (int i = 0; i < 3; ++i) {
    const std::optional<TarMember> member = tar_.next();
    if (!member) {
      if (i == 0) {
        return std::nullopt;
      }
      throw Error({"pair is missing a member",
                   fmt::format("{}: key {}", path(), escape_preview(record.key, 100)),
                   missing_members(), "end of shard", kReexportHint});
    }
    const size_t suffix = pair_member_suffix(path(), *member);
    const std::string key =
        member->name.substr(0, member->name.size() - std::string(kSuffixes[suffix]).size());
    if (i == 0) {
      record.key = key;
    } else if (key != record.key || seen[suffix]) {
      throw Error({"pair is missing a member",
                   fmt::format("{}: key {}", path(), escape_preview(record.key, 100)),
                   missing_members(),
                   fmt::format("member {} '{}' at offset {}", member->index,
                               escape_preview(member->name, 100), member->header_offset),
                   kReexportHint});
    }
    seen[suffix] = true;
    read_pair_member(tar_, images_, *member, suffix, record);
  }
  record.position = pairs_read_++;
  return record;
}

}  // namespace dde::data
