// The figures of one optimizer step and the records they become in metrics.jsonl (kind "step"
// and, with logging.per_sample, kind "pair"; docs/formats.md section 5).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "dde/objective/methods.hpp"
#include "dde/train/memory_meter.hpp"

namespace dde::train {

// Columns of a per-pair record row, gathered from every rank to rank 0.
enum PairColumn : int64_t {
  kPairId,
  kT,
  kPolicyW,
  kPolicyL,
  kRefW,
  kRefL,
  kCorrection,
  kZ,
  kLoss,
  kCredit,
  kPairColumns
};

// One micro-batch's per-pair rows [B, kPairColumns] float64 on `device` (NaN where the method has
// no such value): host columns go there without a sync.
torch::Tensor pair_rows(const torch::Tensor& pair_ids, const torch::Tensor& t,
                        const objective::PairErrors& errors, const torch::Tensor& correction,
                        const objective::MethodOutput& out, const torch::Tensor& credit,
                        const torch::Device& device);

// A step's figures over every rank, summed: what step_stats() holds, read on the host.
struct StepFigures {
  double loss_sum = 0;          // the method's loss, summed over the pairs
  double pairs = 0;             // pairs of the step
  double z_positive = 0;        // pairs with z > 0 (the method's own implicit accuracy)
  double mse_policy_w_sum = 0;  // the policy's winner errors, summed
  double mse_ref_w_sum = 0;     // the reference's winner errors, summed
  int64_t bad_in_step = 0;      // bad pairs skipped in the step
  int64_t bad_total = 0;        // bad pairs skipped since the start of the run
  double mean_loss() const { return loss_sum / pairs; }
  // From the all-reduced step_stats() tensor, on the host.
  static StepFigures from_stats(const torch::Tensor& stats);
};

// A rank's contribution to StepFigures as one float64 device tensor [7], from its rows
// ([n, kPairColumns] float64, on the device) and its bad-pair counts: device ops only, no sync.
torch::Tensor step_stats(const torch::Tensor& rows, bool has_z, bool has_reference,
                         int64_t bad_in_step, int64_t bad_total);

// The per-t-bin figures (docs/method.md §7.4) from the all-reduced sums [4, 10]: pairs, and per
// bin the fraction ranked the wrong way (Delta > 0), the mean credit and the mean z (null where a
// bin had no pair, or the method has no reference / no z).
nlohmann::json t_bin_record(const torch::Tensor& sums, bool has_z, bool has_reference);

// What a step record holds besides its figures.
struct StepContext {
  int64_t step = 0;  // steps done, this one included
  double lr = 0, grad_norm = 0;
  double seconds = 0, waited = 0;  // the step's wall time, and how much of it waited for data
  double worker_cpu = 0;           // the decode workers' CPU seconds during the step
  int64_t intra_op_threads = 1;    // LibTorch's intra-op threads during the step
  int64_t skipped_steps = 0, epoch = 0;
  StepMemory memory;
  bool has_z = false, has_reference = false;
  torch::Tensor t_bins;  // the all-reduced [4, 10] sums
};
nlohmann::json step_record(const StepFigures& figures, const StepContext& context);

// One row of per-pair values ([kPairColumns], NaN where a method has none) as a "pair" record.
nlohmann::json pair_record(const double* row, int64_t step, int64_t rank);

// "hh:mm:ss", or "--:--:--" when unknown.
std::string format_duration(double seconds);

}  // namespace dde::train
