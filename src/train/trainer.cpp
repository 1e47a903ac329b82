#include "dde/train/trainer.hpp"

#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <utility>

#include "dde/dist/device.hpp"
#include "dde/models/autocast.hpp"
#include "dde/train/lr_schedule.hpp"
#include "dde/train/stop_signal.hpp"
#include "dde/util/log.hpp"
#include "dde/util/transfer.hpp"
#include "trainer_impl.hpp"

// The training loop: one optimizer step, top to bottom, in run(). The builder is
// trainer_setup.cpp, checkpoints and guards trainer_state.cpp, the pair path src/pairs/.
namespace dde::train {
namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

TrainOutcome Trainer::Impl::run() {
  run_start = Clock::now();
  first_step = step;
  log::info("training steps {} -> {} ({} pairs per step)", step, cfg.train.max_steps,
            cfg.train.global_batch);
  while (step < cfg.train.max_steps) {
    // ---- periodic work: held-out evaluation, validation images
    if (!periodic_work()) return stop_for_requeue(loader->state());
    StepWork work;
    work.start = Clock::now();
    work.wait_before = loader->wait_seconds();
    work.worker_cpu_before = loader->worker_cpu_seconds();
    work.lr = scheduled_lr(cfg.optim.schedule, step, cfg.optim.lr, cfg.optim.warmup_steps,
                           cfg.train.max_steps, cfg.optim.min_lr_ratio);
    work.poisoned = test_seam.poisons_loss(step + 1);
    work.position_at_start = loader->state();  // what a stop saves
    memory.begin_step();
    // ---- micro-batches -> backward (gradients accumulate locally)
    if (!run_micro_batches(work)) return stop_for_requeue(work.position_at_start);
    // ---- reduce: gradients (all-reduced, or reduce-scattered when sharded), figures
    const StepFigures figures = reduce(work);
    // ---- update: guard -> clip -> optimizer -> correction EMA
    update(work, figures);
    optimizer->zero_grad();
    ++step;
    // ---- metrics (rank 0, global figures), progress; stops; checkpoint
    write_step_metrics(work, figures);
    tune_threads(work);
    after_step(work, figures);
  }
  if (!periodic_work()) {
    return stop_for_requeue(loader->state());  // the resumed run evaluates the last step again
  }
  return {step, skipped_steps, last_checkpoint, /*preempted=*/false};
}

bool Trainer::Impl::periodic_work() {
  if (evaluator && !evaluator->run_if_due(step, ema, metrics.get())) return false;
  if (samples && samples->due(step)) {
    const auto start = Clock::now();
    const std::string path = samples->write(
        step,
        [this](const torch::Tensor& x, const torch::Tensor& t, const models::Conditioning& cond) {
          return predict(*policy, x, t, cond);
        },
        metrics.get());
    log::info("step {}: validation images {} ({:.1f} s)", step, path,
              std::chrono::duration<double>(Clock::now() - start).count());
  }
  return true;
}

bool Trainer::Impl::run_micro_batches(StepWork& work) {
  // Rows (and the EMA's pending sums) stay on the device: no host sync inside this loop,
  // which run.cuda_sync_debug: error enforces on a GPU.
  bool stopped = false;  // this rank saw the stop flag before one of its micro-batches
  {
    const dist::CudaSyncDebugScope sync_debug(device.is_cuda() ? cfg.run.cuda_sync_debug
                                                               : std::string("off"));
    for (int64_t micro = 0; micro < accumulation; ++micro) {
      test_seam.before_micro_batch(comm->rank(), step + 1, micro);
      if (stop_requested()) {  // an atomic load: the ranks agree once, after the loop
        stopped = true;
        break;
      }
      const data::PairBatch batch = loader->next();
      MicroResult r = micro_step(batch, micro == 0 && step + 1 == cfg.logging.dump_step);
      if (micro == 0) memory.mark_forward();
      // Sum over pairs / global batch: the all-reduced sum of gradients is the batch mean's.
      torch::Tensor loss = r.loss_sum / static_cast<double>(cfg.train.global_batch);
      if (work.poisoned) loss = loss * std::numeric_limits<double>::quiet_NaN();
      loss.backward();
      work.has_z = r.has_z;
      work.rows.push_back(r.rows);
      work.t_bins = work.t_bins.defined() ? work.t_bins + r.t_bins : r.t_bins;
    }
  }
  // Every rank must take the same branch: one collective per step, before the gradient reduce.
  // A rank that was not signalled finishes its micro-batches first (SLURM signals every task).
  return !comm->any(stopped);
}

StepFigures Trainer::Impl::reduce(StepWork& work) {
  const torch::Tensor local_rows = torch::cat(work.rows, 0);  // [n, kPairColumns] on the device
  const std::vector<data::BadPair> bad_pairs = loader->take_bad_pairs();
  torch::Tensor stats =
      step_stats(local_rows, work.has_z, reference != nullptr,
                 static_cast<int64_t>(bad_pairs.size()), loader->counters().bad_pairs);
  optimizer->reduce_gradients();
  std::vector<torch::Tensor> reduced{stats, ema.pending_sum(), ema.pending_count(), work.t_bins};
  comm->all_reduce_sum(reduced, kBucketBytes);
  // The rows reach the host once per step (rank 0 writes them).
  if (cfg.logging.per_sample) work.all_rows = comm->all_gather(local_rows).to(torch::kCPU);
  const StepFigures figures = StepFigures::from_stats(stats);
  report_bad_pairs(figures.bad_total, figures.bad_in_step, bad_pairs);
  return figures;
}

void Trainer::Impl::update(StepWork& work, const StepFigures& figures) {
  work.grad_norm = optimizer->clip_grad_norm(cfg.optim.grad_clip);
  const double mean_loss = figures.mean_loss();
  if (std::isfinite(work.grad_norm) && std::isfinite(mean_loss) && !work.poisoned) {
    optimizer->step(work.lr);
    const std::string failed = check_update();
    if (failed.empty()) {
      ema.apply();
      nonfinite_in_row = 0;
      rolled_back = false;
      work.passed = true;
      return;
    }
    ema.clear_pending();
    ++skipped_steps;
    ++nonfinite_in_row;
    failure_cause = "weights after the update";
    roll_back(failed);
    return;
  }
  ema.clear_pending();
  ++skipped_steps;
  ++nonfinite_in_row;
  // The frozen reference's errors are non-finite only when its inputs are.
  const bool inputs = reference != nullptr && !std::isfinite(figures.mse_ref_w_sum);
  failure_cause = inputs ? "inputs" : std::isfinite(mean_loss) ? "gradient" : "loss";
  log::warn(
      "step {}: non-finite {} (loss {}, grad norm {}): update skipped ({} in a row, limit {})",
      step + 1, failure_cause, mean_loss, work.grad_norm, nonfinite_in_row,
      cfg.optim.max_nonfinite_in_row);
}

void Trainer::Impl::tune_threads(const StepWork& work) {
  if (thread_tuner.decided()) return;
  const double seconds = std::chrono::duration<double>(Clock::now() - work.start).count();
  const int64_t threads =
      thread_tuner.after_step(seconds, loader->worker_cpu_seconds() - work.worker_cpu_before);
  if (thread_tuner.changed_last_step()) at::set_num_threads(static_cast<int>(threads));
  if (thread_tuner.decided()) log::info("step {}: threads: {}", step, thread_tuner.summary());
}

void Trainer::Impl::write_step_metrics(const StepWork& work, const StepFigures& figures) {
  StepContext c;
  c.memory = memory.end_step();
  c.seconds = std::chrono::duration<double>(Clock::now() - work.start).count();
  c.waited = loader->wait_seconds() - work.wait_before;
  c.worker_cpu = loader->worker_cpu_seconds() - work.worker_cpu_before;
  c.intra_op_threads = at::get_num_threads();
  if (!is_main()) return;
  c.step = step;
  c.lr = work.lr;
  c.grad_norm = work.grad_norm;
  c.skipped_steps = skipped_steps;
  c.epoch = loader->state().epoch;
  c.has_z = work.has_z;
  c.has_reference = reference != nullptr;
  c.t_bins = work.t_bins;
  const nlohmann::json rec = step_record(figures, c);
  if (cfg.logging.per_sample) write_pair_records(work.all_rows);
  metrics->write(rec);
  const int64_t max_steps = cfg.train.max_steps;
  if (cfg.logging.progress && (step % cfg.logging.every == 0 || step == max_steps)) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
    const double per_step = elapsed / static_cast<double>(step - first_step);
    log::info(
        "step {}/{} | loss {:.4f} | acc {} | {:.1f} pairs/s | data wait {:.0f}% | ETA {}", step,
        max_steps, figures.mean_loss(),
        work.has_z ? fmt::format("{:.3f}", rec["implicit_acc"].get<double>()) : std::string("-"),
        rec["pairs_per_s"].get<double>(), 100.0 * rec["data_wait_frac"].get<double>(),
        format_duration(per_step * static_cast<double>(max_steps - step)));
  }
}

