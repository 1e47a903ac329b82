#include "dde/objective/t_bins.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "dde/util/error.hpp"
#include "util/expect_error.hpp"

namespace dde::objective {
namespace {

torch::Tensor f64(const std::vector<double>& v) { return torch::tensor(v, torch::kFloat64); }
torch::Tensor steps(const std::vector<int64_t>& v) { return torch::tensor(v, torch::kInt64); }

// Seven pairs in bins 0, 0, 1, 5, 9, 9, 4 of T = 1000 (bin = t / 100); every value is exact in
// float64, so the sums are compared exactly.
struct Pairs {
  torch::Tensor t = steps({0, 99, 100, 550, 999, 999, 450});
  torch::Tensor delta = f64({1e-3, -2e-3, 0.0, 5e-4, -1e-4, 3e-4, -7e-4});  // > 0: misranked
  torch::Tensor credit = f64({0.5, 0.25, 1.0, 2.0, 0.125, 4.0, 0.75});
  torch::Tensor z = f64({-1.0, 2.0, 0.5, -3.0, 1.5, -0.25, 1.75});
};

// The sums by hand, one row per quantity, bins 0 .. 9.
torch::Tensor expected_sums() {
  return torch::tensor({{2.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0},
                        {1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0},
                        {0.75, 1.0, 0.0, 0.0, 0.75, 2.0, 0.0, 0.0, 0.0, 4.125},
                        {1.0, 0.5, 0.0, 0.0, 1.75, -3.0, 0.0, 0.0, 0.0, 1.25}},
                       torch::kFloat64);
}

TEST(TBinSums, HandComputedSums) {
  const Pairs p;
  const auto sums = t_bin_sums(p.t, p.delta, p.credit, p.z, /*num_timesteps=*/1000);
  EXPECT_EQ(sums.scalar_type(), torch::kFloat64);
  ASSERT_EQ(sums.sizes(), torch::IntArrayRef({kTBinRows, 10}));
  EXPECT_TRUE(torch::equal(sums, expected_sums())) << sums;
  EXPECT_EQ(sums[kTBinPairs].sum().item<double>(), 7.0);
}

TEST(TBinSums, StaysOnTheInputsDeviceAndOutOfAutograd) {
  Pairs p;
  p.z = p.z.to(torch::kFloat32).requires_grad_();
  p.credit = p.credit.to(torch::kFloat32);
  const auto sums = t_bin_sums(p.t, p.delta, p.credit, p.z, 1000);
  EXPECT_EQ(sums.device(), p.t.device());
  EXPECT_FALSE(sums.requires_grad());
  EXPECT_TRUE(torch::equal(sums, expected_sums()));
}

TEST(TBinSums, UndefinedDeltaAndZGiveZeroRows) {
  const Pairs p;
  const auto sums = t_bin_sums(p.t, {}, p.credit, {}, 1000);  // sft: no reference, no z
  auto expected = expected_sums();
  expected[kTBinMisranked].zero_();
  expected[kTBinZ].zero_();
  EXPECT_TRUE(torch::equal(sums, expected)) << sums;
}

TEST(TBinSums, BinsAreEqualSlicesOfT) {
  // T = 7 in 3 bins: [0, 7/3), [7/3, 14/3), [14/3, 7) hold t = 0-2, 3-4 and 5-6.
  const auto t = torch::arange(7, torch::kInt64);
  const auto ones = torch::ones({7}, torch::kFloat64);
  const auto sums = t_bin_sums(t, -ones, ones, ones, /*num_timesteps=*/7, /*bins=*/3);
  EXPECT_TRUE(torch::equal(sums[kTBinPairs], f64({3.0, 2.0, 2.0}))) << sums;
  EXPECT_TRUE(torch::equal(sums[kTBinMisranked], f64({0.0, 0.0, 0.0})));
  // An empty batch gives zeros; t outside [0, T) (not checked: no sync) lands in an end bin.
  const auto empty = torch::zeros({0}, torch::kFloat64);
  EXPECT_TRUE(torch::equal(t_bin_sums(steps({}), empty, empty, empty, 1000),
                           torch::zeros({kTBinRows, 10}, torch::kFloat64)));
  const auto clamped = t_bin_sums(steps({-5, 1000}), f64({0, 0}), f64({1, 1}), {}, 1000);
  EXPECT_EQ(clamped[kTBinPairs][0].item<double>(), 1.0);
  EXPECT_EQ(clamped[kTBinPairs][9].item<double>(), 1.0);
}

TEST(TBinSums, RejectsBadArguments) {
  const Pairs p;
  expect_error_mentions([&] { t_bin_sums(p.t.to(torch::kInt32), p.delta, p.credit, p.z, 1000); },
                        {"t_bin_sums: t", "int64", "Int [7]"});
  expect_error_mentions([&] { t_bin_sums(p.t, p.delta, {}, p.z, 1000); },
                        {"t_bin_sums: credit", "undefined"});
  expect_error_mentions([&] { t_bin_sums(p.t, p.delta.slice(0, 1), p.credit, p.z, 1000); },
                        {"t_bin_sums: delta", "[7]", "[6]"});
  expect_error_mentions([&] { t_bin_sums(p.t, p.delta, p.credit, p.z.to(torch::kInt64), 1000); },
                        {"t_bin_sums: z", "floating-point"});
  expect_error_mentions([&] { t_bin_sums(p.t, p.delta, p.credit, p.z, 1000, 0); }, {"bins"});
  expect_error_mentions([&] { t_bin_sums(p.t, p.delta, p.credit, p.z, 0); }, {"num_timesteps"});
}

TEST(TBinSums, RunsOnCuda) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  const Pairs p;
  const auto sums = t_bin_sums(p.t.cuda(), p.delta.cuda(), p.credit.cuda(), p.z.cuda(), 1000);
  EXPECT_TRUE(sums.is_cuda());
  EXPECT_TRUE(torch::equal(sums.cpu(), expected_sums()));
  expect_error_mentions([&] { t_bin_sums(p.t.cuda(), p.delta, p.credit.cuda(), {}, 1000); },
                        {"t_bin_sums: delta", "different devices"});
}

}  // namespace
}  // namespace dde::objective
