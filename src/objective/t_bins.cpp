#include "dde/objective/t_bins.hpp"

#include <string>

#include "dde/util/error.hpp"
#include "tensor_checks.hpp"

namespace dde::objective {

namespace {

// An optional per-pair vector ([B] floating point on `device`), or zeros where undefined.
torch::Tensor row_values(const torch::Tensor& x, int64_t batch, const torch::Device& device,
                         const std::string& where) {
  if (!x.defined()) {
    return torch::zeros({batch}, torch::TensorOptions().dtype(torch::kFloat64).device(device));
  }
  detail::check_vector(x, where, batch);
  if (x.device() != device) {
    throw Error({"tensors on different devices", where, device.str() + " (as t)", x.device().str(),
                 "pass the step's per-pair tensors as computed, on one device"});
  }
  return x.detach().to(torch::kFloat64);
}

}  // namespace

torch::Tensor t_bin_sums(const torch::Tensor& t, const torch::Tensor& delta,
                         const torch::Tensor& credit, const torch::Tensor& z, int64_t num_timesteps,
                         int64_t bins) {
  const std::string where = "objective::t_bin_sums";
  if (num_timesteps < 1 || bins < 1) {
    throw Error({"bad t-bin arguments", where + ": num_timesteps, bins", ">= 1 each",
                 std::to_string(num_timesteps) + ", " + std::to_string(bins), "10 bins of T"});
  }
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != torch::kInt64) {
    throw Error({"bad timestep tensor", where + ": t", "int64 1-D tensor [B]", detail::describe(t),
                 "pass the step's timesteps, one per pair"});
  }
  torch::NoGradGuard no_grad;
  const int64_t batch = t.size(0);
  const auto device = t.device();
  detail::check_vector(credit, where + ": credit", batch);  // required; delta and z are not
  const auto misranked = row_values(delta, batch, device, where + ": delta").gt(0.0);
  const auto values =
      torch::stack({torch::ones_like(misranked, torch::kFloat64), misranked.to(torch::kFloat64),
                    row_values(credit, batch, device, where + ": credit"),
                    row_values(z, batch, device, where + ": z")});  // [4, B]
  // bin = floor(t * bins / T), computed on t's device; clamped instead of checked (no sync).
  const auto bin = torch::div(t * bins, num_timesteps, "floor").clamp(0, bins - 1);
  auto sums = torch::zeros({kTBinRows, bins}, values.options());
  sums.index_add_(1, bin, values);
  return sums;
}

}  // namespace dde::objective
