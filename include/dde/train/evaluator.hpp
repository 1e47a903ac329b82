// Held-out preference accuracy: "did my model get better?" (config data.eval_index, section eval).
//
// At step 0 (before training), every eval.every steps and at the last step, every held-out pair
// (data/held_out_pairs.hpp: no flip, center crop, caption kept) is evaluated at every t of
// eval.t_bins, under no_grad, with
//   VAE posterior noise from mix_seed(eval.seed, pair id, 0) (winner then loser), and
//   the pair's eps at bin t from mix_seed(eval.seed, pair id, 1 + t),
// so the numbers are comparable across steps, methods, run seeds and world sizes. Per bin:
//   implicit_acc = fraction of pairs with Delta < 0 (Diffusion-DPO's implicit accuracy of Delta:
//                  the policy improved more on the winner than on the loser, relative to the
//                  reference); the same number for every method, sft included (its reference is
//                  the initial model, loaded for the first evaluation only);
//   loss         = the method's own loss (z with the current correction array E for dde_step and
//                  dde; the winner MSE for sft);
//   delta        = mean Delta.
// The reference errors never change, so they are computed once, with the encoded latents and text
// conditioning of the pairs (kept on the CPU); later evaluations run the policy UNet only.
// Every rank evaluates its share (pair i on rank i % world); sums are all-reduced; rank 0 writes
// the metrics.jsonl record (kind "eval") and the log line.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/dist/communicator.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/objective/correction_ema.hpp"
#include "dde/objective/methods.hpp"
#include "dde/objective/schedule.hpp"
#include "dde/train/metrics_log.hpp"

namespace dde::train {

struct EvalResult {
  int64_t step = 0;
  int64_t pairs = 0;  // held-out pairs, all ranks
  std::vector<int64_t> t_bins;
  std::vector<double> implicit_acc_by_t, loss_by_t, delta_by_t;  // means over the pairs, per t
  // docs/method.md §7.4: the fraction with Delta > 0, the mean credit k_t sigmoid(-z), the mean z
  std::vector<double> misranked_by_t, credit_by_t, z_by_t;
  double implicit_acc = 0.0, loss = 0.0, delta = 0.0;  // means over pairs and bins
  double seconds = 0.0;                                // wall time of the evaluation

  nlohmann::json to_json(const std::string& method) const;  // the record of kind "eval"
};

// eps prediction of a UNet; the trainer passes its own (precision, autocast) path.
using PredictFn =
    std::function<torch::Tensor(models::UNet&, const torch::Tensor& x, const torch::Tensor& t,
                                const models::Conditioning& cond)>;

struct EvaluatorContext {
  const config::TrainConfig* cfg = nullptr;
  const models::Manifest* manifest = nullptr;
  const models::Manifest* reference_manifest = nullptr;  // loaded for sft's first evaluation
  models::UNet* policy = nullptr;
  models::UNet* reference = nullptr;  // nullptr for sft
  models::TextConditioner* text = nullptr;
  models::LatentEncoder* vae = nullptr;
  PredictFn predict;
  const objective::NoiseSchedule* schedule = nullptr;
  objective::Method method = objective::Method::kDde;
  objective::MethodParams method_params;
  dist::Communicator* comm = nullptr;
  torch::Device device = torch::kCPU;
  int64_t resolution = 0;
};

class Evaluator {
 public:
  // Opens and checks data.eval_index (throws dde::Error before any training step).
  explicit Evaluator(EvaluatorContext context);
  ~Evaluator();
  Evaluator(const Evaluator&) = delete;
  Evaluator& operator=(const Evaluator&) = delete;

  // step == 0, step % eval.every == 0, or step == train.max_steps.
  bool due(int64_t step) const;
  // Collective (every rank, same step): the global result, on every rank. nullopt when a stop was
  // requested (stop_signal.hpp) on any rank: each polls before every batch of pairs, then they
  // agree (one Communicator::any). A later call goes on with the encoding where it stopped.
  std::optional<EvalResult> run(int64_t step, const objective::CorrectionEma& ema);
  // If due: run, then rank 0 (metrics != nullptr) writes the record and logs a line. false when
  // the evaluation was stopped (the trainer then checkpoints and exits for requeue).
  bool run_if_due(int64_t step, const objective::CorrectionEma& ema, MetricsLog* metrics);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dde::train
