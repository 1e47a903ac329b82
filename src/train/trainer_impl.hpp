// The trainer's state and its parts, shared by the files of the trainer (private to src/train):
//   trainer.cpp        the loop: one optimizer step top to bottom
//   trainer_setup.cpp  the builder: models, data, optimizer, outputs, from the config
//   trainer_state.cpp  checkpoints, resume, the update guard and roll-back, stops
//   trainer_outputs.cpp  per-pair records, bad-pair records, the debug dump of a micro-batch
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/checkpoint/training_checkpoint.hpp"
#include "dde/config/config.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/dist/communicator.hpp"
#include "dde/dist/environment.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/models/manifest.hpp"
#include "dde/models/unet.hpp"
#include "dde/objective/correction_ema.hpp"
#include "dde/objective/methods.hpp"
#include "dde/objective/schedule.hpp"
#include "dde/objective/timestep_sampler.hpp"
#include "dde/pairs/pair_path.hpp"
#include "dde/train/data_parallel_optimizer.hpp"
#include "dde/train/evaluator.hpp"
#include "dde/train/memory_meter.hpp"
#include "dde/train/metrics_log.hpp"
#include "dde/train/step_metrics.hpp"
#include "dde/train/test_seam.hpp"
#include "dde/train/trainer.hpp"
#include "dde/train/validation_images.hpp"
#include "dde/util/thread_tuner.hpp"

namespace dde::train {

constexpr int64_t kBucketBytes = 25 << 20;  // gradient all-reduce buckets, as torch DDP

// The global 2-norm of `tensors` as a 0-dim float64 device tensor: one fused reduction
// (_foreach_norm), no host sync. NaN or Inf anywhere makes it non-finite.
torch::Tensor global_norm(const std::vector<torch::Tensor>& tensors);

// What one optimizer step carries from its micro-batches to its metrics.
struct StepWork {
  std::chrono::steady_clock::time_point start;
  double wait_before = 0;                   // the loader's wait time when the step began
  double worker_cpu_before = 0;             // the decode workers' CPU time when it began
  double lr = 0;                            // this step's learning rate
  bool poisoned = false;                    // test seam: the loss is made NaN
  data::PairLoaderState position_at_start;  // what a stop saves
  std::vector<torch::Tensor> rows;          // per micro-batch [B, kPairColumns], on the device
  torch::Tensor t_bins;                     // [4, 10]: the step's per-t-bin sums (§7.4)
  bool has_z = false;
  torch::Tensor all_rows;  // every rank's rows on the host (logging.per_sample), else undefined
  double grad_norm = 0;
  bool passed = false;  // the update was applied and passed the checks
};

struct Trainer::Impl {
  config::TrainConfig cfg;
  dist::DistEnvironment env;
  torch::Device device;
  std::unique_ptr<dist::Communicator> comm;
  models::Manifest manifest;
  models::Manifest reference_manifest;
  objective::NoiseSchedule schedule;
  objective::Method method;
  objective::MethodParams method_params;
  std::unique_ptr<objective::TimestepSampler> sampler;
  objective::CorrectionEma ema;
  std::unique_ptr<models::UNet> policy;
  std::unique_ptr<models::UNet> reference;
  std::unique_ptr<models::TextConditioner> text;
  std::unique_ptr<models::LatentEncoder> vae;
  std::unique_ptr<pairs::PairPath> pair_path;  // batch -> latents, conditioning, errors
  std::unique_ptr<data::PairLoader> loader;
  std::unique_ptr<Evaluator> evaluator;       // held-out accuracy; null without data.eval_index
  std::unique_ptr<ValidationImages> samples;  // rank 0 with eval.sample.every > 0, else null
  std::unique_ptr<DataParallelOptimizer> optimizer;
  checkpoint::CheckpointStore store;
  std::unique_ptr<MetricsLog> metrics;  // rank 0 only
  MemoryMeter memory;
  TestSeam test_seam = TestSeam::from_environment();
  std::chrono::steady_clock::time_point run_start;  // of this process's run() (for the ETA)
  int64_t first_step = 0;                           // the step run() started from
  int64_t resolution = 0;
  int64_t accumulation = 0;
  int decode_worker_nice = 0;                // from the thread plan (util/threads.hpp)
  util::ThreadTuner thread_tuner{1, false};  // the default plan's adjustment (set up with it)
  int64_t step = 0;  // optimizer steps attempted so far (skipped ones included)
  int64_t skipped_steps = 0;
  int64_t nonfinite_in_row = 0;
  std::string failure_cause;  // what failed last: "loss", "gradient", "weights after the update"
  bool rolled_back = false;   // the held weights were reloaded from last_checkpoint since the
                              // last step that passed (they are saved there already)
  double weight_norm = 0;     // the policy's global weight norm after the last passing step
  std::string last_checkpoint;
  int64_t checkpointed_step = -1;  // the step last_checkpoint holds (-1: none yet)
  std::map<std::string, int64_t> bad_pairs_by_reason;  // rank 0: seen by this process
  std::string base_unet_sha256;  // LoRA: the base's identity, once computed (base_identity())

