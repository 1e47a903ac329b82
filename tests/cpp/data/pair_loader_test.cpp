#include "dde/data/pair_loader.hpp"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "data/shard_fixture.hpp"
#include "util/process_threads.hpp"

namespace dde::data {
namespace {

using testing::kEmptyPrompt;
using testing::kResolution;
using testing::kTokenizers;

using testing::expect_error;
using testing::FixturePair;
using testing::TempDir;

// 3 shards, 12 pairs, 2 ties (keys 000000002 and 000000009): 10 usable pairs per epoch.
std::vector<std::vector<FixturePair>> default_shards() {
  return {{{1.0}, {0.0}, {0.5}, {1.0}, {0.0}}, {{0.0}, {1.0}, {1.0}, {0.0}}, {{0.5}, {1.0}, {0.0}}};
}
const std::set<std::string> kTieKeys = {"000000002", "000000009"};

class PairLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    index_ = testing::write_fixture(dir_.path(), default_shards(), kTokenizers);
  }

  PairLoaderOptions options(int64_t batch_size = 2) const {
    PairLoaderOptions o;
    o.index_path = index_;
    o.resolution = kResolution;
    o.shuffle_buffer = 4;
    o.workers = 3;
    o.prefetch_batches = 2;
    o.seed = 1234;
    o.batch_size = batch_size;
    o.empty_prompt_ids = kEmptyPrompt;
    o.expected_vocab_sha256 = {"sha_a", "sha_b"};
    return o;
  }

  TempDir dir_;
  std::string index_;
};

std::vector<PairBatch> take(PairLoader& loader, int n) {
  std::vector<PairBatch> batches;
  batches.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    batches.push_back(loader.next());
  }
  return batches;
}

std::vector<std::string> keys_of(const std::vector<PairBatch>& batches) {
  std::vector<std::string> keys;
  for (const PairBatch& b : batches) {
    keys.insert(keys.end(), b.keys.begin(), b.keys.end());
  }
  return keys;
}

void expect_same_batch(const PairBatch& a, const PairBatch& b) {
  EXPECT_EQ(a.keys, b.keys);
  EXPECT_EQ(a.captions, b.captions);
  EXPECT_TRUE(torch::equal(a.winner, b.winner));
  EXPECT_TRUE(torch::equal(a.loser, b.loser));
  EXPECT_TRUE(torch::equal(a.caption_dropped, b.caption_dropped));
  ASSERT_EQ(a.input_ids.size(), b.input_ids.size());
  for (size_t t = 0; t < a.input_ids.size(); ++t) {
    EXPECT_TRUE(torch::equal(a.input_ids[t], b.input_ids[t]));
  }
  EXPECT_TRUE(torch::equal(a.winner_original_hw, b.winner_original_hw));
  EXPECT_TRUE(torch::equal(a.winner_crop_tl, b.winner_crop_tl));
  EXPECT_TRUE(torch::equal(a.loser_original_hw, b.loser_original_hw));
  EXPECT_TRUE(torch::equal(a.loser_crop_tl, b.loser_crop_tl));
}

int64_t key_number(const std::string& key) { return std::stoll(key); }

// Mean of the green channel of image b, in [0, 255].
double green_level(const torch::Tensor& images, int64_t b) {
  return images[b][1].to(torch::kFloat64).mean().item<double>();
}

// > 0 when the red ramp rises left to right (not flipped).
double ramp_direction(const torch::Tensor& images, int64_t b) {
  const torch::Tensor red = images[b][0].to(torch::kFloat64);
  return red.select(1, kResolution - 1).mean().item<double>() -
         red.select(1, 0).mean().item<double>();
}

// Without CUDA: pin_memory is refused clearly.
TEST_F(PairLoaderTest, PinMemoryWithoutCudaIsAClearRefusal) {
  if (torch::cuda::is_available())
    GTEST_SKIP() << "a CUDA device is present: PinMemory runs instead";
  PairLoaderOptions o = options(2);
  o.pin_memory = true;
  expect_error([&] { PairLoader loader(o); }, {"PairLoaderOptions.pin_memory", "a CUDA device"});
}

