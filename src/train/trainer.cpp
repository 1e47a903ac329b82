#include "dde/train/trainer.hpp"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/checkpoint/training_checkpoint.hpp"
#include "dde/data/bad_pair_rows.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/dist/communicator.hpp"
#include "dde/dist/device.hpp"
#include "dde/dist/environment.hpp"
#include "dde/models/autocast.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/models/manifest.hpp"
#include "dde/objective/correction_ema.hpp"
#include "dde/objective/methods.hpp"
#include "dde/objective/schedule.hpp"
#include "dde/objective/timestep_sampler.hpp"
#include "dde/pairs/cache_encoder.hpp"
#include "dde/pairs/pair_path.hpp"
#include "dde/train/adamw.hpp"
#include "dde/train/data_parallel_optimizer.hpp"
#include "dde/train/evaluator.hpp"
#include "dde/train/lr_schedule.hpp"
#include "dde/train/memory_meter.hpp"
#include "dde/train/metrics_log.hpp"
#include "dde/train/stop_signal.hpp"
#include "dde/train/validation_images.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/log.hpp"
#include "dde/util/seed.hpp"
#include "dde/util/threads.hpp"
#include "dde/util/transfer.hpp"

namespace dde::train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int64_t kBucketBytes = 25 << 20;  // gradient all-reduce buckets, as torch DDP

// CUDA kernels: TF32 tensor cores for fp32 matmuls and convolutions (the fp32 master path under
// autocast and every fp32 run), and cuDNN's autotuner (the shapes are fixed by the config, so the
// first step's search pays for itself). No effect elsewhere.
void configure_cuda_kernels(const torch::Device& device, bool allow_tf32) {
  if (!device.is_cuda()) return;
  const at::Float32Precision p =
      allow_tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
  at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, p);
  at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, p);
  at::globalContext().setBenchmarkCuDNN(true);
}

// The global 2-norm of `tensors` as a 0-dim float64 device tensor: one fused reduction
// (_foreach_norm), no host sync. NaN or Inf anywhere makes it non-finite.
torch::Tensor global_norm(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> floating;
  for (const torch::Tensor& t : tensors) {
    if (t.defined() && t.is_floating_point() && t.numel() > 0) floating.push_back(t.detach());
  }
  if (floating.empty()) return torch::zeros({}, torch::kFloat64);
  const std::vector<torch::Tensor> norms = torch::_foreach_norm(floating, 2);
  return torch::stack(norms).to(torch::kFloat64).pow(2).sum().sqrt();
}

// Test hook: DDE_DEBUG_NONFINITE_STEPS="3,4" poisons the loss of those (1-based) steps.
std::set<int64_t> injected_nonfinite_steps() {
  std::set<int64_t> steps;
  const char* env = std::getenv("DDE_DEBUG_NONFINITE_STEPS");
  if (env == nullptr) return steps;
  std::stringstream ss(env);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) steps.insert(std::stoll(item));
  }
  return steps;
}

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

// The step's figures from its rows ([n, kPairColumns] float64, on the training device): loss sum,
// pairs, z > 0 count, winner mse sums (policy, reference). Device ops only: no host sync.
torch::Tensor step_stats(const torch::Tensor& rows, bool has_z, bool has_reference) {
  const torch::Tensor zero = torch::zeros({}, rows.options());
  return torch::stack({rows.select(1, kLoss).sum(),
                       torch::full({}, static_cast<double>(rows.size(0)), rows.options()),
                       has_z ? (rows.select(1, kZ) > 0).sum().to(torch::kFloat64) : zero,
                       rows.select(1, kPolicyW).sum(),
                       has_reference ? rows.select(1, kRefW).sum() : zero});
}

// Creates `dir` (and its parents) and writes a probe file in it: a path through a file, a
// dangling link or a read-only or full filesystem is an error naming the absolute path and `key`.
void create_writable_dir(const std::string& dir, const std::string& key) {
  std::error_code ec;
  const fs::path absolute = fs::absolute(dir, ec);
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    throw Error({"cannot create the folder", absolute.string() + " (" + key + ")",
                 "a folder this process can create and write",
                 ec ? ec.message() : std::string("not a folder"),
                 "choose a writable " + key + " (no file or dangling link on the way)"});
  }
  const fs::path probe = fs::path(dir) / ".dde-write-test";
  try {
    util::write_file(probe.string(), {{"ok", 2}});
  } catch (const Error& e) {
    throw Error({"the folder is not writable", absolute.string() + " (" + key + ")",
                 "a folder this process can write", e.what(), "choose a writable " + key});
  }
  fs::remove(probe, ec);
}

