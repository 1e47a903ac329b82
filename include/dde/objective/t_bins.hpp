// Where the credit goes, per step (docs/method.md §7.4): per-pair diagnostics summed in equal bins
// of t. Sums, not means, so that the trainer can add them over micro-batches, all-reduce them and
// divide by the pair count once.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace dde::objective {

// Rows of t_bin_sums().
constexpr int64_t kTBinPairs = 0;      // number of pairs
constexpr int64_t kTBinMisranked = 1;  // pairs with Delta > 0 (ranked the wrong way)
constexpr int64_t kTBinCredit = 2;     // sum of the credit k_t sigmoid(-z)
constexpr int64_t kTBinZ = 3;          // sum of z
constexpr int64_t kTBinRows = 4;

// [4, bins] float64 on t's device, bin = floor(t * bins / T): bins equal bins of t over [0, T).
// t: [B] int64; delta, credit, z: [B] floating point, on t's device (detached here). delta and z
// may be undefined (sft has neither): their rows are then zero. No host sync: t's values are not
// checked (compute_method has done that); one out of [0, T) is counted in the nearest end bin.
// On CUDA the sums are atomic adds, so their last bits may vary from run to run.
torch::Tensor t_bin_sums(const torch::Tensor& t, const torch::Tensor& delta,
                         const torch::Tensor& credit, const torch::Tensor& z, int64_t num_timesteps,
                         int64_t bins = 10);

}  // namespace dde::objective