  // ---- the builder (trainer_setup.cpp)
  Impl(config::TrainConfig config, StartOptions start);
  void configure_method();
  void load_models();
  void make_loader();
  void make_evaluator();
  void start_outputs(const StartOptions& start);
  void prepare_output_dir(const StartOptions& start) const;

  // ---- the loop (trainer.cpp)
  TrainOutcome run();
  // The periodic work before a step (and after the last): held-out evaluation, validation
  // images. False when a stop was requested during the evaluation.
  bool periodic_work();
  // The step's micro-batches: forward, backward (gradients accumulate locally). False when the
  // ranks agreed to stop.
  bool run_micro_batches(StepWork& work);
  // Gradients and figures over the ranks; the step's bad pairs reported.
  StepFigures reduce(StepWork& work);
  // Guard -> clip -> optimizer (+ all-gather when sharded) -> correction, or the step skipped.
  void update(StepWork& work, const StepFigures& figures);
  void write_step_metrics(const StepWork& work, const StepFigures& figures);
  // The thread tuner's measurement of the step, and its decision applied (at::set_num_threads).
  void tune_threads(const StepWork& work);
  // Stops on too many failed steps or bad pairs; the periodic checkpoint of a passing step.
  void after_step(const StepWork& work, const StepFigures& figures);
  struct MicroResult {
    torch::Tensor loss_sum;  // scalar float64, sum over pairs of the micro-batch
    torch::Tensor rows;      // [B, kPairColumns] float64, per-pair record values
    torch::Tensor t_bins;    // [4, 10] float64 on the device: objective::t_bin_sums
    objective::PairErrors errors;
    bool has_z = false;
  };
  MicroResult micro_step(const data::PairBatch& batch, bool dump);
  void dump_micro_batch(const data::PairBatch& batch, const pairs::TrainingDraws& draws,
                        const pairs::EncodedPairs& encoded,
                        const objective::PairErrors& errors) const;
  void report_bad_pairs(int64_t total, int64_t in_step, const std::vector<data::BadPair>& local);
  void write_pair_records(const torch::Tensor& all_rows);
  // Host -> device without blocking the host: a DMA from the loader's pinned batches (a pageable
  // source is staged by the driver).
  torch::Tensor to_device(const torch::Tensor& x) const;
  torch::Tensor predict(models::UNet& unet, const torch::Tensor& x, const torch::Tensor& t,
                        const models::Conditioning& cond);
  bool is_main() const { return comm->rank() == 0; }

  // ---- state (trainer_state.cpp)
  std::string save_checkpoint(const data::PairLoaderState& position);
  checkpoint::SharedState shared_state();
  // LoRA (model.lora.rank > 0): the base's identity, lora/lora.json, and the resume check.
  const std::string& base_identity();
  std::string lora_json();
  void check_lora_resume(const std::string& dir, const checkpoint::SharedState& saved);
  void restore(const std::string& dir);
  // Returns this rank's state as read (its data position), so it is read once.
  checkpoint::RankState load_weights_and_state(const std::string& dir,
                                               const checkpoint::SharedState& saved);
  // After an update: finite weights (and optimizer state), whose norm changed by at most
  // optim.max_weight_change of it. "" when it passed, else what failed.
  std::string check_update();
  void roll_back(const std::string& why);
  TrainOutcome stop_for_requeue(const data::PairLoaderState& step_start);
  [[noreturn]] void stop_after_failed_steps();
  [[noreturn]] void stop_for_bad_pairs(int64_t bad_total);
};

}  // namespace dde::train