// The step's per-t-bin figures (docs/method.md §7.4) from the all-reduced sums [4, 10]: pairs,
// and per bin the fraction ranked the wrong way (Delta > 0), the mean credit and the mean z
// (null where a bin had no pair, or the method has no reference / no z).
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

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--:--";
  const auto s = static_cast<int64_t>(seconds);
  return fmt::format("{:02d}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60);
}

}  // namespace

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
  int64_t resolution;
  int64_t accumulation;
  int64_t step = 0;  // optimizer steps attempted so far (skipped ones included)
  int64_t skipped_steps = 0;
  int64_t nonfinite_in_row = 0;
  std::string failure_cause;  // what failed last: "loss", "gradient", "weights after the update"
  bool rolled_back = false;   // the held weights were reloaded from last_checkpoint since the
                              // last step that passed (they are saved there already)
  double weight_norm = 0;     // the policy's global weight norm after the last passing step
  std::set<int64_t> poisoned_steps;
  std::string last_checkpoint;
  int64_t checkpointed_step = -1;  // the step last_checkpoint holds (-1: none yet)
  std::map<std::string, int64_t> bad_pairs_by_reason;  // rank 0: seen by this process

  Impl(config::TrainConfig config, StartOptions start);
  void prepare_output_dir(const StartOptions& start) const;
  void restore(const std::string& dir);
  std::string save_checkpoint(const data::PairLoaderState& position);
  TrainOutcome stop_for_requeue(const data::PairLoaderState& step_start);
  checkpoint::SharedState shared_state() const;
  TrainOutcome run();
  [[noreturn]] void stop_after_failed_steps();
  void write_pair_records(const torch::Tensor& all_rows);
  // After an update: finite weights (and optimizer state), whose norm changed by at most
  // optim.max_weight_change of it. "" when it passed, else what failed.
  std::string check_update();
  void roll_back(const std::string& why);
  // Returns this rank's state as read (its data position), so it is read once.
  checkpoint::RankState load_weights_and_state(const std::string& dir,
                                               const checkpoint::SharedState& saved);
  void report_bad_pairs(int64_t total, int64_t in_step, const std::vector<data::BadPair>& local);
  bool is_main() const { return comm->rank() == 0; }
  // The periodic work before a step (and after the last): held-out evaluation, validation
  // images. False when a stop was requested during the evaluation.
  bool periodic_work();

  struct MicroResult {
    torch::Tensor loss_sum;  // scalar float64, sum over pairs of the micro-batch
    torch::Tensor rows;      // [B, kPairColumns] float64, per-pair record values
    torch::Tensor t_bins;    // [4, 10] float64 on the device: objective::t_bin_sums
    objective::PairErrors errors;
    bool has_z = false;
  };
  MicroResult micro_step(const data::PairBatch& batch, bool dump);
  void dump_micro_batch(checkpoint::NamedTensors tensors) const;
  // Host -> device without blocking the host: a DMA from the loader's pinned batches (a pageable
  // source is staged by the driver).
  torch::Tensor to_device(const torch::Tensor& x) const { return util::to_device_async(x, device); }
  torch::Tensor predict(models::UNet& unet, const torch::Tensor& x, const torch::Tensor& t,
                        const models::Conditioning& cond);
};

