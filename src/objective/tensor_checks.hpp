// Argument checks shared by the objective's functions: every bad tensor becomes a dde::Error that
// names the function and the argument, the expected shape/dtype and the one received.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace dde::objective::detail {

std::string describe(const torch::Tensor& x);  // "float32 [4] on cpu", "undefined"

// x must be defined, floating point, 1-D of length `size` (any length if size < 0).
void check_vector(const torch::Tensor& x, const std::string& where, int64_t size);

// t must be 1-D int64 of length `size` (any if size < 0) with values in [0, num_timesteps).
void check_timesteps(const torch::Tensor& t, const std::string& where, int64_t size,
                     int64_t num_timesteps);

}  // namespace dde::objective::detail
