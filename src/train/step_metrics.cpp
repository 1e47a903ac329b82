#include "dde/train/step_metrics.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "dde/objective/methods.hpp"
#include "dde/util/transfer.hpp"

namespace dde::train {

using nlohmann::json;

torch::Tensor pair_rows(const torch::Tensor& pair_ids, const torch::Tensor& t,
                        const objective::PairErrors& errors, const torch::Tensor& correction,
                        const objective::MethodOutput& out, const torch::Tensor& credit,
                        const torch::Device& device) {
  const auto f64 = [&](const torch::Tensor& x) {
    return x.detach().to(device, torch::kFloat64, /*non_blocking=*/true);
  };
  const torch::Tensor nan =
      torch::full({pair_ids.size(0)}, std::numeric_limits<double>::quiet_NaN(),
                  torch::dtype(torch::kFloat64).device(device));
  return torch::stack({f64(pair_ids), f64(t), f64(errors.policy_w), f64(errors.policy_l),
                       errors.ref_w.defined() ? f64(errors.ref_w) : nan,
                       errors.ref_l.defined() ? f64(errors.ref_l) : nan, f64(correction),
                       out.z.defined() ? f64(out.z) : nan, f64(out.loss), f64(credit)},
                      1);
}

StepFigures StepFigures::from_stats(const torch::Tensor& stats) {
  const torch::Tensor host = stats.to(torch::kCPU);
  const auto f = host.accessor<double, 1>();
  StepFigures s;
  s.loss_sum = f[0];
  s.pairs = f[1];
  s.z_positive = f[2];
  s.mse_policy_w_sum = f[3];
  s.mse_ref_w_sum = f[4];
  s.bad_in_step = static_cast<int64_t>(f[5]);
  s.bad_total = static_cast<int64_t>(f[6]);
  return s;
}

torch::Tensor step_stats(const torch::Tensor& rows, bool has_z, bool has_reference,
                         int64_t bad_in_step, int64_t bad_total) {
  const torch::Tensor zero = torch::zeros({}, rows.options());
  const torch::Tensor figures = torch::stack(
      {rows.select(1, kLoss).sum(),
       torch::full({}, static_cast<double>(rows.size(0)), rows.options()),
       has_z ? (rows.select(1, kZ) > 0).sum().to(torch::kFloat64) : zero,
       rows.select(1, kPolicyW).sum(), has_reference ? rows.select(1, kRefW).sum() : zero});
  // The host counts go to the device without a sync.
  const torch::Tensor counts = torch::tensor(
      {static_cast<double>(bad_in_step), static_cast<double>(bad_total)}, torch::kFloat64);
  return torch::cat({figures, util::to_device_async(counts, rows.device())});
}

json t_bin_record(const torch::Tensor& sums, bool has_z, bool has_reference) {
  const auto a = sums.accessor<double, 2>();
  json pairs = json::array(), misranked = json::array(), credit = json::array(), z = json::array();
  for (int64_t b = 0; b < sums.size(1); ++b) {
    const double n = a[objective::kTBinPairs][b];
    const auto mean = [&](int64_t row, bool defined) {
      return n > 0 && defined ? json(a[row][b] / n) : json(nullptr);
    };
    pairs.push_back(static_cast<int64_t>(n));
    misranked.push_back(mean(objective::kTBinMisranked, has_reference));
    credit.push_back(mean(objective::kTBinCredit, true));
    z.push_back(mean(objective::kTBinZ, has_z));
  }
  return {{"pairs", pairs}, {"misranked", misranked}, {"credit", credit}, {"z", z}};
}

json step_record(const StepFigures& figures, const StepContext& c) {
  const double pairs = figures.pairs;
  json rec = {{"kind", "step"},
              {"step", c.step},
              {"loss", figures.mean_loss()},
              {"lr", c.lr},
              {"grad_norm", c.grad_norm},
              {"mse_policy", figures.mse_policy_w_sum / pairs},
              {"pairs_per_s", pairs / c.seconds},
              {"data_wait_frac", c.seconds > 0 ? std::min(1.0, c.waited / c.seconds) : 0.0},
              {"decode_cpu", c.seconds > 0 ? c.worker_cpu / c.seconds : 0.0},
              {"intra_op_threads", c.intra_op_threads},
              {"skipped_steps", c.skipped_steps},
              {"mem_held_mb", c.memory.held_mb},
              {"mem_peak_mb", c.memory.peak_mb},
              {"mem_forward_peak_mb", c.memory.forward_peak_mb},
              {"bad_pairs", figures.bad_total},
              {"epoch", c.epoch}};
  rec["implicit_acc"] = c.has_z ? json(figures.z_positive / pairs) : json(nullptr);
  rec["mse_ref"] = c.has_reference ? json(figures.mse_ref_w_sum / pairs) : json(nullptr);
  rec["t_bins"] = t_bin_record(c.t_bins.to(torch::kCPU), c.has_z, c.has_reference);
  return rec;
}

json pair_record(const double* row, int64_t step, int64_t rank) {
  const auto number_or_null = [](double v) { return std::isnan(v) ? json(nullptr) : json(v); };
  return {{"kind", "pair"},
          {"step", step},
          {"rank", rank},
          {"pair_id", static_cast<int64_t>(row[kPairId])},
          {"t", static_cast<int64_t>(row[kT])},
          {"mse_policy_w", row[kPolicyW]},
          {"mse_policy_l", row[kPolicyL]},
          {"mse_ref_w", number_or_null(row[kRefW])},
          {"mse_ref_l", number_or_null(row[kRefL])},
          {"correction", row[kCorrection]},
          {"z", number_or_null(row[kZ])},
          {"loss", number_or_null(row[kLoss])},
          {"credit", number_or_null(row[kCredit])}};
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--:--";
  const auto s = static_cast<int64_t>(seconds);
  return fmt::format("{:02d}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60);
}

}  // namespace dde::train