Trainer::Impl::Impl(config::TrainConfig config, StartOptions start)
    : cfg(std::move(config)),
      env(dist::detect_environment(cfg.dist.init_method)),
      // The rank's GPU becomes the current device before anything is allocated on it.
      device(dist::select_device(cfg.run.device, env.local_rank)),
      manifest(models::load_manifest(cfg.model.manifest)),
      reference_manifest(cfg.model.reference_manifest.empty()
                             ? manifest
                             : models::load_manifest(cfg.model.reference_manifest)),
      schedule(objective::NoiseSchedule::scaled_linear(manifest.num_train_timesteps,
                                                       manifest.beta_start, manifest.beta_end)),
      method(objective::parse_method(cfg.method.name)),
      ema(manifest.num_train_timesteps, cfg.method.ema_momentum, device, cfg.method.ema_debias),
      store((fs::path(cfg.run.output_dir) / "checkpoints").string(), cfg.checkpoint.keep) {
  log::set_rank(static_cast<int>(env.rank));
  const util::ThreadBudget threads = util::apply_thread_budget(cfg.run.threads, cfg.data.workers);
  comm = dist::Communicator::create(env, cfg.dist.backend, device,
                                    std::chrono::seconds(cfg.dist.timeout_s),
                                    cfg.dist.force_process_group);
  config::validate_against_timesteps(cfg, manifest.num_train_timesteps);
  method_params.beta = cfg.method.beta;
  if (cfg.method.temperature == "calibrated") {  // docs/method.md §7.1
    const int64_t t_hi = config::effective_t_hi(cfg.method, manifest.num_train_timesteps);
    method_params.beta =
        objective::calibrated_beta(cfg.method.beta, schedule, cfg.method.t_lo, t_hi);
    log::info("method.temperature calibrated: beta {} / G {:.6g} = {:.6g} over t in [{}, {})",
              cfg.method.beta,
              objective::single_shot_geometric_mean(schedule, cfg.method.t_lo, t_hi),
              method_params.beta, cfg.method.t_lo, t_hi);
  }
  method_params.correction_scale = cfg.method.correction_scale;
  resolution = pairs::resolve_resolution(cfg.data.resolution, manifest);
  accumulation = config::accumulation_steps(cfg, comm->world_size());

  objective::TimestepSamplerOptions sampler_options;
  sampler_options.distribution = objective::method_distribution(method);
  sampler_options.num_timesteps = manifest.num_train_timesteps;
  sampler_options.gamma = cfg.method.gamma;
  sampler_options.single_shot = schedule.single_shot;  // uniform_ct: p(t) proportional to c_t
  sampler_options.sampler_steps = cfg.method.sampler_steps;
  sampler_options.t_lo = cfg.method.t_lo;
  sampler_options.t_hi = config::effective_t_hi(cfg.method, manifest.num_train_timesteps);
  sampler = std::make_unique<objective::TimestepSampler>(sampler_options);

  create_writable_dir(cfg.run.output_dir, "run.output_dir");
  log::add_file((fs::path(cfg.run.output_dir) / "train.log").string());
  log::info(
      "dde_train: method {}, family {}, device {}, resolution {}, global batch {} = {} x {} "
      "accumulation",
      objective::method_name(method), models::family_name(manifest.family), device.str(),
      resolution, cfg.train.global_batch, cfg.train.micro_batch, accumulation);
  log::info("threads: {} CPUs ({}), {} intra-op ({}), {} decode workers (data.workers)",
            threads.cpus, threads.cpus_from, threads.intra_op, threads.intra_op_from,
            cfg.data.workers);
  log::info("resolved config:\n{}", config::to_yaml(cfg));

  configure_cuda_kernels(device, cfg.train.allow_tf32);
  models::UNetOptions policy_options;
  policy_options.trainable = true;
  policy_options.gradient_checkpointing = cfg.train.gradient_checkpointing;
  policy_options.fp32_output_head = cfg.train.fp32_output_head;
  policy = std::make_unique<models::UNet>(manifest, device, policy_options);
  const torch::ScalarType frozen = pairs::frozen_dtype(cfg.model.frozen_dtype);
  if (objective::uses_reference(method)) {
    models::UNetOptions reference_options;
    reference_options.dtype = frozen;
    reference_options.fp32_output_head = cfg.train.fp32_output_head;
    reference = std::make_unique<models::UNet>(reference_manifest, device, reference_options);
  }
  // A latent cache replaces the frozen encoders; the held-out evaluator still encodes images.
  if (cfg.data.cache.empty() || !cfg.data.eval_index.empty()) {
    text = std::make_unique<models::TextConditioner>(manifest, device, frozen);
    vae = std::make_unique<models::LatentEncoder>(manifest, device, frozen);
  }

  pair_path = std::make_unique<pairs::PairPath>(manifest, schedule, device, resolution, text.get(),
                                                vae.get());
  optimizer = DataParallelOptimizer::create(policy->named_parameters(), cfg.optim,
                                            cfg.dist.shard_optimizer, *comm, kBucketBytes);

  data::PairLoaderOptions lo;
  lo.index_path = cfg.data.index;
  lo.resolution = resolution;
  lo.random_crop = cfg.data.random_crop;
  lo.random_flip = cfg.data.random_flip;
  lo.caption_dropout = cfg.data.caption_dropout;
  lo.shuffle_buffer = cfg.data.shuffle_buffer;
  lo.workers = cfg.data.workers;
  lo.prefetch_batches = cfg.data.prefetch_batches;
  lo.keep_ties = cfg.data.keep_ties;
  lo.seed = cfg.run.seed;
  lo.batch_size = cfg.train.micro_batch;
  lo.rank = comm->rank();
  lo.world_size = comm->world_size();
  lo.max_image_pixels = cfg.data.max_image_pixels;
  lo.verify_sha256 = cfg.data.verify;
  lo.pin_memory = device.is_cuda();
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    lo.empty_prompt_ids.push_back(e.empty_prompt_ids);
    lo.expected_vocab_sha256.push_back(e.vocab_sha256);
  }
  if (!cfg.data.cache.empty()) {
    lo.cache_index = cfg.data.cache;
    lo.cache_expected = pairs::cache_expectation(cfg, manifest, resolution);
  }
  loader = std::make_unique<data::PairLoader>(lo);
  if (!cfg.data.eval_index.empty()) {
    evaluator = std::make_unique<Evaluator>(EvaluatorContext{
        &cfg, &manifest, &reference_manifest, policy.get(), reference.get(), text.get(), vae.get(),
        [this](models::UNet& unet, const torch::Tensor& x, const torch::Tensor& t,
               const models::Conditioning& cond) { return predict(unet, x, t, cond); },
        &schedule, method, method_params, comm.get(), device, resolution});
  }

  poisoned_steps = injected_nonfinite_steps();
  prepare_output_dir(start);
  if (cfg.sample.every > 0 && is_main()) {
    samples = std::make_unique<ValidationImages>(cfg, manifest, device, resolution, text.get());
  }
  comm->barrier();
  int64_t keep_metrics_through = -1;
  if (start.resume) {
    if (auto latest = store.latest_complete()) {
      restore(*latest);
      keep_metrics_through = step;
    } else {
      log::info("--resume: no complete checkpoint under {}, starting from step 0", store.root());
    }
  }
  // Every rank starts from rank 0's weights (they load the same files; this makes it a fact).
  std::vector<torch::Tensor> weights = policy->parameters();
  {
    torch::NoGradGuard no_grad;
    comm->broadcast(weights, /*root=*/0);
  }
  if (is_main()) {
    metrics = std::make_unique<MetricsLog>(
        (fs::path(cfg.run.output_dir) / "metrics.jsonl").string(), keep_metrics_through);
    if (cfg.logging.tensorboard) {
      metrics->enable_tensorboard((fs::path(cfg.run.output_dir) / "tensorboard").string());
    }
  }
  weight_norm = global_norm(policy->parameters()).item<double>();
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

  if (dump) {
    // Everything an independent recomputation needs (tests/e2e/test_forward_parity.py).
    // From a cache: the posterior moments in place of the images.
    const bool cached = batch.winner_moments.defined();
    const auto image = [&](const torch::Tensor& pixels) {
      return data::to_pm1(pixels, data::pm1_table());  // as the VAE took them
    };
    checkpoint::NamedTensors d{
        {cached ? "winner_moments" : "winner", cached ? batch.winner_moments : image(batch.winner)},
        {cached ? "loser_moments" : "loser", cached ? batch.loser_moments : image(batch.loser)},
        {"pair_ids", batch.pair_ids},
        {"t", t},
        {"eps", eps_pair},
        {"vae_noise", draws.vae_noise},
        {"e_policy_w", errors.policy_w},
        {"e_policy_l", errors.policy_l}};
    for (size_t i = 0; i < batch.input_ids.size(); ++i) {
      d.emplace_back("input_ids_" + std::to_string(i), batch.input_ids[i]);
    }
    if (reference) {
      d.emplace_back("e_ref_w", errors.ref_w);
      d.emplace_back("e_ref_l", errors.ref_l);
    }
    if (manifest.added_cond) {
      d.emplace_back("time_ids_w", encoded.winner_time_ids);
      d.emplace_back("time_ids_l", encoded.loser_time_ids);
    }
    dump_micro_batch(std::move(d));
  }

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
  const auto f64 = [&](const torch::Tensor& x) {
    return x.detach().to(device, torch::kFloat64, /*non_blocking=*/true);
  };
  const torch::Tensor nan = torch::full({B}, std::numeric_limits<double>::quiet_NaN(),
                                        torch::dtype(torch::kFloat64).device(device));
  r.rows = torch::stack({f64(batch.pair_ids), f64(t), f64(errors.policy_w), f64(errors.policy_l),
                         errors.ref_w.defined() ? f64(errors.ref_w) : nan,
                         errors.ref_l.defined() ? f64(errors.ref_l) : nan, f64(C_t),
                         r.has_z ? f64(out.z) : nan, f64(out.loss), f64(credit)},
                        1);
  if (objective::uses_reference(method)) {
    ema.accumulate(t, objective::transition_estimate(errors, t, schedule));
  }
  return r;
}

