#include "dde/data/held_out_pairs.hpp"

#include <fmt/format.h>

#include <array>
#include <filesystem>
#include <utility>

#include "dde/data/data_error.hpp"
#include "dde/data/image.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::data {
namespace {

constexpr const char* kHeldOutReexportHint =
    "re-export the held-out shards with python -m dde_tools.export_pickapic and the model's "
    "tokenizers";

struct PreparedImage {
  torch::Tensor pixels;  // [3, R, R] uint8
  int64_t original_h = 0, original_w = 0, crop_top = 0, crop_left = 0;
};

// Resize(R) -> CenterCrop(R), as the loader without augmentation (to_pm1 does the rest).
PreparedImage prepare_image(const std::string& bytes, const std::string& where, int resolution) {
  Image image = decode_image(bytes, where);  // default limits: Pillow's pixel budget, ratio 20
  PreparedImage out;
  out.original_h = image.height;
  out.original_w = image.width;
  image = resize_shorter_side(image, resolution);
  out.crop_top = center_crop_offset(image.height, resolution);
  out.crop_left = center_crop_offset(image.width, resolution);
  out.pixels = to_chw_uint8(crop(image, static_cast<int>(out.crop_top),
                                 static_cast<int>(out.crop_left), resolution, resolution));
  return out;
}

torch::Tensor rows_of(const std::vector<std::array<int64_t, 2>>& rows) {
  torch::Tensor out = torch::empty({static_cast<int64_t>(rows.size()), 2}, torch::kInt64);
  for (size_t i = 0; i < rows.size(); ++i) {
    out[static_cast<int64_t>(i)][0] = rows[i][0];
    out[static_cast<int64_t>(i)][1] = rows[i][1];
  }
  return out;
}

}  // namespace

struct HeldOutPairs::Impl {
  HeldOutOptions options;
  ShardIndex index;
  std::unique_ptr<CaptionTokenizer> caption_tokenizer;  // caption-only shards
  int64_t total = 0;
  size_t shard = 0;                         // the shard being read
  std::unique_ptr<ShardPairReader> reader;  // on index.shards[shard]
  int64_t ties_in_shard = 0;
  int64_t next_id = 0;  // id of the next non-tie pair
  std::vector<BadPair> bad;

  explicit Impl(HeldOutOptions opts);
  std::optional<PairRecord> next_record();  // next non-tie pair of any rank, checked
  void check_record(const PairRecord& record) const;
  void check_tokens(const PairRecord& record) const;  // BadPairError
  void leave_out(const PairRecord& record, int64_t id, const BadPairError& e);
  void finish_shard() const;
};

HeldOutPairs::Impl::Impl(HeldOutOptions opts) : options(std::move(opts)) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(options.index_path, ec)) {
    throw Error({"held-out index not found", options.index_path,
                 "an index.json written by dde_tools.export_pickapic", "no such file",
                 "export the held-out pairs, or set data.eval_index to \"\" to train without "
                 "held-out evaluation"});
  }
  index = ShardIndex::load(options.index_path);
  if (index.tokenizers.empty() && !options.caption_tokenizers.empty()) {  // caption-only
    caption_tokenizer = std::make_unique<CaptionTokenizer>(options.caption_tokenizers);
    index.tokenizers = caption_tokenizer->infos();
  }
  const auto& expected = options.expected_vocab_sha256;
  bool same = expected.size() == index.tokenizers.size();
  for (size_t t = 0; same && t < expected.size(); ++t) {
    same = expected[t] == index.tokenizers[t].vocab_sha256;
  }
  if (!same) {
    std::string actual;
    for (const TokenizerInfo& t : index.tokenizers) actual += t.name + " " + t.vocab_sha256 + "; ";
    std::string want;
    for (const std::string& sha : expected) want += sha + "; ";
    throw Error({"held-out shards were tokenized with other tokenizers than the model's",
                 options.index_path + ": tokenizers", "vocab_sha256 " + want,
                 actual.empty() ? "none" : actual, kHeldOutReexportHint});
  }
  total = index.total_pairs() - index.total_ties();
  if (total < 1) {
    throw Error({"held-out index holds no usable pair", options.index_path,
                 ">= 1 pair that is not a tie", "0 (ties are not evaluated)",
                 "export held-out pairs with a winner and a loser"});
  }
}

