#include "dde/objective/timestep_sampler.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "dde/objective/schedule.hpp"
#include "dde/util/error.hpp"
#include "objective/worked_values.hpp"
#include "util/expect_error.hpp"

namespace dde::objective {
namespace {

TimestepSamplerOptions discounted(int64_t t_lo = 0, int64_t t_hi = 1000) {
  TimestepSamplerOptions o;
  o.distribution = TimestepDistribution::kDiscounted;
  o.t_lo = t_lo;
  o.t_hi = t_hi;
  return o;
}

TimestepSamplerOptions uniform(int64_t t_lo = 0, int64_t t_hi = 1000) {
  TimestepSamplerOptions o;
  o.t_lo = t_lo;
  o.t_hi = t_hi;
  return o;
}

// uniform_ct's p(t) ∝ c_t (section 7.3).
TimestepSamplerOptions proportional_to_ct(int64_t t_lo = 0, int64_t t_hi = 1000) {
  TimestepSamplerOptions o;
  o.distribution = TimestepDistribution::kProportionalToCt;
  o.single_shot = schedule().single_shot;
  o.t_lo = t_lo;
  o.t_hi = t_hi;
  return o;
}

double sum(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); }

// Pearson's statistic of the sample against probabilities() over the window's bins; the test
// bound is df + 6 sqrt(2 df), six standard deviations above the chi-square mean.
void expect_histogram_matches(const TimestepSampler& sampler, int64_t n, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  const auto t = sampler.sample(n, gen);
  ASSERT_EQ(t.scalar_type(), torch::kInt64);
  ASSERT_EQ(t.sizes(), torch::IntArrayRef({n}));
  const auto& o = sampler.options();
  EXPECT_GE(t.min().item<int64_t>(), o.t_lo);
  EXPECT_LT(t.max().item<int64_t>(), o.t_hi);
  const auto counts = torch::bincount(t, {}, o.num_timesteps).to(torch::kFloat64);
  const auto& p = sampler.probabilities();
  double chi2 = 0.0;
  for (int64_t k = 0; k < o.num_timesteps; ++k) {
    const double observed = counts[k].item<double>();
    const double expected = static_cast<double>(n) * p[static_cast<size_t>(k)];
    if (expected == 0.0) {
      ASSERT_EQ(observed, 0.0) << "sampled t = " << k << " outside the window";
      continue;
    }
    chi2 += (observed - expected) * (observed - expected) / expected;
  }
  const double df = static_cast<double>(o.t_hi - o.t_lo - 1);
  EXPECT_LT(chi2, df + 6.0 * std::sqrt(2.0 * df)) << "chi2 = " << chi2 << ", df = " << df;
}

TEST(TimestepSampler, UniformProbabilities) {
  const TimestepSampler s(uniform());
  ASSERT_EQ(s.probabilities().size(), 1000u);
  for (const double p : s.probabilities()) {
    ASSERT_DOUBLE_EQ(p, 1e-3);
  }
}

TEST(TimestepSampler, DiscountedRatioMatchesWorkedValue) {
  const TimestepSampler s(discounted());
  const auto& p = s.probabilities();
  EXPECT_NEAR(sum(p), 1.0, 1e-12);
  // Section 6 gives 193.013 (6 significant digits).
  worked::expect_worked_value("p(999)/p(0)", p[999] / p[0], 193.013, 5e-6);
  for (size_t t = 1; t < p.size(); ++t) {
    ASSERT_GT(p[t], p[t - 1]) << "t = " << t;  // early denoising steps (large t) more often
  }
  // One sampler step (T/K = 20 timesteps) is one factor of gamma.
  EXPECT_NEAR(p[979] / p[999], 0.9, 1e-12);
}

TEST(TimestepSampler, ProportionalToCtRatioMatchesWorkedValue) {
  const TimestepSampler s(proportional_to_ct());
  const auto& p = s.probabilities();
  ASSERT_EQ(p.size(), 1000u);
  EXPECT_NEAR(sum(p), 1.0, 1e-12);
  // Section 7.3 gives 251066.1 (7 significant digits: rounding allows 2e-7).
  worked::expect_worked_value("p(999)/p(0) uniform_ct", p[999] / p[0], 251066.1, 2e-7);
  for (size_t t = 0; t < p.size(); ++t) {
    ASSERT_NEAR(p[t] / p[500], schedule().single_shot[t] / schedule().single_shot[500], 1e-12)
        << "t = " << t;
  }
}

TEST(TimestepSampler, ProportionalToCtWindowRestrictsAndRenormalises) {
  const TimestepSampler window(proportional_to_ct(200, 700));
  const auto& p = window.probabilities();
  EXPECT_NEAR(sum(p), 1.0, 1e-12);
  double window_ct = 0.0;
  for (int64_t t = 200; t < 700; ++t) {
    window_ct += schedule().single_shot[static_cast<size_t>(t)];
  }
  for (size_t t = 0; t < 1000; ++t) {
    const double expected =
        t < 200 || t >= 700 ? 0.0 : schedule().single_shot[t] / window_ct;  // c_t / sum
    ASSERT_NEAR(p[t], expected, 1e-15) << "t = " << t;
  }
}

TEST(TimestepSampler, GammaOneIsUniform) {
  auto o = discounted();
  o.gamma = 1.0;
  const TimestepSampler s(o);
  for (const double p : s.probabilities()) {
    ASSERT_NEAR(p, 1e-3, 1e-15);
  }
}

TEST(TimestepSampler, WindowRestrictsAndRenormalises) {
  const TimestepSampler full(discounted());
  const TimestepSampler window(discounted(200, 700));
  const auto& p = window.probabilities();
  ASSERT_EQ(p.size(), 1000u);
  EXPECT_NEAR(sum(p), 1.0, 1e-12);
  for (size_t t = 0; t < 1000; ++t) {
    if (t < 200 || t >= 700) {
      ASSERT_EQ(p[t], 0.0) << "t = " << t;
    }
  }
  // Inside the window the shape is the unrestricted one.
  EXPECT_NEAR(p[650] / p[250], full.probabilities()[650] / full.probabilities()[250], 1e-9);
  const TimestepSampler uniform_window(uniform(200, 700));
  EXPECT_DOUBLE_EQ(uniform_window.probabilities()[200], 1.0 / 500.0);
  EXPECT_DOUBLE_EQ(uniform_window.probabilities()[699], 1.0 / 500.0);
  EXPECT_EQ(uniform_window.probabilities()[700], 0.0);
}

TEST(TimestepSampler, UniformSamplesMatchProbabilities) {
  expect_histogram_matches(TimestepSampler(uniform()), 200000, 1);
}

TEST(TimestepSampler, DiscountedSamplesMatchProbabilities) {
  expect_histogram_matches(TimestepSampler(discounted()), 400000, 2);
}

TEST(TimestepSampler, ProportionalToCtSamplesMatchProbabilities) {
  expect_histogram_matches(TimestepSampler(proportional_to_ct(200, 700)), 200000, 6);
  // Over all T most bins expect under one draw, too few for Pearson's test: check the mean of t
  // against sum_t t c_t / sum_t c_t within 6 standard errors instead.
  const auto& c = schedule().single_shot;
  const double total = sum(c);
  double mean = 0.0;
  double second = 0.0;
  for (size_t t = 0; t < c.size(); ++t) {
    mean += static_cast<double>(t) * c[t] / total;
    second += static_cast<double>(t * t) * c[t] / total;
  }
  const TimestepSampler s(proportional_to_ct());
  const int64_t n = 400000;
  auto gen = at::detail::createCPUGenerator(7);
  const auto t = s.sample(n, gen);
  EXPECT_GE(t.min().item<int64_t>(), 0);
  EXPECT_LT(t.max().item<int64_t>(), 1000);
  const double standard_error = std::sqrt((second - mean * mean) / static_cast<double>(n));
  EXPECT_NEAR(t.to(torch::kFloat64).mean().item<double>(), mean, 6.0 * standard_error);
}

TEST(TimestepSampler, WindowedSamplesNeverLeaveTheWindow) {
  expect_histogram_matches(TimestepSampler(uniform(200, 700)), 200000, 3);
  expect_histogram_matches(TimestepSampler(discounted(200, 700)), 200000, 4);
  // A one-timestep window.
  auto gen = at::detail::createCPUGenerator(5);
  const auto t = TimestepSampler(discounted(999, 1000)).sample(64, gen);
  EXPECT_TRUE(torch::all(t == 999).item<bool>());
}

TEST(TimestepSampler, SameSeedSameDraws) {
  const TimestepSampler s(discounted());
  auto a = at::detail::createCPUGenerator(42);
  auto b = at::detail::createCPUGenerator(42);
  auto c = at::detail::createCPUGenerator(43);
  const auto ta = s.sample(256, a);
  EXPECT_TRUE(torch::equal(ta, s.sample(256, b)));
  EXPECT_FALSE(torch::equal(ta, s.sample(256, c)));
  EXPECT_EQ(s.sample(0, a).numel(), 0);
  const TimestepSampler ct(proportional_to_ct(200, 700));
  auto d = at::detail::createCPUGenerator(42);
  auto e = at::detail::createCPUGenerator(42);
  auto f = at::detail::createCPUGenerator(43);
  const auto td = ct.sample(256, d);
  EXPECT_TRUE(torch::equal(td, ct.sample(256, e)));
  EXPECT_FALSE(torch::equal(td, ct.sample(256, f)));
}

TEST(TimestepSampler, RejectsBadOptions) {
  EXPECT_THROW(TimestepSampler(uniform(300, 300)), dde::Error);  // empty window
  EXPECT_THROW(TimestepSampler(uniform(-1, 10)), dde::Error);
  EXPECT_THROW(TimestepSampler(uniform(0, 1001)), dde::Error);
  auto o = discounted();
  o.gamma = 0.0;
  EXPECT_THROW(TimestepSampler{o}, dde::Error);
  o.gamma = 1.5;
  EXPECT_THROW(TimestepSampler{o}, dde::Error);
  o = discounted();
  o.sampler_steps = 0;
  EXPECT_THROW(TimestepSampler{o}, dde::Error);
  o = uniform();
  o.num_timesteps = 0;
  o.t_hi = 0;
  EXPECT_THROW(TimestepSampler{o}, dde::Error);
  try {
    const TimestepSampler sampler(uniform(700, 200));
    FAIL() << "expected dde::Error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("[700, 200)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("t_lo < t_hi"), std::string::npos) << e.what();
  }
  const TimestepSampler s(uniform());
  auto gen = at::detail::createCPUGenerator(0);
  EXPECT_THROW(s.sample(-1, gen), dde::Error);
  o = proportional_to_ct();
  o.single_shot.clear();
  expect_error_mentions([&] { const TimestepSampler sampler(o); },
                        {"single_shot", "length T = 1000", "0"});
  o = proportional_to_ct();
  o.single_shot[17] = 0.0;
  expect_error_mentions([&] { const TimestepSampler sampler(o); }, {"single_shot[17]", "> 0"});
  o.single_shot[17] = std::nan("");
  expect_error_mentions([&] { const TimestepSampler sampler(o); }, {"single_shot[17]", "finite"});
}

}  // namespace
}  // namespace dde::objective