void Trainer::Impl::dump_micro_batch(checkpoint::NamedTensors tensors) const {
  const fs::path dir = fs::path(cfg.run.output_dir) / "debug";
  fs::create_directories(dir);
  for (auto& [name, tensor] : tensors) tensor = tensor.detach();
  const fs::path file =
      dir / fmt::format("step-{:08d}-rank-{:05d}.safetensors", step + 1, comm->rank());
  checkpoint::save_safetensors(file.string(), tensors, {{"step", std::to_string(step + 1)}});
  log::info("dumped micro-batch 0 of step {} to {}", step + 1, file.string());
}

TrainOutcome Trainer::Impl::run() {
  const int64_t max_steps = cfg.train.max_steps;
  const auto run_start = Clock::now();
  const int64_t first_step = step;
  MemoryMeter memory(device);
  const StopTestHooks test_hooks = StopTestHooks::from_environment();
  log::info("training steps {} -> {} ({} pairs per step)", step, max_steps, cfg.train.global_batch);
  while (step < max_steps) {
    if (!periodic_work()) return stop_for_requeue(loader->state());
    const auto step_start = Clock::now();
    const double wait_before = loader->wait_seconds();
    const double lr = scheduled_lr(cfg.optim.schedule, step, cfg.optim.lr, cfg.optim.warmup_steps,
                                   cfg.train.max_steps, cfg.optim.min_lr_ratio);
    const bool poisoned = poisoned_steps.count(step + 1) != 0;
    memory.begin_step();

    // ---- training section: micro-batches -> backward (gradients accumulate locally) ----
    // Rows (and the EMA's pending sums) stay on the device: no host sync inside this loop,
    // which run.cuda_sync_debug: error enforces on a GPU.
    std::vector<torch::Tensor> rows;
    torch::Tensor t_bins;  // [4, 10]: the step's per-t-bin sums (docs/method.md §7.4)
    bool has_z = false;
    bool stopped = false;  // this rank saw the stop flag before one of its micro-batches
    const data::PairLoaderState position_at_start = loader->state();  // what a stop saves
    {
      const dist::CudaSyncDebugScope sync_debug(device.is_cuda() ? cfg.run.cuda_sync_debug
                                                                 : std::string("off"));
      for (int64_t micro = 0; micro < accumulation; ++micro) {
        test_hooks.before_micro_batch(comm->rank(), step + 1, micro);
        if (stop_requested()) {  // an atomic load: the ranks agree once, after the loop
          stopped = true;
          break;
        }
        const data::PairBatch batch = loader->next();
        MicroResult r = micro_step(batch, micro == 0 && step + 1 == cfg.logging.dump_step);
        if (micro == 0) memory.mark_forward();
        // Sum over pairs / global batch: the all-reduced sum of gradients is the batch mean's.
        torch::Tensor loss = r.loss_sum / static_cast<double>(cfg.train.global_batch);
        if (poisoned) loss = loss * std::numeric_limits<double>::quiet_NaN();
        loss.backward();
        has_z = r.has_z;
        rows.push_back(r.rows);
        t_bins = t_bins.defined() ? t_bins + r.t_bins : r.t_bins;
      }
    }
    // Every rank must take the same branch: one collective per step, before the gradient reduce.
    // A rank that was not signalled finishes its micro-batches first (SLURM signals every task).
    if (comm->any(stopped)) return stop_for_requeue(position_at_start);
    const torch::Tensor local_rows = torch::cat(rows, 0);  // [n, kPairColumns] on the device
    // stats: loss sum, pairs, z > 0 count, winner mse (policy, reference) sums.
    torch::Tensor stats = step_stats(local_rows, has_z, reference != nullptr);

    const std::vector<data::BadPair> bad_pairs = loader->take_bad_pairs();
    // [5], [6]: this rank's bad pairs skipped in the step and since the start of the run.
    const torch::Tensor bad_counts = torch::tensor(
        {static_cast<double>(bad_pairs.size()), static_cast<double>(loader->counters().bad_pairs)},
        torch::kFloat64);
    stats = torch::cat({stats, to_device(bad_counts)});

    // ---- reduce: gradients (all-reduced, or reduce-scattered when sharded), figures ----
    optimizer->reduce_gradients();
    std::vector<torch::Tensor> reduced{stats, ema.pending_sum(), ema.pending_count(), t_bins};
    comm->all_reduce_sum(reduced, kBucketBytes);
    // The rows reach the host once per step (rank 0 writes them).
    const torch::Tensor all_rows =
        cfg.logging.per_sample ? comm->all_gather(local_rows).to(torch::kCPU) : torch::Tensor();
    const torch::Tensor stats_host = stats.to(torch::kCPU);
    const auto figure = stats_host.accessor<double, 1>();
    const auto bad_total = static_cast<int64_t>(figure[6]);
    report_bad_pairs(bad_total, static_cast<int64_t>(figure[5]), bad_pairs);

    // ---- update: guard -> clip -> optimizer (+ all-gather when sharded) -> correction ----
    const double grad_norm = optimizer->clip_grad_norm(cfg.optim.grad_clip);
    const double pairs = figure[1];
    const double mean_loss = figure[0] / pairs;
    const bool finite = std::isfinite(grad_norm) && std::isfinite(mean_loss) && !poisoned;
    bool passed = false;
    if (finite) {
      optimizer->step(lr);
      const std::string failed = check_update();
      if (failed.empty()) {
        ema.apply();
        nonfinite_in_row = 0;
        rolled_back = false;
        passed = true;
      } else {
        ema.clear_pending();
        ++skipped_steps;
        ++nonfinite_in_row;
        failure_cause = "weights after the update";
        roll_back(failed);
      }
    } else {
      ema.clear_pending();
      ++skipped_steps;
      ++nonfinite_in_row;
      // The frozen reference's errors are non-finite only when its inputs are.
      const bool inputs = reference != nullptr && !std::isfinite(figure[4]);
      failure_cause = inputs ? "inputs" : std::isfinite(mean_loss) ? "gradient" : "loss";
      log::warn(
          "step {}: non-finite {} (loss {}, grad norm {}): update skipped ({} in a row, limit {})",
          step + 1, failure_cause, mean_loss, grad_norm, nonfinite_in_row,
          cfg.optim.max_nonfinite_in_row);
    }
    optimizer->zero_grad();
    ++step;

    // ---- metrics (rank 0, global figures), progress, checkpoint, preemption ----
    const StepMemory step_memory = memory.end_step();
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    const double waited = loader->wait_seconds() - wait_before;
    if (is_main()) {
      json rec = {{"kind", "step"},
                  {"step", step},
                  {"loss", mean_loss},
                  {"lr", lr},
                  {"grad_norm", grad_norm},
                  {"mse_policy", figure[3] / pairs},
                  {"pairs_per_s", pairs / step_seconds},
                  {"data_wait_frac", step_seconds > 0 ? std::min(1.0, waited / step_seconds) : 0.0},
                  {"skipped_steps", skipped_steps},
                  {"mem_held_mb", step_memory.held_mb},
                  {"mem_peak_mb", step_memory.peak_mb},
                  {"mem_forward_peak_mb", step_memory.forward_peak_mb},
                  {"bad_pairs", bad_total},
                  {"epoch", loader->state().epoch}};
      rec["implicit_acc"] = has_z ? json(figure[2] / pairs) : json(nullptr);
      rec["mse_ref"] = reference ? json(figure[4] / pairs) : json(nullptr);
      rec["t_bins"] = t_bin_record(t_bins.to(torch::kCPU), has_z, reference != nullptr);
      if (cfg.logging.per_sample) write_pair_records(all_rows);
      metrics->write(rec);
      if (cfg.logging.progress && (step % cfg.logging.every == 0 || step == max_steps)) {
        const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
        const double per_step = elapsed / static_cast<double>(step - first_step);
        log::info(
            "step {}/{} | loss {:.4f} | acc {} | {:.1f} pairs/s | data wait {:.0f}% | ETA {}", step,
            max_steps, mean_loss,
            has_z ? fmt::format("{:.3f}", rec["implicit_acc"].get<double>()) : std::string("-"),
            rec["pairs_per_s"].get<double>(), 100.0 * rec["data_wait_frac"].get<double>(),
            format_duration(per_step * static_cast<double>(max_steps - step)));
      }
    }
    if (nonfinite_in_row >= cfg.optim.max_nonfinite_in_row) stop_after_failed_steps();
    if (bad_total > cfg.data.max_bad_pairs) {  // the same global count on every rank
      const std::string dir = save_checkpoint(loader->state());
      std::string reasons;
      for (const auto& [reason, count] : bad_pairs_by_reason) {
        reasons += fmt::format("{}{} {}", reasons.empty() ? "" : ", ", reason, count);
      }
      throw Error(
          {"too many bad pairs in the data", "step " + std::to_string(step),
           "at most data.max_bad_pairs = " + std::to_string(cfg.data.max_bad_pairs),
           fmt::format("{} skipped over all ranks{}", bad_total,
                       reasons.empty() ? "" : " (seen by rank 0's process: " + reasons + ")"),
           "each one is in metrics.jsonl (kind bad_pair) and train.log; re-export those "
           "shards, or raise data.max_bad_pairs; the weights are saved in " +
               dir + " for --resume"});
    }
    // Only weights that passed the checks are checkpointed (rotation then never deletes the
    // newest good checkpoint for a bad one).
    if (step % cfg.checkpoint.every == 0 || step == max_steps) {
      if (passed) {
        save_checkpoint(loader->state());
      } else {
        log::warn("step {}: not checkpointed: the step failed ({})", step, failure_cause);
      }
    }
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

// Every rank's skipped pairs of this step to rank 0, one metrics record each. `in_step` is
// the global count (all-reduced), so every rank takes the same branch.
void Trainer::Impl::report_bad_pairs(int64_t total, int64_t in_step,
                                     const std::vector<data::BadPair>& local) {
  if (in_step == 0) return;
  // The rows cross as a device tensor, as every collective's input (NCCL takes no host tensor).
  const torch::Tensor rows =
      comm->all_gather(to_device(data::bad_pair_rows(local, comm->rank(), in_step)));
  if (!is_main()) return;
  for (const data::RankedBadPair& b : data::bad_pairs_from_rows(rows)) {
    ++bad_pairs_by_reason[b.pair.reason];
    metrics->write({{"kind", "bad_pair"},
                    {"step", step + 1},
                    {"rank", b.rank},
                    {"pair_id", b.pair.pair_id},
                    {"reason", b.pair.reason},
                    {"shard", b.pair.shard},
                    {"key", b.pair.key}});
  }
  log::warn("step {}: {} bad pairs skipped ({} in the run, limit data.max_bad_pairs = {})",
            step + 1, in_step, total, cfg.data.max_bad_pairs);
}

void Trainer::Impl::write_pair_records(const torch::Tensor& all_rows) {
  // all_rows: [world * n, kPairColumns], rank r's rows at [r * n, (r + 1) * n).
  const int64_t per_rank = all_rows.size(0) / comm->world_size();
  const auto a = all_rows.accessor<double, 2>();
  const auto number_or_null = [](double v) { return std::isnan(v) ? json(nullptr) : json(v); };
  for (int64_t i = 0; i < all_rows.size(0); ++i) {
    metrics->write({{"kind", "pair"},
                    {"step", step},
                    {"rank", i / per_rank},
                    {"pair_id", static_cast<int64_t>(a[i][kPairId])},
                    {"t", static_cast<int64_t>(a[i][kT])},
                    {"mse_policy_w", a[i][kPolicyW]},
                    {"mse_policy_l", a[i][kPolicyL]},
                    {"mse_ref_w", number_or_null(a[i][kRefW])},
                    {"mse_ref_l", number_or_null(a[i][kRefL])},
                    {"correction", a[i][kCorrection]},
                    {"z", number_or_null(a[i][kZ])},
                    {"loss", number_or_null(a[i][kLoss])},
                    {"credit", number_or_null(a[i][kCredit])}});
  }
}

// A stop agreed by the ranks mid-step: the partial step is dropped (gradients, the correction's
// pending sums, the bad pairs met in it) and the last complete step is checkpointed with the data
// position at its end, so --resume redoes the whole step. A stop seen only after a step's last
// micro-batch lets that step finish and is caught before the next one's first micro-batch. A stop
// during a held-out evaluation drops it; the resumed run evaluates that step again.
TrainOutcome Trainer::Impl::stop_for_requeue(const data::PairLoaderState& step_start) {
  optimizer->zero_grad();
  ema.clear_pending();
  (void)loader->take_bad_pairs();  // the resumed run meets (and reports) them again
  const std::string at = " at step " + std::to_string(step);
  std::string done;
  if (step == 0) {
    done = "no step completed, nothing to checkpoint";
  } else if (checkpointed_step == step) {  // a periodic checkpoint of the last step, or a resume
    done = "checkpoint " + last_checkpoint + " already written" + at;
  } else {
    done = "checkpoint " + save_checkpoint(step_start) + " written" + at;
  }
  const int signum = stop_signal();  // 0 on a rank that only agreed with a signalled one
  log::warn("stop requested ({}): {}; exiting for requeue",
            signum != 0 ? fmt::format("signal {}", signum) : std::string("by another rank"), done);
  return {step, skipped_steps, last_checkpoint, /*preempted=*/true};
}

std::string Trainer::Impl::save_checkpoint(const data::PairLoaderState& position) {
  // Rank 0 stages and writes the shared state, every rank its own position (and optimizer
  // shard); the rename that makes it complete happens only after all of them have written.
  const std::string d = store.staging_dir(step);
  const std::chrono::seconds wait(cfg.checkpoint.timeout_s);
  if (is_main()) store.stage(step);
  comm->barrier_within(wait);
  checkpoint::RankState own;
  own.rank = comm->rank();
  own.world_size = comm->world_size();
  own.epoch = position.epoch;
  own.pairs_consumed = position.pairs_consumed;
  own.bad_pairs = position.bad_pairs;
  if (optimizer->sharded()) own.optimizer_shard = optimizer->state();
  checkpoint::write_rank_state(d, own);
  if (is_main()) checkpoint::write_shared_state(d, shared_state());
  comm->barrier_within(wait);  // rank 0's write of the whole model outlasts dist.timeout_s
  if (is_main()) {
    last_checkpoint = store.commit(step);
    log::info("checkpoint: {}", last_checkpoint);
  } else {
    last_checkpoint =
        (fs::path(store.root()) / checkpoint::CheckpointStore::step_dir_name(step)).string();
  }
  comm->barrier_within(wait);
  checkpointed_step = step;
  return last_checkpoint;
}

checkpoint::SharedState Trainer::Impl::shared_state() const {
  checkpoint::SharedState s;
  s.step = step;
  s.skipped_steps = skipped_steps;
  s.nonfinite_in_row = nonfinite_in_row;
  s.world_size = comm->world_size();
  s.method = objective::method_name(method);
  s.optimizer_name = cfg.optim.name;
  s.optimizer_sharded = optimizer->sharded();
  if (!optimizer->sharded()) s.optimizer = optimizer->state();
  s.correction = ema.values();
  s.correction_counts = ema.update_counts();
  s.correction_momentum = ema.momentum();
  s.correction_updates = ema.updates();
  s.unet_config_json = manifest.unet_config_json;
  s.unet = policy->named_parameters();
  s.config_yaml = config::to_yaml(cfg);
  return s;
}

void Trainer::Impl::restore(const std::string& dir) {
  const checkpoint::SharedState saved = checkpoint::read_shared_state(dir);
  checkpoint::check_resumable(dir, saved,
                              {objective::method_name(method), cfg.optim.name, comm->world_size()});
  for (const config::ConfigChange& c :
       checkpoint::check_resume_config(dir, saved.config_yaml, cfg)) {
    log::warn("resume: {} changed since the checkpoint: {} -> {}", c.key, c.before, c.after);
  }
  const checkpoint::RankState own = load_weights_and_state(dir, saved);
  step = saved.step;
  skipped_steps = saved.skipped_steps;
  nonfinite_in_row = saved.nonfinite_in_row;
  data::PairLoaderState position;
  position.epoch = own.epoch;
  position.pairs_consumed = own.pairs_consumed;
  position.bad_pairs = own.bad_pairs;
  loader->load_state(position);
  last_checkpoint = dir;
  checkpointed_step = step;
  log::info("resumed from {} at step {}", dir, step);
}

// The policy's weights, this rank's optimizer state and the correction E of checkpoint `dir`
// (read_shared_state and read_rank_state refuse non-finite tensors, naming the file and tensor).
checkpoint::RankState Trainer::Impl::load_weights_and_state(const std::string& dir,
                                                            const checkpoint::SharedState& saved) {
  policy->load_parameters(saved.unet, dir);
  checkpoint::RankState own = checkpoint::read_rank_state(dir, comm->rank(), saved);
  optimizer->load_state(checkpoint::optimizer_state_for(dir, saved, own, optimizer->sharded()),
                        dir);
  objective::CorrectionEma::State correction;
  const torch::Tensor E = saved.correction.to(torch::kFloat64).contiguous();
  correction.E.assign(E.data_ptr<double>(), E.data_ptr<double>() + E.numel());
  correction.momentum = saved.correction_momentum;
  correction.updates = saved.correction_updates;
  if (saved.correction_counts.defined()) {
    const torch::Tensor n = saved.correction_counts.to(torch::kInt64).contiguous();
    correction.counts.assign(n.data_ptr<int64_t>(), n.data_ptr<int64_t>() + n.numel());
  }
  ema.load_state(correction);
  weight_norm = global_norm(policy->parameters()).item<double>();
  return own;
}

// One fused norm over the weights (every rank holds them all, so every rank decides the same)
// and, unsharded, the optimizer state; read on the host once, right after the update (the
// correction's apply() syncs there too).
std::string Trainer::Impl::check_update() {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts{global_norm(policy->parameters())};
  if (!optimizer->sharded()) {
    std::vector<torch::Tensor> state;
    for (const auto& [name, t] : optimizer->state()) state.push_back(t);
    parts.push_back(global_norm(state).to(parts[0].device()));
  }
  const torch::Tensor host = torch::stack(parts).to(torch::kCPU);
  const double weights = host[0].item<double>();
  if (!std::isfinite(weights)) return "non-finite weights";
  if (host.size(0) > 1 && !std::isfinite(host[1].item<double>())) {
    return "non-finite optimizer state";
  }
  const double change = weight_norm > 0 ? std::abs(weights - weight_norm) / weight_norm : 0.0;
  if (change > cfg.optim.max_weight_change) {
    return fmt::format(
        "the weights' norm changed by {:.3g} of it ({:.6g} -> {:.6g}), more than "
        "optim.max_weight_change = {}",
        change, weight_norm, weights, cfg.optim.max_weight_change);
  }
  weight_norm = weights;
  return "";
}

// A failed update cannot be undone in place: the weights, optimizer state and E of the newest
// checkpoint (every one on disk passed) replace them; the data position and step count go on.
void Trainer::Impl::roll_back(const std::string& why) {
  if (checkpointed_step < 0) {
    throw Error({"the update failed before any checkpoint", "step " + std::to_string(step + 1),
                 "finite weights changing by at most optim.max_weight_change per step", why,
                 "nothing was saved; lower optim.lr (or raise optim.warmup_steps), check the data, "
                 "then start again"});
  }
  log::warn(
      "step {}: update rejected: {}; weights, optimizer state and E rolled back to {} "
      "({} failed in a row, limit optim.max_nonfinite_in_row = {})",
      step + 1, why, last_checkpoint, nonfinite_in_row, cfg.optim.max_nonfinite_in_row);
  (void)load_weights_and_state(last_checkpoint, checkpoint::read_shared_state(last_checkpoint));
  rolled_back = true;
}

// Too many failed steps in a row: the run stops with the weights of the last step that passed on
// disk (already there after a roll-back; saved now otherwise), and names what failed.
void Trainer::Impl::stop_after_failed_steps() {
  const std::string dir =
      rolled_back || checkpointed_step == step ? last_checkpoint : save_checkpoint(loader->state());
  const std::map<std::string, std::string> advice = {
      {"loss", "lower optim.lr, or use train.precision fp32"},
      {"gradient", "lower optim.lr or optim.grad_clip, or use train.precision fp32"},
      {"weights after the update",
       "lower optim.lr (or raise optim.warmup_steps); optim.max_weight_change bounds an update"},
      {"inputs", "check the data: a latent cache or images with NaN or Inf values"}};
  throw Error(
      {"too many non-finite steps in a row", "step " + std::to_string(step),
       "fewer than optim.max_nonfinite_in_row = " + std::to_string(cfg.optim.max_nonfinite_in_row),
       fmt::format("{} (the last: non-finite or unbounded {})", nonfinite_in_row, failure_cause),
       (dir.empty() ? std::string("no step passed, nothing is saved")
                    : "the weights of the last step that passed are in " + dir) +
           "; " + advice.at(failure_cause) + ", then --resume"});
}

// Every rank checks (the folder is shared); rank 0 alone deletes what --overwrite replaces.
void Trainer::Impl::prepare_output_dir(const StartOptions& start) const {
  check_output_dir(cfg, start);
  if (!is_main()) return;
  // A folder that cannot take a checkpoint is found now, not at the first save hours in.
  create_writable_dir(store.root(), "run.output_dir");
  if (start.overwrite) {
    const fs::path metrics_file = fs::path(cfg.run.output_dir) / "metrics.jsonl";
    for (const fs::path& old : {fs::path(store.root()), metrics_file}) {
      if (fs::exists(old)) {
        fs::remove_all(old);
        log::warn("--overwrite: deleted {}", old.string());
      }
    }
  }
  store.remove_stale_staging();
}

void check_output_dir(const config::TrainConfig& config, const StartOptions& start) {
  if (start.resume || start.overwrite) return;
  const checkpoint::CheckpointStore existing(
      (fs::path(config.run.output_dir) / "checkpoints").string(), config.checkpoint.keep);
  const std::vector<std::string> found = existing.complete_checkpoints();
  if (found.empty()) return;
  throw Error({"the output folder holds the checkpoints of an earlier run",
               "run.output_dir = " + config.run.output_dir,
               "no complete checkpoint under checkpoints/ for a fresh run",
               fmt::format("{} (newest {})", found.size(), found.back()),
               "continue that run with --resume; or pass --overwrite to delete its checkpoints/ "
               "and metrics.jsonl and start again; or choose another run.output_dir"});
}

Trainer::Trainer(config::TrainConfig config, StartOptions start)
    : impl_(std::make_unique<Impl>(std::move(config), start)) {}
Trainer::~Trainer() = default;
TrainOutcome Trainer::run() { return impl_->run(); }

}  // namespace dde::train
