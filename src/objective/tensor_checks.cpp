#include "tensor_checks.hpp"

#include "dde/util/error.hpp"

namespace dde::objective::detail {

std::string describe(const torch::Tensor& x) {
  if (!x.defined()) {
    return "undefined";
  }
  return std::string(c10::toString(x.scalar_type())) + " " + c10::str(x.sizes()) + " on " +
         x.device().str();
}

namespace {
std::string vector_text(int64_t size) {
  return size < 0 ? "a 1-D tensor [B]" : "a 1-D tensor [" + std::to_string(size) + "]";
}
}  // namespace

void check_vector(const torch::Tensor& x, const std::string& where, int64_t size) {
  if (!x.defined() || x.dim() != 1 || (size >= 0 && x.size(0) != size) || !x.is_floating_point()) {
    throw Error({"bad tensor argument", where, "floating-point " + vector_text(size), describe(x),
                 "pass one value per pair"});
  }
}

void check_timesteps(const torch::Tensor& t, const std::string& where, int64_t size,
                     int64_t num_timesteps) {
  if (!t.defined() || t.dim() != 1 || (size >= 0 && t.size(0) != size) ||
      t.scalar_type() != torch::kInt64) {
    throw Error({"bad timestep tensor", where, "int64 " + vector_text(size), describe(t),
                 "pass one int64 timestep per pair"});
  }
  if (t.numel() == 0) {
    return;
  }
  const auto cpu = t.to(torch::kCPU);
  const int64_t lo = cpu.min().item<int64_t>();
  const int64_t hi = cpu.max().item<int64_t>();
  if (lo < 0 || hi >= num_timesteps) {
    throw Error({"timestep out of range", where,
                 "values in [0, " + std::to_string(num_timesteps) + ")",
                 "min " + std::to_string(lo) + ", max " + std::to_string(hi),
                 "timesteps index the noise schedule's tables"});
  }
}

}  // namespace dde::objective::detail