void Trainer::Impl::after_step(const StepWork& work, const StepFigures& figures) {
  if (nonfinite_in_row >= cfg.optim.max_nonfinite_in_row) stop_after_failed_steps();
  // The same global count on every rank.
  if (figures.bad_total > cfg.data.max_bad_pairs) stop_for_bad_pairs(figures.bad_total);
  // Only weights that passed the checks are checkpointed (rotation then never deletes the
  // newest good checkpoint for a bad one).
  if (step % cfg.checkpoint.every == 0 || step == cfg.train.max_steps) {
    if (work.passed) {
      save_checkpoint(loader->state());
    } else {
      log::warn("step {}: not checkpointed: the step failed ({})", step, failure_cause);
    }
  }
}

torch::Tensor Trainer::Impl::to_device(const torch::Tensor& x) const {
  return util::to_device_async(x, device);
}

torch::Tensor Trainer::Impl::predict(models::UNet& unet, const torch::Tensor& x,
                                     const torch::Tensor& t, const models::Conditioning& cond) {
  const models::AutocastScope autocast(device.type(), cfg.train.precision == "bf16");
  return unet.predict_noise(x, t, cond);
}

Trainer::Impl::MicroResult Trainer::Impl::micro_step(const data::PairBatch& batch, bool dump) {
  const int64_t B = batch.pair_ids.size(0);
  // Per-pair randomness from (seed, pair id): the same pair gets the same t and noise whatever
  // the world size, micro-batch or resume point. One t and one eps per pair, shared by winner
  // and loser (Diffusion-DPO); the VAE posterior is sampled per image.
  const pairs::TrainingDraws draws =
      pairs::draw_training(batch.pair_ids, cfg.run.seed, *sampler, pair_path->latent_shape());
  const torch::Tensor& t = draws.t;  // [B] int64, stays on the host (no device sync)
  const torch::Tensor eps_pair = to_device(draws.eps);
  const pairs::EncodedPairs encoded = pair_path->encode(batch, draws.vae_noise);
  const torch::Tensor eps = torch::cat({eps_pair, eps_pair}, 0);
  const torch::Tensor t2 = torch::cat({t, t}, 0);
  const auto errors_of = [&](models::UNet& unet) {
    return pair_path->errors([&](const torch::Tensor& x, const torch::Tensor& tt,
                                 const models::Conditioning& c) { return predict(unet, x, tt, c); },
                             encoded.latents, eps, t2, encoded.cond);
  };

  objective::PairErrors errors;
  const torch::Tensor e_policy = errors_of(*policy);
  errors.policy_w = e_policy.slice(0, 0, B);
  errors.policy_l = e_policy.slice(0, B, 2 * B);
  if (reference) {
    torch::NoGradGuard no_grad;
    const torch::Tensor e_ref = errors_of(*reference);
    errors.ref_w = e_ref.slice(0, 0, B);
    errors.ref_l = e_ref.slice(0, B, 2 * B);
  }
  const torch::Tensor C_t = to_device(ema.correction(t));
  const objective::MethodOutput out =
      objective::compute_method(method, errors, t, C_t, method_params, schedule);

  if (dump) dump_micro_batch(batch, draws, encoded, errors);

  MicroResult r;
  const torch::Tensor credit = objective::credit_weight(method, out, t, schedule);
  r.t_bins = objective::t_bin_sums(
      to_device(t), reference ? objective::delta(errors).detach() : torch::Tensor(), credit,
      out.z.defined() ? out.z.detach() : torch::Tensor(), manifest.num_train_timesteps);
  r.loss_sum = out.loss.sum();
  r.errors = errors;
  r.has_z = out.z.defined();
  // The rows stay on the device (host columns go there without a sync); run() copies them to
  // the host once per optimizer step.
  r.rows = pair_rows(batch.pair_ids, t, errors, C_t, out, credit, device);
  if (objective::uses_reference(method)) {
    ema.accumulate(t, objective::transition_estimate(errors, t, schedule));
  }
  return r;
}

}  // namespace dde::train