void HeldOutPairs::Impl::check_record(const PairRecord& record) const {
  const std::string where = fmt::format("{}: key {}", reader->path(), record.key);
  if (record.input_ids.size() != index.tokenizers.size()) {
    throw Error({"pair has the wrong number of input_ids lists", where,
                 std::to_string(index.tokenizers.size()), std::to_string(record.input_ids.size()),
                 kHeldOutReexportHint});
  }
  for (size_t t = 0; t < record.input_ids.size(); ++t) {
    if (static_cast<int64_t>(record.input_ids[t].size()) != index.tokenizers[t].max_length) {
      throw Error({"pair has input_ids of the wrong length",
                   fmt::format("{}: input_ids[{}]", where, t),
                   std::to_string(index.tokenizers[t].max_length),
                   std::to_string(record.input_ids[t].size()), kHeldOutReexportHint});
    }
  }
}

// As the training loader: every id inside index.json's vocabulary of its tokenizer.
void HeldOutPairs::Impl::check_tokens(const PairRecord& record) const {
  for (size_t t = 0; t < record.input_ids.size(); ++t) {
    const int64_t limit = index.tokenizers[t].vocab_size;
    for (size_t j = 0; j < record.input_ids[t].size(); ++j) {
      const int64_t id = record.input_ids[t][j];
      if (id >= 0 && (limit <= 0 || id < limit)) continue;
      throw BadPairError(
          "token_id_out_of_range",
          {"token id outside the text encoder's vocabulary",
           fmt::format("{}: key {}: input_ids[{}][{}]", reader->path(), record.key, t, j),
           limit > 0 ? fmt::format("an id in [0, {}) ({})", limit, index.tokenizers[t].name)
                     : std::string("an id >= 0"),
           std::to_string(id), kHeldOutReexportHint});
    }
  }
}

void HeldOutPairs::Impl::leave_out(const PairRecord& record, int64_t id, const BadPairError& e) {
  bad.push_back(
      BadPair{e.reason(), reader->path(), static_cast<int64_t>(shard), record.key, id, e.what()});
  log::warn("eval: held-out pair {} left out ({}): {}", id, e.reason(), e.what());
  if (static_cast<int64_t>(bad.size()) > options.max_bad_pairs) {
    throw Error({"too many bad held-out pairs", options.index_path,
                 fmt::format("at most eval.max_bad_pairs = {} per rank", options.max_bad_pairs),
                 fmt::format("{} (the last: {} in {}, key {})", bad.size(), e.reason(),
                             reader->path(), record.key),
                 "re-export the held-out shards (dde_tools.export_pickapic), raise "
                 "eval.max_bad_pairs, or set data.eval_index: \"\""});
  }
}

void HeldOutPairs::Impl::finish_shard() const {
  const ShardInfo& info = index.shards[shard];
  if (reader->pairs_read() != info.pairs || ties_in_shard != info.ties) {
    throw Error({"shard does not match index.json", info.path,
                 fmt::format("{} pairs, {} ties (index.json)", info.pairs, info.ties),
                 fmt::format("{} pairs, {} ties", reader->pairs_read(), ties_in_shard),
                 kHeldOutReexportHint});
  }
}

