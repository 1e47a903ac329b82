#include "dde/objective/methods.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "dde/util/error.hpp"
#include "objective/worked_values.hpp"
#include "util/expect_error.hpp"

namespace dde::objective {
namespace {

namespace w = worked;

const std::vector<Method> kAllMethods = {Method::kSft,       Method::kUniform, Method::kDiscounted,
                                         Method::kDdeSingle, Method::kDdeStep, Method::kDde,
                                         Method::kUniformCt, Method::kMapo};
const std::vector<Method> kDpoMethods = {Method::kUniform, Method::kDiscounted, Method::kDdeSingle,
                                         Method::kDdeStep, Method::kDde,        Method::kUniformCt};

torch::Tensor f32(double v) { return torch::tensor({v}, torch::kFloat32); }
torch::Tensor f64(double v) { return torch::tensor({v}, torch::kFloat64); }

// The section 6 pair, in float64 so the worked values are reproduced to their printed digits.
PairErrors worked_pair() {
  return {f64(w::kPairPolicyW), f64(w::kPairPolicyL), f64(w::kPairRefW), f64(w::kPairRefL)};
}

double item(const torch::Tensor& x) { return x.item<double>(); }

TEST(Methods, NamesRoundTrip) {
  for (const Method m : kAllMethods) {
    EXPECT_EQ(parse_method(method_name(m)), m);
  }
  EXPECT_STREQ(method_name(Method::kDdeSingle), "dde_single");
  EXPECT_STREQ(method_name(Method::kUniformCt), "uniform_ct");
  EXPECT_EQ(parse_method("uniform_ct"), Method::kUniformCt);
  expect_error_mentions([] { parse_method("dpo"); },
                        {"unknown method", "'dpo'", "sft, uniform, discounted, dde_single"});
}

TEST(Methods, Properties) {
  EXPECT_FALSE(uses_reference(Method::kSft));
  EXPECT_FALSE(uses_reference(Method::kMapo));
  EXPECT_FALSE(uses_correction(Method::kMapo));
  EXPECT_EQ(method_distribution(Method::kMapo), TimestepDistribution::kUniform);
  EXPECT_EQ(parse_method("mapo"), Method::kMapo);
  for (const Method m : kDpoMethods) {
    EXPECT_TRUE(uses_reference(m)) << method_name(m);
  }
  EXPECT_TRUE(uses_correction(Method::kDde));
  EXPECT_TRUE(uses_correction(Method::kDdeStep));
  EXPECT_FALSE(uses_correction(Method::kDdeSingle));
  EXPECT_FALSE(uses_correction(Method::kUniform));
  EXPECT_TRUE(uses_reference(Method::kUniformCt));
  EXPECT_FALSE(uses_correction(Method::kUniformCt));
  EXPECT_EQ(method_distribution(Method::kUniformCt), TimestepDistribution::kProportionalToCt);
  EXPECT_EQ(method_distribution(Method::kUniform), TimestepDistribution::kUniform);
  EXPECT_EQ(method_distribution(Method::kDiscounted), TimestepDistribution::kDiscounted);
  EXPECT_EQ(method_distribution(Method::kDde), TimestepDistribution::kUniform);
  EXPECT_EQ(method_distribution(Method::kSft), TimestepDistribution::kUniform);
}

TEST(Methods, WorkedPairDelta) {
  const auto d = delta(worked_pair());
  EXPECT_EQ(d.scalar_type(), torch::kFloat64);
  EXPECT_NEAR(item(d), -7e-4, 1e-15);
}

// Section 6 prints z and loss to 8 significant digits.
constexpr double kWorkedTol = 1e-7;

TEST(Methods, WorkedPairDirectFunctions) {
  const auto e = worked_pair();
  const MethodParams params{w::kBeta, 1.0};
  const auto& s = schedule();
  const auto c = f64(s.single_shot[100]);
  const auto lambda = f64(s.stepwise[100]);
  const auto C = f64(w::kPairCorrection);

  const auto u = uniform(e, params);
  w::expect_worked_value("uniform z", item(u.z), 1.7500000, kWorkedTol);
  w::expect_worked_value("uniform loss", item(u.loss), 0.16022415, kWorkedTol);
  const auto single = dde_single(e, c, params);
  w::expect_worked_value("dde_single z", item(single.z), 0.20700520, kWorkedTol);
  w::expect_worked_value("dde_single loss", item(single.loss), 0.59499144, kWorkedTol);
  const auto step = dde_step(e, lambda, C, params);
  w::expect_worked_value("dde_step z", item(step.z), 1.0229286, kWorkedTol);
  w::expect_worked_value("dde_step loss", item(step.loss), 0.30714673, kWorkedTol);
  const auto full = dde(e, c, C, params);
  w::expect_worked_value("dde z", item(full.z), 1.2070052, kWorkedTol);
  w::expect_worked_value("dde loss", item(full.loss), 0.26166530, kWorkedTol);
}

TEST(Methods, WorkedPairThroughTheDispatcherInFloat32) {
  // What the trainer does: float32 errors, t and C_t from the EMA, the tables from the schedule.
  const PairErrors e{f32(w::kPairPolicyW), f32(w::kPairPolicyL), f32(w::kPairRefW),
                     f32(w::kPairRefL)};
  const MethodParams params{w::kBeta, 1.0};
  const auto t = torch::tensor({w::kPairT}, torch::kInt64);
  const auto C = f64(w::kPairCorrection);
  struct Row {
    Method method;
    double z, loss;
  };
  // Rounding 0.0300 etc. to float32 moves Delta by 3.6e-6 relative: hence 1e-5 here.
  for (const Row& row :
       {Row{Method::kUniform, 1.7500000, 0.16022415},
        Row{Method::kDiscounted, 1.7500000, 0.16022415},
        Row{Method::kUniformCt, 1.7500000, 0.16022415},
        Row{Method::kDdeSingle, 0.20700520, 0.59499144},
        Row{Method::kDdeStep, 1.0229286, 0.30714673}, Row{Method::kDde, 1.2070052, 0.26166530}}) {
    const auto out = compute_method(row.method, e, t, C, params, schedule());
    EXPECT_EQ(out.z.scalar_type(), torch::kFloat64);
    EXPECT_EQ(out.loss.scalar_type(), torch::kFloat64);
    EXPECT_LE(w::relative_error(item(out.z), row.z), 1e-5) << method_name(row.method);
    EXPECT_LE(w::relative_error(item(out.loss), row.loss), 1e-5) << method_name(row.method);
  }
}

TEST(Methods, CorrectionScaleScalesTheCorrection) {
  const auto e = worked_pair();
  const auto lambda = f64(schedule().stepwise[100]);
  const auto C = f64(w::kPairCorrection);
  const auto base = item(dde_step(e, lambda, C, {w::kBeta, 0.0}).z);
  const auto doubled = item(dde_step(e, lambda, C, {w::kBeta, 2.0}).z);
  EXPECT_NEAR(doubled - base, 2.0 * w::kBeta * w::kPairCorrection, 1e-12);
}

TEST(Methods, SftLossIsThePolicyErrorOnWinners) {
  const auto pw = torch::tensor({0.1, 0.25, 0.5}, torch::kFloat32).requires_grad_();
  const PairErrors e{pw, {}, {}, {}};
  const auto out = sft(e);
  EXPECT_FALSE(out.z.defined());
  EXPECT_EQ(out.loss.scalar_type(), torch::kFloat64);
  EXPECT_TRUE(torch::allclose(out.loss, pw.to(torch::kFloat64)));
  out.loss.mean().backward();
  EXPECT_TRUE(torch::allclose(pw.grad(), torch::full({3}, 1.0 / 3.0)));
  const auto via = compute_method(Method::kSft, e, torch::tensor({1, 2, 3}, torch::kInt64), {},
                                  MethodParams{}, schedule());
  EXPECT_TRUE(torch::allclose(via.loss, pw.to(torch::kFloat64)));
  EXPECT_TRUE(torch::allclose(
      credit_weight(Method::kSft, via, torch::tensor({1, 2, 3}, torch::kInt64), schedule()),
      torch::ones({3}, torch::kFloat64)));
}

// docs/method.md §8.1's worked value: e_w = 0.10, e_l = 0.12, s = 0.5, b = 0.1, T = 1000.
TEST(Methods, MapoWorkedValue) {
  EXPECT_NEAR(item(mapo_f(f64(0.05))), 0.9752083, 5e-8);
  EXPECT_NEAR(item(mapo_f(f64(0.06))), 0.9703000, 5e-8);
  const PairErrors e{f64(0.10), f64(0.12), {}, {}};
  const MethodParams params{};  // mapo_beta 0.1, mapo_snr 0.5: MaPO's defaults
  const auto out = mapo(e, params, 1000);
  EXPECT_NEAR(item(out.z), 1000 * 4.908343e-3, 1000 * 5e-10);
  EXPECT_NEAR(item(out.loss), 0.1007358, 5e-8);
  EXPECT_EQ(out.loss.scalar_type(), torch::kFloat64);
  // Through the dispatcher (T from the schedule), in float32 inputs; no reference needed.
  const PairErrors e32{f32(0.10), f32(0.12), {}, {}};
  const auto via =
      compute_method(Method::kMapo, e32, torch::tensor({7}, torch::kInt64), {}, params, schedule());
  EXPECT_NEAR(item(via.loss), 0.1007358, 1e-6);
  EXPECT_NEAR(
      item(credit_weight(Method::kMapo, via, torch::tensor({7}, torch::kInt64), schedule())),
      1.0 / (1.0 + std::exp(item(via.z))), 1e-12);
  // b and s are the config's: doubling b doubles the margin term.
  MethodParams twice = params;
  twice.mapo_beta = 0.2;
  EXPECT_NEAR(item(mapo(e, twice, 1000).loss) - 0.10, 2 * (0.1007358 - 0.10), 1e-7);
}

TEST(Methods, MapoFIsSmoothAtZeroAndFiniteFarOut) {
  // f(0) = 1 with gradient -1/2 (the 0/0 of x / expm1(x) never reaches autograd).
  const auto x =
      torch::tensor({0.0, 1e-5, 1e-3, 1.0, 30.0, 800.0}, torch::kFloat64).requires_grad_();
  const auto y = mapo_f(x);
  y.sum().backward();
  // Beyond 700, x is clamped: f(800) is f(700) = 7e-302, 0 for any loss in float64.
  const auto want =
      torch::tensor({1.0, 1e-5 / std::expm1(1e-5), 1e-3 / std::expm1(1e-3), 1.0 / std::expm1(1.0),
                     30.0 / std::expm1(30.0), 700.0 / std::expm1(700.0)},
                    torch::kFloat64);
  EXPECT_TRUE(torch::allclose(y.detach(), want, 1e-12, 1e-300)) << y;
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>()) << x.grad();
  EXPECT_NEAR(x.grad()[0].item<double>(), -0.5, 1e-12);
  EXPECT_NEAR(x.grad()[1].item<double>(), -0.5 + 1e-5 / 6.0, 1e-10);
  // A winner with the smaller error has the positive margin; equal errors give z = 0.
  const PairErrors better{f64(0.1), f64(0.2), {}, {}};
  EXPECT_GT(item(mapo(better, MethodParams{}, 1000).z), 0.0);
  const PairErrors tie{f64(0.1), f64(0.1), {}, {}};
  EXPECT_EQ(item(mapo(tie, MethodParams{}, 1000).z), 0.0);
  EXPECT_NEAR(item(mapo(tie, MethodParams{}, 1000).loss), 0.1 + 0.1 * std::log(2.0), 1e-15);
}

TEST(Methods, MapoRejectsBadArguments) {
  const PairErrors e{f64(0.1), f64(0.2), {}, {}};
  MethodParams bad{};
  bad.mapo_beta = 0.0;
  expect_error_mentions([&] { mapo(e, bad, 1000); }, {"mapo_beta", "finite > 0"});
  bad = MethodParams{};
  bad.mapo_snr = std::nan("");
  expect_error_mentions([&] { mapo(e, bad, 1000); }, {"mapo_snr", "finite > 0"});
  const PairErrors no_loser{f64(0.1), {}, {}, {}};
  expect_error_mentions([&] { mapo(no_loser, MethodParams{}, 1000); }, {"errors.policy_l"});
  expect_error_mentions([&] { mapo(e, MethodParams{}, 0); }, {"num_timesteps"});
}

TEST(Methods, LossIsLog2WhenPolicyEqualsReference) {
  torch::manual_seed(0);
  const int64_t batch = 16;
  const auto ew = torch::rand({batch}) * 0.1;
  const auto el = torch::rand({batch}) * 0.1;
  const PairErrors e{ew, el, ew.clone(), el.clone()};
  const auto t = torch::randint(0, 1000, {batch}, torch::kInt64);
  const auto zero_correction = torch::zeros({batch}, torch::kFloat64);
  for (const Method m : kDpoMethods) {
    const auto out = compute_method(m, e, t, zero_correction, MethodParams{}, schedule());
    EXPECT_TRUE(torch::allclose(out.z, torch::zeros({batch}, torch::kFloat64), 0.0, 1e-15))
        << method_name(m);
    EXPECT_TRUE(
        torch::allclose(out.loss, torch::full({batch}, std::log(2.0), torch::kFloat64), 0, 1e-15))
        << method_name(m);
  }
}

// Section 5: dL/d e[policy,w] = 0.5 beta k_t sigmoid(-z), checked by autograd for every method,
// with float32 errors as the trainer produces them and a nonzero correction.
TEST(Methods, GradientMatchesTheCreditWeight) {
  torch::manual_seed(1);
  const int64_t batch = 32;
  const auto ref_w = 0.02 + 0.03 * torch::rand({batch});
  const auto ref_l = 0.02 + 0.03 * torch::rand({batch});
  const auto pol_w0 = ref_w + 1e-4 * torch::randn({batch});
  const auto pol_l0 = ref_l + 1e-4 * torch::randn({batch});
  const auto t = torch::randint(0, 1000, {batch}, torch::kInt64);
  const auto C = 1e-4 * torch::rand({batch}, torch::kFloat64);
  const MethodParams params{w::kBeta, 1.0};
  for (const Method m : kDpoMethods) {
    const auto pw = pol_w0.clone().requires_grad_();
    const auto pl = pol_l0.clone().requires_grad_();
    const auto rw = ref_w.clone().requires_grad_();
    const auto rl = ref_l.clone().requires_grad_();
    const auto out = compute_method(m, {pw, pl, rw, rl}, t, C, params, schedule());
    out.loss.sum().backward();
    ASSERT_EQ(pw.grad().scalar_type(), torch::kFloat32);
    const auto expected = 0.5 * params.beta * credit_weight(m, out, t, schedule());
    const auto got = pw.grad().to(torch::kFloat64);
    EXPECT_TRUE(torch::allclose(got, expected, 1e-6, 1e-30)) << method_name(m);
    EXPECT_TRUE(torch::allclose(rw.grad().to(torch::kFloat64), -expected, 1e-6, 1e-30));
    EXPECT_TRUE(torch::allclose(pl.grad().to(torch::kFloat64), -expected, 1e-6, 1e-30));
    EXPECT_TRUE(torch::allclose(rl.grad().to(torch::kFloat64), expected, 1e-6, 1e-30));
    EXPECT_GT(expected.abs().max().item<double>(), 0.0) << method_name(m);
  }
}

TEST(Methods, CreditWeightUsesTheMethodsCoefficient) {
  const auto e = worked_pair();
  const auto t = torch::tensor({w::kPairT}, torch::kInt64);
  const auto C = f64(w::kPairCorrection);
  const auto& s = schedule();
  const auto weight = [&](Method m) {
    return item(credit_weight(m, compute_method(m, e, t, C, MethodParams{}, s), t, s));
  };
  const auto sig = [](double z) { return 1.0 / (1.0 + std::exp(z)); };  // sigmoid(-z)
  EXPECT_NEAR(weight(Method::kUniform), sig(1.75), 1e-12);
  EXPECT_NEAR(weight(Method::kUniformCt), sig(1.75), 1e-12);  // k_t = 1 (section 7.3)
  EXPECT_NEAR(weight(Method::kDdeSingle), s.single_shot[100] * sig(0.2070052049216116), 1e-12);
  EXPECT_NEAR(weight(Method::kDdeStep), s.stepwise[100] * sig(1.022928609183992), 1e-12);
  EXPECT_NEAR(weight(Method::kDde), s.single_shot[100] * sig(1.2070052049216116), 1e-12);
}

TEST(Methods, TransitionEstimateIsDetached) {
  const auto pw = torch::tensor({w::kPairPolicyW, 0.5}, torch::kFloat64).requires_grad_();
  const PairErrors e{pw, torch::tensor({w::kPairPolicyL, 0.5}, torch::kFloat64),
                     torch::tensor({w::kPairRefW, 0.6}, torch::kFloat64),
                     torch::tensor({w::kPairRefL, 0.5}, torch::kFloat64)};
  const auto t = torch::tensor({100, 7}, torch::kInt64);
  const auto d = transition_estimate(e, t, schedule());
  EXPECT_FALSE(d.requires_grad());
  EXPECT_EQ(d.scalar_type(), torch::kFloat64);
  EXPECT_NEAR(item(d[0]), -0.5 * schedule().stepwise[100] * -7e-4, 1e-18);
  EXPECT_NEAR(item(d[1]), -0.5 * schedule().stepwise[7] * -0.1, 1e-15);
}

TEST(Methods, SaturatedLogitsStayFinite) {
  // |z| of 1e4 and more: softplus must neither overflow nor lose the linear tail.
  const auto pw = torch::tensor({0.0, 10.0}, torch::kFloat64).requires_grad_();
  const auto zero = torch::zeros({2}, torch::kFloat64);
  const auto big = torch::tensor({10.0, 0.0}, torch::kFloat64);
  const auto out = uniform({pw, zero, big, zero}, MethodParams{});
  // Delta = pw - big: z = -2500 * (-10) = +25000 and -2500 * 10 = -25000.
  EXPECT_DOUBLE_EQ(item(out.z[0]), 25000.0);
  EXPECT_DOUBLE_EQ(item(out.loss[0]), 0.0);
  EXPECT_DOUBLE_EQ(item(out.loss[1]), 25000.0);
  out.loss.sum().backward();
  EXPECT_TRUE(torch::isfinite(pw.grad()).all().item<bool>());
  EXPECT_DOUBLE_EQ(item(pw.grad()[1]), 2500.0);
}

TEST(Methods, RejectsBadArguments) {
  const auto e = worked_pair();
  const auto t = torch::tensor({100}, torch::kInt64);
  const auto C = f64(0.0);
  const auto& s = schedule();
  expect_error_mentions(
      [&] {
        uniform({e.policy_w, e.policy_l, {}, e.ref_l}, MethodParams{});
      },
      {"errors.ref_w", "undefined"});
  expect_error_mentions(
      [&] {
        uniform({e.policy_w, torch::zeros({2}, torch::kFloat64), e.ref_w, e.ref_l}, {});
      },
      {"errors.policy_l", "[1]", "[2]"});
  expect_error_mentions(
      [&] {
        uniform({torch::zeros({1}, torch::kInt64), e.policy_l, e.ref_w, e.ref_l}, {});
      },
      {"errors.policy_w", "floating-point"});
  expect_error_mentions([&] { uniform(e, {0.0, 1.0}); }, {"beta", "> 0"});
  expect_error_mentions([&] { compute_method(Method::kDde, e, t, {}, {}, s); },
                        {"C_t", "CorrectionEma::correction"});
  expect_error_mentions(
      [&] { compute_method(Method::kDde, e, torch::tensor({1000}, torch::kInt64), C, {}, s); },
      {"timestep out of range", "[0, 1000)"});
  expect_error_mentions(
      [&] {
        compute_method(Method::kDde, e, torch::tensor({1, 2}, torch::kInt64), C, {}, s);
      },
      {"objective::compute_method(dde): t"});
  expect_error_mentions([&] { dde(e, f64(1.0), torch::zeros({3}, torch::kFloat64), {}); },
                        {"objective::dde: C_t"});
  expect_error_mentions([&] { credit_weight(Method::kDde, MethodOutput{}, t, s); },
                        {"output.z", "undefined"});
}

// Section 7.1 prints G and beta / G to 7 significant digits: rounding allows 5e-7 relative.
constexpr double kCalibratedTol = 5e-7;

TEST(Methods, CalibratedBetaMatchesWorkedValues) {
  const auto& s = schedule();
  w::expect_worked_value("G over all T", single_shot_geometric_mean(s, 0, 1000), 2.628785,
                         kCalibratedTol);
  w::expect_worked_value("calibrated beta, all T", calibrated_beta(w::kBeta, s, 0, 1000), 1902.019,
                         kCalibratedTol);
  w::expect_worked_value("G over [200, 700)", single_shot_geometric_mean(s, 200, 700), 1.890212,
                         kCalibratedTol);
  w::expect_worked_value("calibrated beta, [200, 700)", calibrated_beta(w::kBeta, s, 200, 700),
                         2645.206, kCalibratedTol);
  // A one-timestep window: G is c_t itself.
  EXPECT_NEAR(single_shot_geometric_mean(s, 501, 502), s.single_shot[501], 1e-15);
  // "The middle of the trajectory (c_t = G at t ~ 501)".
  EXPECT_LT(s.single_shot[500], single_shot_geometric_mean(s, 0, 1000));
  EXPECT_GT(s.single_shot[502], single_shot_geometric_mean(s, 0, 1000));
}

TEST(Methods, CalibratedBetaRejectsBadArguments) {
  const auto& s = schedule();
  expect_error_mentions([&] { calibrated_beta(w::kBeta, s, 700, 200); },
                        {"[700, 200)", "t_lo < t_hi <= T = 1000"});
  expect_error_mentions([&] { calibrated_beta(w::kBeta, s, 0, 1001); }, {"[0, 1001)"});
  expect_error_mentions([&] { calibrated_beta(w::kBeta, s, -1, 10); }, {"[-1, 10)"});
  expect_error_mentions([&] { calibrated_beta(0.0, s, 0, 1000); }, {"calibrated_beta: beta"});
  expect_error_mentions([&] { calibrated_beta(std::nan(""), s, 0, 1000); }, {"beta", "finite"});
  NoiseSchedule broken = s;
  broken.single_shot.resize(10);
  expect_error_mentions([&] { single_shot_geometric_mean(broken, 0, 1000); },
                        {"single_shot", "length T = 1000", "10"});
}

TEST(Methods, RunsOnCuda) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  const auto cuda = [](double v) { return torch::tensor({v}, torch::kFloat32).cuda(); };
  const PairErrors e{cuda(w::kPairPolicyW), cuda(w::kPairPolicyL), cuda(w::kPairRefW),
                     cuda(w::kPairRefL)};
  const auto t = torch::tensor({w::kPairT}, torch::kInt64).cuda();
  const auto out = compute_method(Method::kDde, e, t, f64(w::kPairCorrection), {}, schedule());
  EXPECT_TRUE(out.loss.is_cuda());
  EXPECT_LE(w::relative_error(item(out.loss.cpu()), 0.26166530), 1e-5);
  EXPECT_TRUE(transition_estimate(e, t, schedule()).is_cuda());
}

}  // namespace
}  // namespace dde::objective

// ---- §7.4: per-t-bin diagnostic sums ----
namespace dde::objective {
namespace t_bin_tests {

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

}  // namespace t_bin_tests
}  // namespace dde::objective
