#include "dde/objective/correction_ema.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "dde/util/error.hpp"
#include "dde/util/transfer.hpp"
#include "tensor_checks.hpp"

namespace dde::objective {

namespace {

const auto kFloat64Cpu = torch::TensorOptions().dtype(torch::kFloat64);

void check_momentum(double momentum, const std::string& where) {
  if (!(momentum >= 0.0 && momentum < 1.0)) {
    throw Error({"bad EMA momentum", where, "in [0, 1)", std::to_string(momentum),
                 "set method.ema_momentum (default 0.9)"});
  }
}

void check_pending(const torch::Tensor& x, int64_t T, const torch::Device& device,
                   const std::string& where) {
  if (!x.defined() || x.dim() != 1 || x.size(0) != T || x.scalar_type() != torch::kFloat64 ||
      x.device() != device) {
    throw Error({"pending EMA sums were replaced", where,
                 "float64 [" + std::to_string(T) + "] on " + device.str(), detail::describe(x),
                 "all-reduce pending_sum()/pending_count() in place"});
  }
}

// n of a checkpoint as [T] int64: empty is all zero; else length T with 0 <= n[k] <= updates (one
// update per apply() at most). With debias, an E[k] != 0 needs n[k] >= 1, or C_t would drop it.
torch::Tensor checked_counts(const CorrectionEma::State& state, int64_t T, bool debias,
                             const std::string& where) {
  auto counts = torch::zeros({T}, torch::kInt64);
  if (!state.counts.empty()) {
    if (static_cast<int64_t>(state.counts.size()) != T) {
      throw Error({"correction EMA length mismatch", where + ": counts",
                   "length T = " + std::to_string(T) + " (or none)",
                   std::to_string(state.counts.size()),
                   "the checkpoint was written with a different noise schedule"});
    }
    for (const int64_t n : state.counts) {
      if (n < 0 || n > state.updates) {
        throw Error({"corrupt correction EMA", where + ": counts",
                     "0 <= n[k] <= updates = " + std::to_string(state.updates), std::to_string(n),
                     "the checkpoint is damaged; resume from an earlier one"});
      }
    }
    counts = torch::tensor(state.counts, torch::kInt64);
  }
  if (debias) {
    for (size_t k = 0; k < state.E.size(); ++k) {
      if (state.E[k] != 0.0 && (state.counts.empty() || state.counts[k] == 0)) {
        throw Error({"correction EMA without update counts", where + ": counts",
                     "n[k] >= 1 wherever E[k] != 0 (method.ema_debias reads them)",
                     "E[" + std::to_string(k) + "] != 0 with n = 0",
                     "the checkpoint predates ema_debias or was resumed from one; resume with "
                     "method.ema_debias: false"});
      }
    }
  }
  return counts;
}

// Ê[k] = E[k] / (1 - mu^n[k]) for n[k] >= 1, 0 for n[k] = 0 (§7.2).
double debiased(double e, int64_t n, double momentum) {
  return n == 0 ? 0.0 : e / (1.0 - std::pow(momentum, static_cast<double>(n)));
}

}  // namespace

CorrectionEma::CorrectionEma(int64_t num_timesteps, double momentum,
                             const torch::Device& pending_device, bool debias)
    : num_timesteps_(num_timesteps),
      momentum_(momentum),
      pending_device_(pending_device),
      debias_(debias) {
  if (num_timesteps < 1) {
    throw Error({"bad EMA length", "CorrectionEma: num_timesteps", ">= 1",
                 std::to_string(num_timesteps), ""});
  }
  check_momentum(momentum, "CorrectionEma: momentum");
  E_ = torch::zeros({num_timesteps}, kFloat64Cpu);
  counts_ = torch::zeros({num_timesteps}, torch::kInt64);
  suffix_ = torch::zeros({num_timesteps}, kFloat64Cpu);
  pending_sum_ = torch::zeros({num_timesteps}, kFloat64Cpu.device(pending_device));
  pending_count_ = torch::zeros({num_timesteps}, kFloat64Cpu.device(pending_device));
}

torch::Tensor CorrectionEma::correction(const torch::Tensor& t) const {
  detail::check_timesteps(t, "CorrectionEma::correction: t", -1, num_timesteps_);
  return util::to_device_async(suffix_.index_select(0, t.to(torch::kCPU)), t.device());
}

void CorrectionEma::accumulate(const torch::Tensor& t, const torch::Tensor& d) {
  const std::string where = "CorrectionEma::accumulate";
  detail::check_vector(d, where + ": d", -1);
  detail::check_timesteps(t, where + ": t", d.size(0), num_timesteps_);
  // Non-finite values are accepted here and refused by apply(): the trainer's non-finite guard
  // sees the step's loss first and calls clear_pending() for a skipped step.
  const auto values = d.detach().to(pending_device_, torch::kFloat64);
  const auto index = util::to_device_async(t, pending_device_);
  pending_sum_.index_add_(0, index, values);
  pending_count_.index_add_(0, index, torch::ones_like(values));
}

void CorrectionEma::apply() {
  const std::string where = "CorrectionEma::apply";
  check_pending(pending_sum_, num_timesteps_, pending_device_, where + ": pending_sum");
  check_pending(pending_count_, num_timesteps_, pending_device_, where + ": pending_count");
  const torch::Tensor sum = pending_sum_.to(torch::kCPU);
  const torch::Tensor count = pending_count_.to(torch::kCPU);
  if (!torch::isfinite(sum).all().item<bool>() || !torch::isfinite(count).all().item<bool>() ||
      (count < 0).any().item<bool>()) {
    throw Error(
        {"non-finite or negative pending EMA sums", where, "finite sums and counts >= 0",
         "NaN, inf or a negative count",
         "a step with a non-finite loss must be skipped with clear_pending(), not applied"});
  }
  const auto seen = count > 0;
  const auto mean = sum / count.clamp_min(1.0);
  E_ = torch::where(seen, momentum_ * E_ + (1.0 - momentum_) * mean, E_);
  counts_ += seen.to(torch::kInt64);
  recompute_suffix();
  clear_pending();
  ++updates_;
}

void CorrectionEma::clear_pending() {
  pending_sum_.zero_();
  pending_count_.zero_();
}

void CorrectionEma::recompute_suffix() {
  // suffix[t] = sum_{k=t+1}^{T-1} E[k] (Ê[k] with debias): one reverse pass in float64, O(T).
  const auto E = E_.contiguous();
  const auto counts = counts_.contiguous();
  const double* e = E.data_ptr<double>();
  const int64_t* n = counts.data_ptr<int64_t>();
  double* out = suffix_.data_ptr<double>();
  double running = 0.0;
  for (int64_t t = num_timesteps_ - 1; t >= 0; --t) {
    out[t] = running;
    running += debias_ ? debiased(e[t], n[t], momentum_) : e[t];
  }
}

CorrectionEma::State CorrectionEma::state() const {
  const auto E = E_.contiguous();
  const auto counts = counts_.contiguous();
  return {std::vector<double>(E.data_ptr<double>(), E.data_ptr<double>() + num_timesteps_),
          momentum_, updates_,
          std::vector<int64_t>(counts.data_ptr<int64_t>(),
                               counts.data_ptr<int64_t>() + num_timesteps_)};
}

void CorrectionEma::load_state(const State& state) {
  const std::string where = "CorrectionEma::load_state";
  if (static_cast<int64_t>(state.E.size()) != num_timesteps_) {
    throw Error({"correction EMA length mismatch", where + ": E",
                 "length T = " + std::to_string(num_timesteps_), std::to_string(state.E.size()),
                 "the checkpoint was written with a different noise schedule"});
  }
  for (const double v : state.E) {
    if (!std::isfinite(v)) {
      throw Error({"corrupt correction EMA", where + ": E", "finite values", "NaN or inf",
                   "the checkpoint is damaged; resume from an earlier one"});
    }
  }
  if (std::abs(state.momentum - momentum_) > 1e-12 * std::max(1.0, std::abs(momentum_))) {
    throw Error({"correction EMA momentum mismatch", where + ": momentum",
                 std::to_string(momentum_) + " (this run's method.ema_momentum)",
                 std::to_string(state.momentum),
                 "resume with the method.ema_momentum the checkpoint was trained with"});
  }
  if (state.updates < 0) {
    throw Error(
        {"corrupt correction EMA", where + ": updates", ">= 0", std::to_string(state.updates), ""});
  }
  auto counts = checked_counts(state, num_timesteps_, debias_, where);
  E_ = torch::tensor(state.E, kFloat64Cpu);
  counts_ = std::move(counts);
  updates_ = state.updates;
  recompute_suffix();
  clear_pending();
}

}  // namespace dde::objective