std::optional<PairRecord> HeldOutPairs::Impl::next_record() {
  while (shard < index.shards.size()) {
    if (!reader) {
      reader = std::make_unique<ShardPairReader>(index.shards[shard].path);
      ties_in_shard = 0;
    }
    std::optional<PairRecord> record = reader->next();
    if (!record) {
      finish_shard();
      reader.reset();
      ++shard;
      continue;
    }
    if (record->is_tie()) {
      ++ties_in_shard;
      continue;
    }
    // A caption-only pair gets its ids (and this check) in next(), where a bad caption is
    // left out and counted.
    if (!caption_tokenizer || !record->input_ids.empty()) check_record(*record);
    return record;
  }
  return std::nullopt;
}

HeldOutPairs::HeldOutPairs(HeldOutOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
HeldOutPairs::~HeldOutPairs() = default;

int64_t HeldOutPairs::total_pairs() const { return impl_->total; }
const std::vector<BadPair>& HeldOutPairs::bad_pairs() const { return impl_->bad; }

std::optional<PairBatch> HeldOutPairs::next(int64_t max_pairs) {
  Impl& d = *impl_;
  const int resolution = static_cast<int>(d.options.resolution);
  std::vector<torch::Tensor> winners, losers, ids;
  std::vector<std::array<int64_t, 2>> winner_hw, winner_tl, loser_hw, loser_tl;
  std::vector<std::vector<int64_t>> tokens(d.index.tokenizers.size());
  PairBatch out;
  while (static_cast<int64_t>(winners.size()) < max_pairs) {
    std::optional<PairRecord> record = d.next_record();
    if (!record) break;
    const int64_t id = d.next_id++;
    if (id % d.options.world_size != d.options.rank) continue;
    // label_0 == 1: image 0 wins; label_0 == 0: image 1 wins (ties were skipped).
    const int winner_index = record->label_0 == 0.0 ? 1 : 0;
    const auto load = [&](int which) {
      const std::string where = fmt::format("{}: key {}, member {}.{}.jpg", d.reader->path(),
                                            record->key, record->key, which);
      return prepare_image(which == 0 ? record->jpg_0 : record->jpg_1, where, resolution);
    };
    PreparedImage w, l;
    try {
      if (d.caption_tokenizer && record->input_ids.empty()) {
        tokenize_record_caption(*d.caption_tokenizer, record->caption,
                                fmt::format("{}: key {}", d.reader->path(), record->key),
                                record->input_ids);
        d.check_record(*record);
      }
      d.check_tokens(*record);
      w = load(winner_index);
      l = load(1 - winner_index);
    } catch (const BadPairError& e) {
      d.leave_out(*record, id, e);
      continue;
    }
    winners.push_back(w.pixels);
    losers.push_back(l.pixels);
    winner_hw.push_back({w.original_h, w.original_w});
    winner_tl.push_back({w.crop_top, w.crop_left});
    loser_hw.push_back({l.original_h, l.original_w});
    loser_tl.push_back({l.crop_top, l.crop_left});
    for (size_t t = 0; t < tokens.size(); ++t) {
      tokens[t].insert(tokens[t].end(), record->input_ids[t].begin(), record->input_ids[t].end());
    }
    ids.push_back(torch::tensor(id, torch::kInt64));
    out.keys.push_back(record->key);
    out.captions.push_back(record->caption);
  }
  if (winners.empty()) return std::nullopt;
  const auto B = static_cast<int64_t>(winners.size());
  out.winner = torch::stack(winners);
  out.loser = torch::stack(losers);
  for (size_t t = 0; t < tokens.size(); ++t) {
    out.input_ids.push_back(
        torch::tensor(tokens[t], torch::kInt64).view({B, d.index.tokenizers[t].max_length}));
  }
  out.caption_dropped = torch::zeros({B}, torch::kBool);
  out.winner_original_hw = rows_of(winner_hw);
  out.winner_crop_tl = rows_of(winner_tl);
  out.loser_original_hw = rows_of(loser_hw);
  out.loser_crop_tl = rows_of(loser_tl);
  out.pair_ids = torch::stack(ids);
  return out;
}

}  // namespace dde::data