// With CUDA: batches in page-locked memory, for non-blocking copies (bench/gpu_check.sh runs it).
TEST_F(PairLoaderTest, PinMemory) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA device (page-locked memory)";
  PairLoaderOptions o = options(2);
  o.pin_memory = true;
  PairLoader pinned(o);
  PairLoader plain(options(2));
  const PairBatch a = pinned.next(), b = plain.next();
  EXPECT_TRUE(a.winner.is_pinned());
  EXPECT_TRUE(a.loser.is_pinned());
  EXPECT_TRUE(torch::equal(a.winner, b.winner));
  EXPECT_TRUE(torch::equal(a.loser, b.loser));
}

TEST_F(PairLoaderTest, BatchShapesTypesAndValues) {
  PairLoader loader(options(3));
  EXPECT_EQ(loader.pairs_per_epoch(), 10);
  const PairBatch b = loader.next();
  EXPECT_EQ(b.winner.sizes(), (std::vector<int64_t>{3, 3, kResolution, kResolution}));
  EXPECT_EQ(b.loser.sizes(), b.winner.sizes());
  EXPECT_EQ(b.winner.dtype(), torch::kUInt8);  // to_pm1 on the trainer's device
  EXPECT_EQ(b.loser.dtype(), torch::kUInt8);
  EXPECT_FALSE(b.winner.is_pinned());
  ASSERT_EQ(b.input_ids.size(), 2u);
  EXPECT_EQ(b.input_ids[0].sizes(), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(b.input_ids[1].sizes(), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(b.input_ids[0].dtype(), torch::kInt64);
  EXPECT_EQ(b.caption_dropped.sizes(), (std::vector<int64_t>{3}));
  EXPECT_EQ(b.caption_dropped.dtype(), torch::kBool);
  EXPECT_EQ(b.keys.size(), 3u);
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t n = key_number(b.keys[static_cast<size_t>(i)]);
    const bool dropped = b.caption_dropped[i].item<bool>();
    for (size_t t = 0; t < 2; ++t) {
      for (int64_t j = 0; j < kTokenizers[t].max_length; ++j) {
        const int64_t expected =
            dropped ? kEmptyPrompt[t][static_cast<size_t>(j)] : testing::fixture_token(t, n, j);
        EXPECT_EQ(b.input_ids[t][i][j].item<int64_t>(), expected);
      }
    }
    EXPECT_EQ(b.captions[static_cast<size_t>(i)], dropped ? "" : "caption " + std::to_string(n));
  }
}

TEST_F(PairLoaderTest, SameSeedGivesIdenticalBatches) {
  PairLoaderOptions o = options();
  o.random_crop = true;
  PairLoader a(o);
  o.workers = 1;  // thread count must not matter
  PairLoader b(o);
  for (int i = 0; i < 12; ++i) {  // more than two epochs
    expect_same_batch(a.next(), b.next());
  }
}

TEST_F(PairLoaderTest, DifferentSeedsGiveDifferentOrders) {
  PairLoaderOptions o = options();
  PairLoader a(o);
  o.seed = 99;
  PairLoader b(o);
  EXPECT_NE(keys_of(take(a, 5)), keys_of(take(b, 5)));
}

TEST_F(PairLoaderTest, EveryPairOncePerEpochTiesSkippedAndCounted) {
  PairLoader loader(options(2));
  std::set<std::string> expected;
  for (int64_t n = 0; n < 12; ++n) {
    if (!kTieKeys.count(testing::fixture_key(n))) {
      expected.insert(testing::fixture_key(n));
    }
  }
  const std::vector<std::string> epoch0 = keys_of(take(loader, 5));
  EXPECT_EQ(epoch0.size(), 10u);
  EXPECT_EQ(std::set<std::string>(epoch0.begin(), epoch0.end()), expected);
  EXPECT_EQ(loader.state().epoch, 1);
  EXPECT_EQ(loader.state().pairs_consumed, 0);
  EXPECT_EQ(loader.counters().ties_skipped, 2);
  EXPECT_EQ(loader.counters().pairs_yielded, 10);

  const std::vector<std::string> epoch1 = keys_of(take(loader, 5));
  EXPECT_EQ(std::set<std::string>(epoch1.begin(), epoch1.end()), expected);
  EXPECT_NE(epoch0, epoch1);  // reshuffled
  EXPECT_EQ(loader.counters().ties_skipped, 4);
  EXPECT_EQ(loader.counters().pairs_yielded, 20);
}

TEST_F(PairLoaderTest, BatchesSpanEpochBoundaries) {
  PairLoader loader(options(3));  // 10 pairs per epoch: batch 4 holds 1 + 2
  take(loader, 3);
  EXPECT_EQ(loader.state().epoch, 0);
  EXPECT_EQ(loader.state().pairs_consumed, 9);
  loader.next();
  EXPECT_EQ(loader.state().epoch, 1);
  EXPECT_EQ(loader.state().pairs_consumed, 2);
}

TEST_F(PairLoaderTest, WinnerComesFirst) {
  PairLoaderOptions o = options(5);
  o.random_flip = false;
  PairLoader loader(o);
  for (const PairBatch& b : take(loader, 2)) {
    for (int64_t i = 0; i < 5; ++i) {
      EXPECT_NEAR(green_level(b.winner, i), testing::kPreferredGreen, 6)
          << b.keys[static_cast<size_t>(i)];
      EXPECT_NEAR(green_level(b.loser, i), testing::kOtherGreen, 6)
          << b.keys[static_cast<size_t>(i)];
      EXPECT_GT(ramp_direction(b.winner, i), 0.0);
    }
  }
}

TEST_F(PairLoaderTest, KeepTiesKeepsShardOrderForTies) {
  PairLoaderOptions o = options(4);
  o.keep_ties = true;
  PairLoader loader(o);
  EXPECT_EQ(loader.pairs_per_epoch(), 12);
  std::set<std::string> keys;
  for (const PairBatch& b : take(loader, 3)) {
    for (int64_t i = 0; i < 4; ++i) {
      const std::string& key = b.keys[static_cast<size_t>(i)];
      keys.insert(key);
      if (kTieKeys.count(key)) {
        EXPECT_NEAR(green_level(b.winner, i), testing::kTie0Green, 6);
        EXPECT_NEAR(green_level(b.loser, i), testing::kTie1Green, 6);
      }
    }
  }
  EXPECT_EQ(keys.size(), 12u);
  EXPECT_EQ(loader.counters().ties_skipped, 0);
}

TEST_F(PairLoaderTest, RanksGetDisjointInterleavedShares) {
  PairLoaderOptions o = options(1);
  PairLoader single(o);
  const std::vector<std::string> global = keys_of(take(single, 10));

  for (const int64_t world : {2, 3}) {
    std::set<std::string> all;
    const int64_t share = 10 / world;
    for (int64_t rank = 0; rank < world; ++rank) {
      o.world_size = world;
      o.rank = rank;
      PairLoader loader(o);
      EXPECT_EQ(loader.pairs_per_epoch(), share);
      const std::vector<std::string> keys = keys_of(take(loader, static_cast<int>(share)));
      for (int64_t j = 0; j < share; ++j) {
        EXPECT_EQ(keys[static_cast<size_t>(j)],
                  global[static_cast<size_t>(j * world + rank)]);  // pair i -> rank i % W
      }
      for (const std::string& key : keys) {
        EXPECT_TRUE(all.insert(key).second) << "key " << key << " on two ranks";
      }
      EXPECT_EQ(loader.state().epoch, 1);  // every rank wraps after the same number of pairs
    }
    EXPECT_EQ(static_cast<int64_t>(all.size()), share * world);
    EXPECT_EQ(all, std::set<std::string>(global.begin(), global.begin() + share * world));
  }
}

TEST_F(PairLoaderTest, ResumeGivesTheUninterruptedBatches) {
  PairLoaderOptions o = options(3);
  o.random_crop = true;
  o.caption_dropout = 0.5;
  for (const int k : {2, 3, 5}) {  // mid-epoch, just before and after epoch boundaries
    PairLoader uninterrupted(o);
    take(uninterrupted, k);
    const PairLoaderState saved = uninterrupted.state();
    PairLoader resumed(o);
    resumed.load_state(saved);
    EXPECT_EQ(resumed.state().epoch, saved.epoch);
    EXPECT_EQ(resumed.state().pairs_consumed, saved.pairs_consumed);
    for (int i = 0; i < 6; ++i) {
      expect_same_batch(uninterrupted.next(), resumed.next());
    }
    EXPECT_EQ(uninterrupted.state().epoch, resumed.state().epoch);
    EXPECT_EQ(uninterrupted.state().pairs_consumed, resumed.state().pairs_consumed);
  }
}

TEST_F(PairLoaderTest, ResumeOnAnotherRankAndAfterPrefetchedWork) {
  PairLoaderOptions o = options(2);
  o.world_size = 2;
  o.rank = 1;
  PairLoader uninterrupted(o);
  take(uninterrupted, 4);  // epoch 0 has 5 pairs for this rank: state (1, 3)
  EXPECT_EQ(uninterrupted.state().epoch, 1);
  EXPECT_EQ(uninterrupted.state().pairs_consumed, 3);
  // The same loader can jump back: load_state discards what the workers prepared.
  PairLoader resumed(o);
  take(resumed, 1);
  resumed.load_state(uninterrupted.state());
  for (int i = 0; i < 4; ++i) {
    expect_same_batch(uninterrupted.next(), resumed.next());
  }
  expect_error([&] { resumed.load_state({0, 6}); }, {"bad data loader state", "pairs_consumed=6"});
}

TEST_F(PairLoaderTest, CaptionDropoutUsesEmptyPromptIds) {
  PairLoaderOptions o = options(5);
  o.caption_dropout = 1.0;
  PairLoader all(o);
  const PairBatch b = all.next();
  EXPECT_TRUE(b.caption_dropped.all().item<bool>());
  EXPECT_TRUE(torch::equal(b.input_ids[0][0], torch::tensor(kEmptyPrompt[0], torch::kInt64)));
  EXPECT_TRUE(torch::equal(b.input_ids[1][4], torch::tensor(kEmptyPrompt[1], torch::kInt64)));

  o.caption_dropout = 0.0;
  PairLoader none(o);
  EXPECT_FALSE(none.next().caption_dropped.any().item<bool>());

  o.caption_dropout = 0.5;
  PairLoader half(o);
  int64_t dropped = 0;
  for (int i = 0; i < 20; ++i) {
    dropped += half.next().caption_dropped.sum().item<int64_t>();
  }
  EXPECT_GT(dropped, 20);  // of 100, p = 0.5
  EXPECT_LT(dropped, 80);
}

TEST_F(PairLoaderTest, OriginalSizesAndCropOffsets) {
  PairLoaderOptions o = options(5);
  o.random_flip = false;
  PairLoader center(o);
  for (const PairBatch& b : take(center, 2)) {
    for (int64_t i = 0; i < 5; ++i) {
      const int64_t n = key_number(b.keys[static_cast<size_t>(i)]);
      const std::vector<FixturePair> flat = [] {
        std::vector<FixturePair> all;
        for (const auto& shard : default_shards())
          all.insert(all.end(), shard.begin(), shard.end());
        return all;
      }();
      const int winner_image = flat[static_cast<size_t>(n)].label_0 == 0.0 ? 1 : 0;
      for (const auto& [hw, tl, which] :
           {std::tuple(b.winner_original_hw, b.winner_crop_tl, winner_image),
            std::tuple(b.loser_original_hw, b.loser_crop_tl, 1 - winner_image)}) {
        const int64_t h = hw[i][0].item<int64_t>(), w = hw[i][1].item<int64_t>();
        const auto [eh, ew] = testing::fixture_size(n, which);
        EXPECT_EQ(h, eh) << "key " << n << " image " << which;
        EXPECT_EQ(w, ew) << "key " << n << " image " << which;
        // Center crop on the torchvision-resized size.
        const int64_t short_side = std::min(h, w), long_side = std::max(h, w);
        const int64_t resized_long = kResolution * long_side / short_side;
        const int64_t rh = w <= h ? resized_long : kResolution,
                      rw = w <= h ? kResolution : resized_long;
        EXPECT_EQ(tl[i][0].item<int64_t>(), center_crop_offset(static_cast<int>(rh), kResolution));
        EXPECT_EQ(tl[i][1].item<int64_t>(), center_crop_offset(static_cast<int>(rw), kResolution));
      }
    }
  }

  o.random_crop = true;
  PairLoader random(o);
  std::set<int64_t> lefts;
  for (const PairBatch& b : take(random, 4)) {
    for (int64_t i = 0; i < 5; ++i) {
      const int64_t h = b.winner_original_hw[i][0].item<int64_t>(),
                    w = b.winner_original_hw[i][1].item<int64_t>();
      const int64_t resized_long = kResolution * std::max(h, w) / std::min(h, w);
      const int64_t top = b.winner_crop_tl[i][0].item<int64_t>(),
                    left = b.winner_crop_tl[i][1].item<int64_t>();
      EXPECT_GE(top, 0);
      EXPECT_GE(left, 0);
      EXPECT_LE(top, (w <= h ? resized_long : kResolution) - kResolution);
      EXPECT_LE(left, (w <= h ? kResolution : resized_long) - kResolution);
      lefts.insert(left);
    }
  }
  EXPECT_GT(lefts.size(), 1u);  // offsets vary
}

TEST_F(PairLoaderTest, FlipsAreRandomAndIndependentPerImage) {
  PairLoaderOptions o = options(5);
  PairLoader loader(o);
  int flipped_winners = 0, flipped_losers = 0, differing = 0;
  for (const PairBatch& b : take(loader, 8)) {
    for (int64_t i = 0; i < 5; ++i) {
      const bool fw = ramp_direction(b.winner, i) < 0, fl = ramp_direction(b.loser, i) < 0;
      flipped_winners += fw;
      flipped_losers += fl;
      differing += fw != fl;
    }
  }
  EXPECT_GT(flipped_winners, 5);
  EXPECT_LT(flipped_winners, 35);
  EXPECT_GT(flipped_losers, 5);
  EXPECT_LT(flipped_losers, 35);
  EXPECT_GT(differing, 3);
}

TEST_F(PairLoaderTest, WaitSecondsIsNonNegative) {
  PairLoader loader(options());
  take(loader, 3);
  EXPECT_GE(loader.wait_seconds(), 0.0);
  EXPECT_TRUE(std::isfinite(loader.wait_seconds()));
}

TEST_F(PairLoaderTest, DestructorDoesNotHangMidEpoch) {
  auto finished = std::async(std::launch::async, [this] {
    for (const int batches : {0, 1, 3}) {
      PairLoaderOptions o = options(1);
      o.prefetch_batches = 1;
      o.workers = 4;
      PairLoader loader(o);
      take(loader, batches);
      std::this_thread::sleep_for(
          std::chrono::milliseconds(20));  // let workers block on a full queue
    }
  });
  if (finished.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
    ADD_FAILURE() << "PairLoader destructor hangs";
    std::_Exit(1);  // the future's destructor would block forever
  }
  finished.get();
}

// The decode workers run their operators serially: a worker that started an OpenMP team of its own
// made libgomp count more threads than CPUs and put the compute's idle threads to sleep instead of
// spinning (util/threads.hpp).
TEST_F(PairLoaderTest, DecodeWorkersStartNoOpenMpTeams) {
  const int threads_before = at::get_num_threads();
  at::set_num_threads(2);  // as the default plan on two CPUs, whatever this machine has
  const torch::Tensor warm = torch::ones({1 << 20}) * 2;  // this thread's own team exists now
  PairLoaderOptions o = options(2);
  o.resolution = 128;  // each picture is above ATen's grain (32768 elements)
  o.workers = 2;
  const int64_t before = process_threads();
  int64_t during = 0;
  {
    PairLoader loader(o);
    take(loader, 6);
    during = process_threads();
  }
  at::set_num_threads(threads_before);
  EXPECT_EQ(during, before + o.workers + 1);  // the workers and the sequencer, nothing else
}

// One shard of 8 pairs, three of them bad in different ways.
std::vector<std::vector<FixturePair>> shards_with_bad_pairs() {
  FixturePair corrupt{1.0, true};
  FixturePair bad_json{0.0};
  bad_json.json_text = std::string("{\"caption\": \x01\xff", 14);
  FixturePair bad_token{1.0};
  bad_token.first_token = 100000;  // tok_a's vocabulary has 5000 ids
  return {{{1.0}, {0.0}, corrupt, {1.0}, bad_json, {0.0}, bad_token, {1.0}}};
}
const std::vector<testing::FixtureTokenizer> kSizedTokenizers = {{"tok_a", "sha_a", 4, 5000},
                                                                 {"tok_b", "sha_b", 3, 5000}};

TEST_F(PairLoaderTest, BadPairsAreSkippedCountedAndNamed) {
  TempDir dir;
  PairLoaderOptions o = options(1);
  o.index_path = testing::write_fixture(dir.path(), shards_with_bad_pairs(), kSizedTokenizers);
  o.shuffle_buffer = 1;  // keep shard order
  PairLoader loader(o);
  std::vector<std::string> keys;
  keys.reserve(5);
  for (int i = 0; i < 5; ++i) {
    keys.push_back(loader.next().keys[0]);
  }
  EXPECT_EQ(keys, (std::vector<std::string>{"000000000", "000000001", "000000003", "000000005",
                                            "000000007"}));
  const std::vector<BadPair> bad = loader.take_bad_pairs();
  ASSERT_EQ(bad.size(), 3u);
  EXPECT_EQ(bad[0].reason, "unsupported_image_format");
  EXPECT_EQ(bad[0].key, "000000002");
  EXPECT_EQ(bad[0].shard, "shard-000000.tar");
  EXPECT_EQ(bad[0].pair_id, 2);
  EXPECT_NE(bad[0].message.find("key 000000002, member 000000002.0.jpg"), std::string::npos);
  EXPECT_EQ(bad[1].reason, "bad_metadata");
  EXPECT_EQ(bad[1].key, "000000004");
  EXPECT_NE(bad[1].message.find("not valid JSON"), std::string::npos) << bad[1].message;
  EXPECT_EQ(bad[1].message.find('\xff'), std::string::npos) << "raw bytes in: " << bad[1].message;
  EXPECT_EQ(bad[2].reason, "token_id_out_of_range");
  EXPECT_NE(bad[2].message.find("input_ids[0][0]"), std::string::npos) << bad[2].message;
  EXPECT_NE(bad[2].message.find("[0, 5000) (vocabulary of tok_a), got 100000"), std::string::npos)
      << bad[2].message;
  EXPECT_TRUE(loader.take_bad_pairs().empty());
  EXPECT_EQ(loader.counters().bad_pairs, 3);
  EXPECT_EQ(loader.state().bad_pairs, 3);
  EXPECT_EQ(loader.state().epoch, 1);  // the 8 places of epoch 0 are consumed
}

TEST_F(PairLoaderTest, VocabularyLimitFromTheModelSide) {
  TempDir dir;
  FixturePair high{1.0};
  high.first_token = 700;
  PairLoaderOptions o = options(1);
  o.index_path = testing::write_fixture(dir.path(), {{{1.0}, high, {0.0}}}, kSizedTokenizers);
  o.shuffle_buffer = 1;
  o.vocab_sizes = {500, 0};  // tighter than index.json's 5000
  PairLoader loader(o);
  EXPECT_EQ(loader.next().keys[0], "000000000");
  EXPECT_EQ(loader.next().keys[0], "000000002");
  const std::vector<BadPair> bad = loader.take_bad_pairs();
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_NE(bad[0].message.find("[0, 500)"), std::string::npos) << bad[0].message;
  o.vocab_sizes = {500, 5};  // the empty prompt's id 6 is outside tok_b's 5
  expect_error([&] { PairLoader bad_loader(o); },
               {"empty-prompt id outside the vocabulary", "empty_prompt_ids[1]", "[0, 5)"});
}

TEST_F(PairLoaderTest, SkippedPairsAreSkippedAgainAfterResume) {
  TempDir dir;
  std::vector<std::vector<FixturePair>> shards = shards_with_bad_pairs();
  shards.push_back({{0.0}, {1.0, true}, {1.0}, {0.0}});
  PairLoaderOptions o = options(2);
  o.index_path = testing::write_fixture(dir.path(), shards, kSizedTokenizers);
  o.shuffle_buffer = 3;
  const auto ids_of = [](const std::vector<PairBatch>& batches) {
    std::vector<int64_t> ids;
    for (const PairBatch& b : batches) {
      for (int64_t i = 0; i < b.pair_ids.size(0); ++i) ids.push_back(b.pair_ids[i].item<int64_t>());
    }
    return ids;
  };
  const auto bad_ids = [](const std::vector<BadPair>& bad) {
    std::vector<int64_t> ids;
    ids.reserve(bad.size());
    for (const BadPair& b : bad) ids.push_back(b.pair_id);
    return ids;
  };
  PairLoader straight(o);
  const std::vector<PairBatch> first = take(straight, 3);
  const PairLoaderState saved = straight.state();
  const int64_t bad_before = straight.take_bad_pairs().size();
  const std::vector<PairBatch> rest = take(straight, 8);  // into the third epoch
  const std::vector<BadPair> bad_after = straight.take_bad_pairs();
  ASSERT_GT(bad_after.size(), 4u);
  EXPECT_EQ(saved.bad_pairs, bad_before);

  o.workers = 1;  // thread timing must not matter
  PairLoader resumed(o);
  resumed.load_state(saved);
  EXPECT_EQ(ids_of(take(resumed, 8)), ids_of(rest));
  EXPECT_EQ(bad_ids(resumed.take_bad_pairs()), bad_ids(bad_after));
  EXPECT_EQ(resumed.state().bad_pairs, straight.state().bad_pairs);
}

TEST_F(PairLoaderTest, AnEpochOfBadPairsStops) {
  TempDir dir;
  PairLoaderOptions o = options(1);
  o.index_path =
      testing::write_fixture(dir.path(), {{{1.0, true}, {0.0, true}, {1.0, true}}}, kTokenizers);
  PairLoader loader(o);
  expect_error([&] { loader.next(); }, {"every pair of an epoch is bad", "got 3"});
}

TEST_F(PairLoaderTest, IndexCountsAreCheckedAtStart) {
  nlohmann::json index = nlohmann::json::parse(testing::read_file(index_));
  index["shards"][1]["pairs"] = 5;
  testing::write_file(index_, index.dump());
  expect_error([&] { PairLoader loader(options(1)); },
               {"shard pair count does not match index.json", "shards[1]", "shard-000001.tar",
                "5 pairs (index.json)", "got 4 pairs in the tar headers"});
}

TEST_F(PairLoaderTest, ThreadCreationFailureIsAnError) {
  // Address space for the loaded process plus ~64 MB: 200 worker stacks (8 MB each) do not
  // fit, so pthread_create fails with EAGAIN (RLIMIT_NPROC would not bind root).
  // The child runs this test in a fresh process: a fork of this threaded one inherits LibTorch's
  // thread pool marked as corrupted, and the workers that did start would race to replace it
  // ("Invalid thread pool!").
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  PairLoaderOptions o = options(1);
  o.workers = 200;
  const auto start_under_limit = [&] {
    std::ifstream status("/proc/self/status");
    std::string line;
    int64_t vm_kb = 0;
    while (std::getline(status, line)) {
      if (line.rfind("VmSize:", 0) == 0) vm_kb = std::stoll(line.substr(7));
    }
    const rlim_t limit = static_cast<rlim_t>(vm_kb + 64 * 1024) * 1024;
    const rlimit rl{limit, limit};
    setrlimit(RLIMIT_AS, &rl);
    try {
      PairLoader loader(o);
      std::fprintf(stderr, "started");
      std::_Exit(1);
    } catch (const Error& e) {
      std::fprintf(stderr, "%s", e.what());
      std::_Exit(0);
    }
  };
  EXPECT_EXIT(start_under_limit(), ::testing::ExitedWithCode(0),
              "cannot start data loader threads.*data.workers");
}

TEST_F(PairLoaderTest, TokenizerMismatchAsksForReexport) {
  PairLoaderOptions o = options();
  o.expected_vocab_sha256 = {"sha_a", "other"};
  expect_error([&] { PairLoader loader(o); }, {"different vocabulary", "tokenizers[1] (tok_b)",
                                               "vocab_sha256 other", "sha_b", "re-export"});
  o.expected_vocab_sha256 = {"sha_a"};
  expect_error([&] { PairLoader loader(o); }, {"different number of tokenizers", "re-export"});
  o = options();
  o.empty_prompt_ids = {{1, 2, 2, 2}, {5, 6}};
  expect_error([&] { PairLoader loader(o); }, {"empty_prompt_ids[1]", "expected 3"});
}

TEST_F(PairLoaderTest, OptionsAreValidated) {
  PairLoaderOptions o = options();
  o.rank = 2;
  o.world_size = 2;
  expect_error([&] { PairLoader loader(o); }, {"PairLoaderOptions.rank", "in [0, 2)"});
  o = options();
  o.caption_dropout = 1.5;
  expect_error([&] { PairLoader loader(o); }, {"PairLoaderOptions.caption_dropout"});
  o = options();
  o.world_size = 11;
  o.rank = 0;
  expect_error([&] { PairLoader loader(o); }, {"not enough pairs for every rank", "10"});
  o = options();
  o.workers = 100000;
  expect_error([&] { PairLoader loader(o); }, {"PairLoaderOptions.workers", "in [1, 256]"});
  o = options();
  o.resolution = 4096;
  o.batch_size = 64;
  expect_error([&] { PairLoader loader(o); },
               {"PairLoaderOptions.batch_size", "<= 268435456", "64 x 4096^2"});
  o = options();
  o.shuffle_buffer = int64_t{1} << 40;
  expect_error([&] { PairLoader loader(o); }, {"PairLoaderOptions.shuffle_buffer"});
}

}  // namespace
}  // namespace dde::data
