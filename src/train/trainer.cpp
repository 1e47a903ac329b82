#include "dde/train/trainer.hpp"

#include <ATen/autocast_mode.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/checkpoint/training_checkpoint.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/dist/communicator.hpp"
#include "dde/dist/environment.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/models/manifest.hpp"
#include "dde/objective/correction_ema.hpp"
#include "dde/objective/methods.hpp"
#include "dde/objective/schedule.hpp"
#include "dde/objective/timestep_sampler.hpp"
#include "dde/train/adamw.hpp"
#include "dde/train/data_parallel_optimizer.hpp"
#include "dde/train/metrics_log.hpp"
#include "dde/train/stop_signal.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int64_t kBucketBytes = 25 << 20;  // gradient all-reduce buckets, as torch DDP

torch::Device pick_device(const std::string& requested, int64_t local_rank) {
  if (requested == "cpu") return torch::kCPU;
  const auto gpu = static_cast<c10::DeviceIndex>(local_rank);
  if (requested == "cuda") {
    if (!torch::cuda::is_available()) {
      throw Error({"CUDA requested but not available", "run.device", "a visible GPU", "none",
                   "set run.device: cpu (or auto), or check CUDA_VISIBLE_DEVICES and the driver"});
    }
    return {torch::kCUDA, gpu};
  }
  return torch::cuda::is_available() ? torch::Device(torch::kCUDA, gpu)
                                     : torch::Device(torch::kCPU);
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

// Per-image mean squared error over latent elements: [N, C, h, w] -> [N].
torch::Tensor per_image_mse(const torch::Tensor& prediction, const torch::Tensor& target) {
  return (prediction.to(torch::kFloat32) - target).pow(2).flatten(1).mean(1);
}

// SDXL add_time_ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image.
torch::Tensor time_ids(const torch::Tensor& original_hw, const torch::Tensor& crop_tl,
                       int64_t resolution) {
  const torch::Tensor target = torch::full({original_hw.size(0), 2}, resolution, torch::kLong);
  return torch::cat({original_hw, crop_tl, target}, 1).to(torch::kFloat32);
}

// splitmix64: the per-pair noise seed from (run seed, pair id, stream).
uint64_t mix_seed(uint64_t seed, int64_t pair_id, uint64_t stream) {
  uint64_t h = seed;
  for (uint64_t part : {static_cast<uint64_t>(pair_id), stream}) {
    h ^= part;
    h += 0x9E3779B97F4A7C15ULL;
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
    h ^= h >> 31;
  }
  return h;
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
  std::unique_ptr<data::PairLoader> loader;
  std::unique_ptr<DataParallelOptimizer> optimizer;
  checkpoint::CheckpointStore store;
  std::unique_ptr<MetricsLog> metrics;  // rank 0 only
  int64_t resolution;
  int64_t accumulation;
  int64_t step = 0;  // optimizer steps attempted so far (skipped ones included)
  int64_t skipped_steps = 0;
  int64_t nonfinite_in_row = 0;
  std::set<int64_t> poisoned_steps;
  std::string last_checkpoint;

  Impl(config::TrainConfig config, bool resume);
  void restore(const std::string& dir);
  std::string save_checkpoint();
  checkpoint::SharedState shared_state() const;
  TrainOutcome run();
  void write_pair_records(const torch::Tensor& all_rows);
  bool is_main() const { return comm->rank() == 0; }

  struct MicroResult {
    torch::Tensor loss_sum;  // scalar float64, sum over pairs of the micro-batch
    torch::Tensor rows;      // [B, kPairColumns] float64, per-pair record values
    objective::PairErrors errors;
    bool has_z = false;
  };
  MicroResult micro_step(const data::PairBatch& batch);
  torch::Tensor predict(models::UNet& unet, const torch::Tensor& x, const torch::Tensor& t,
                        const models::Conditioning& cond);
};

Trainer::Impl::Impl(config::TrainConfig config, bool resume)
    : cfg(std::move(config)),
      env(dist::detect_environment(cfg.dist.init_method)),
      device(pick_device(cfg.run.device, env.local_rank)),
      manifest(models::load_manifest(cfg.model.manifest)),
      reference_manifest(cfg.model.reference_manifest.empty()
                             ? manifest
                             : models::load_manifest(cfg.model.reference_manifest)),
      schedule(objective::NoiseSchedule::scaled_linear(manifest.num_train_timesteps,
                                                       manifest.beta_start, manifest.beta_end)),
      method(objective::parse_method(cfg.method.name)),
      ema(manifest.num_train_timesteps, cfg.method.ema_momentum),
      store((fs::path(cfg.run.output_dir) / "checkpoints").string(), cfg.checkpoint.keep) {
  log::set_rank(static_cast<int>(env.rank));
  comm = dist::Communicator::create(env, cfg.dist.backend, device,
                                    std::chrono::seconds(cfg.dist.timeout_s));
  config::validate_against_timesteps(cfg, manifest.num_train_timesteps);
  method_params.beta = cfg.method.beta;
  method_params.correction_scale = cfg.method.correction_scale;
  resolution = cfg.data.resolution > 0 ? cfg.data.resolution : manifest.resolution;
  if (resolution % manifest.latent_downsample != 0) {
    throw Error({"resolution not divisible by the VAE downsampling", "data.resolution",
                 "a multiple of " + std::to_string(manifest.latent_downsample),
                 std::to_string(resolution), ""});
  }
  accumulation = config::accumulation_steps(cfg, comm->world_size());

  objective::TimestepSamplerOptions sampler_options;
  sampler_options.distribution = objective::method_distribution(method);
  sampler_options.num_timesteps = manifest.num_train_timesteps;
  sampler_options.gamma = cfg.method.gamma;
  sampler_options.sampler_steps = cfg.method.sampler_steps;
  sampler_options.t_lo = cfg.method.t_lo;
  sampler_options.t_hi = config::effective_t_hi(cfg.method, manifest.num_train_timesteps);
  sampler = std::make_unique<objective::TimestepSampler>(sampler_options);

  fs::create_directories(cfg.run.output_dir);
  log::add_file((fs::path(cfg.run.output_dir) / "train.log").string());
  log::info(
      "dde_train: method {}, family {}, device {}, resolution {}, global batch {} = {} x {} "
      "accumulation",
      objective::method_name(method), models::family_name(manifest.family), device.str(),
      resolution, cfg.train.global_batch, cfg.train.micro_batch, accumulation);
  log::info("resolved config:\n{}", config::to_yaml(cfg));

  policy = std::make_unique<models::UNet>(manifest, device, /*trainable=*/true);
  if (objective::uses_reference(method)) {
    reference = std::make_unique<models::UNet>(reference_manifest, device, /*trainable=*/false);
  }
  text = std::make_unique<models::TextConditioner>(manifest, device);
  vae = std::make_unique<models::LatentEncoder>(manifest, device);

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
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    lo.empty_prompt_ids.push_back(e.empty_prompt_ids);
    lo.expected_vocab_sha256.push_back(e.vocab_sha256);
  }
  loader = std::make_unique<data::PairLoader>(lo);

  poisoned_steps = injected_nonfinite_steps();
  if (is_main()) store.remove_stale_staging();
  comm->barrier();
  int64_t keep_metrics_through = -1;
  if (resume) {
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
  }
}

torch::Tensor Trainer::Impl::predict(models::UNet& unet, const torch::Tensor& x,
                                     const torch::Tensor& t, const models::Conditioning& cond) {
  if (cfg.train.precision != "bf16") return unet.predict_noise(x, t, cond);
  const c10::DeviceType type = device.type();
  at::autocast::set_autocast_enabled(type, true);
  at::autocast::set_autocast_dtype(type, at::kBFloat16);
  torch::Tensor out = unet.predict_noise(x, t, cond);
  at::autocast::set_autocast_enabled(type, false);
  // C++ never clears the autocast weight cache for us (libtorch-notes.md).
  at::autocast::clear_cache();
  return out;
}

Trainer::Impl::MicroResult Trainer::Impl::micro_step(const data::PairBatch& batch) {
  const int64_t B = batch.winner.size(0);
  const int64_t h = resolution / manifest.latent_downsample;
  const std::vector<int64_t> latent_shape{manifest.latent_channels, h, h};

  // Per-pair randomness from (seed, pair id): the same pair gets the same t and noise whatever
  // the world size, micro-batch or resume point. One t and one eps per pair, shared by winner
  // and loser (Diffusion-DPO); the VAE posterior is sampled per image.
  std::vector<torch::Tensor> ts, eps_list, vae_w, vae_l;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t id = batch.pair_ids[i].item<int64_t>();
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(mix_seed(cfg.run.seed, id, 0));
    ts.push_back(sampler->sample(1, g));
    eps_list.push_back(at::randn(latent_shape, g, torch::kFloat32));
    vae_w.push_back(at::randn(latent_shape, g, torch::kFloat32));
    vae_l.push_back(at::randn(latent_shape, g, torch::kFloat32));
  }
  const torch::Tensor t = torch::cat(ts);  // [B] int64, CPU
  const torch::Tensor eps_pair = torch::stack(eps_list).to(device);
  const torch::Tensor vae_noise = torch::cat({torch::stack(vae_w), torch::stack(vae_l)}, 0);

  // One VAE call for both sides: [x_w; x_l], [2B, 3, H, W] -> latents [2B, C, h, w].
  const torch::Tensor latents = vae->encode(torch::cat({batch.winner, batch.loser}, 0), vae_noise);
  models::Conditioning cond = text->encode(batch.input_ids);
  torch::Tensor loser_time_ids;
  if (manifest.added_cond) {
    cond.time_ids = time_ids(batch.winner_original_hw, batch.winner_crop_tl, resolution).to(device);
    loser_time_ids = time_ids(batch.loser_original_hw, batch.loser_crop_tl, resolution).to(device);
  }
  const models::Conditioning pair_cond = cond.repeat_for_pair(loser_time_ids);

  const torch::Tensor eps = torch::cat({eps_pair, eps_pair}, 0);
  const torch::Tensor t2 = torch::cat({t, t}, 0);
  const torch::Tensor x_t = objective::add_noise(schedule, latents, eps, t2.to(device));

  objective::PairErrors errors;
  const torch::Tensor e_policy = per_image_mse(predict(*policy, x_t, t2, pair_cond), eps);
  errors.policy_w = e_policy.slice(0, 0, B);
  errors.policy_l = e_policy.slice(0, B, 2 * B);
  if (reference) {
    torch::NoGradGuard no_grad;
    const torch::Tensor e_ref = per_image_mse(predict(*reference, x_t, t2, pair_cond), eps);
    errors.ref_w = e_ref.slice(0, 0, B);
    errors.ref_l = e_ref.slice(0, B, 2 * B);
  }
  const torch::Tensor C_t = ema.correction(t).to(device);
  const torch::Tensor t_dev = t.to(device);
  const objective::MethodOutput out =
      objective::compute_method(method, errors, t_dev, C_t, method_params, schedule);

  MicroResult r;
  r.loss_sum = out.loss.sum();
  r.errors = errors;
  r.has_z = out.z.defined();
  const auto f64 = [](const torch::Tensor& x) {
    return x.detach().to(torch::kCPU, torch::kFloat64);
  };
  const torch::Tensor nan =
      torch::full({B}, std::numeric_limits<double>::quiet_NaN(), torch::kFloat64);
  r.rows = torch::stack(
      {f64(batch.pair_ids), f64(t), f64(errors.policy_w), f64(errors.policy_l),
       errors.ref_w.defined() ? f64(errors.ref_w) : nan,
       errors.ref_l.defined() ? f64(errors.ref_l) : nan, f64(C_t), r.has_z ? f64(out.z) : nan,
       f64(out.loss), f64(objective::credit_weight(method, out, t_dev, schedule))},
      1);
  if (objective::uses_reference(method)) {
    ema.accumulate(t, objective::transition_estimate(errors, t_dev, schedule).cpu());
  }
  return r;
}

TrainOutcome Trainer::Impl::run() {
  const int64_t max_steps = cfg.train.max_steps;
  const auto run_start = Clock::now();
  const int64_t first_step = step;
  log::info("training steps {} -> {} ({} pairs per step)", step, max_steps, cfg.train.global_batch);
  while (step < max_steps) {
    const auto step_start = Clock::now();
    const double wait_before = loader->wait_seconds();
    const double lr = constant_with_warmup(step, cfg.optim.lr, cfg.optim.warmup_steps);
    const bool poisoned = poisoned_steps.count(step + 1) != 0;

    // ---- training section: micro-batches -> backward (gradients accumulate locally) ----
    // stats: loss sum, pairs, z > 0 count, winner mse (policy, reference) sums.
    torch::Tensor stats = torch::zeros({5}, torch::kFloat64);
    std::vector<torch::Tensor> rows;
    bool has_z = false;
    for (int64_t micro = 0; micro < accumulation; ++micro) {
      const data::PairBatch batch = loader->next();
      MicroResult r = micro_step(batch);
      // Sum over pairs / global batch: the all-reduced sum of gradients is the batch mean's.
      torch::Tensor loss = r.loss_sum / static_cast<double>(cfg.train.global_batch);
      if (poisoned) loss = loss * std::numeric_limits<double>::quiet_NaN();
      loss.backward();
      has_z = r.has_z;
      rows.push_back(r.rows);
      stats[0] += r.rows.select(1, kLoss).sum();
      stats[1] += r.rows.size(0);
      if (has_z) stats[2] += (r.rows.select(1, kZ) > 0).sum();
      stats[3] += r.rows.select(1, kPolicyW).sum();
      if (reference) stats[4] += r.rows.select(1, kRefW).sum();
    }

    // ---- reduce: gradients (all-reduced, or reduce-scattered when sharded), figures ----
    optimizer->reduce_gradients();
    std::vector<torch::Tensor> reduced{stats, ema.pending_sum(), ema.pending_count()};
    comm->all_reduce_sum(reduced, kBucketBytes);
    const torch::Tensor all_rows =
        cfg.logging.per_sample ? comm->all_gather(torch::cat(rows, 0)) : torch::Tensor();

    // ---- update: guard -> clip -> optimizer (+ all-gather when sharded) -> correction ----
    const double grad_norm = optimizer->clip_grad_norm(cfg.optim.grad_clip);
    const double pairs = stats[1].item<double>();
    const double mean_loss = stats[0].item<double>() / pairs;
    const bool finite = std::isfinite(grad_norm) && std::isfinite(mean_loss) && !poisoned;
    if (finite) {
      optimizer->step(lr);
      ema.apply();
      nonfinite_in_row = 0;
    } else {
      ema.clear_pending();
      ++skipped_steps;
      ++nonfinite_in_row;
      log::warn(
          "step {}: non-finite {} (loss {}, grad norm {}): update skipped ({} in a row, limit {})",
          step + 1, std::isfinite(mean_loss) ? "gradient" : "loss", mean_loss, grad_norm,
          nonfinite_in_row, cfg.optim.max_nonfinite_in_row);
    }
    optimizer->zero_grad();
    ++step;

    // ---- metrics (rank 0, global figures), progress, checkpoint, preemption ----
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    const double waited = loader->wait_seconds() - wait_before;
    if (is_main()) {
      json rec = {{"kind", "step"},
                  {"step", step},
                  {"loss", mean_loss},
                  {"lr", lr},
                  {"grad_norm", grad_norm},
                  {"mse_policy", stats[3].item<double>() / pairs},
                  {"pairs_per_s", pairs / step_seconds},
                  {"data_wait_frac", step_seconds > 0 ? std::min(1.0, waited / step_seconds) : 0.0},
                  {"skipped_steps", skipped_steps},
                  {"epoch", loader->state().epoch}};
      rec["implicit_acc"] = has_z ? json(stats[2].item<double>() / pairs) : json(nullptr);
      rec["mse_ref"] = reference ? json(stats[4].item<double>() / pairs) : json(nullptr);
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
    if (nonfinite_in_row >= cfg.optim.max_nonfinite_in_row) {
      const std::string dir = save_checkpoint();
      throw Error({"too many non-finite steps in a row", "step " + std::to_string(step),
                   "fewer than optim.max_nonfinite_in_row = " +
                       std::to_string(cfg.optim.max_nonfinite_in_row),
                   std::to_string(nonfinite_in_row),
                   "the last good weights are saved in " + dir +
                       "; lower optim.lr, check the data, or use precision fp32, then --resume"});
    }
    // Every rank must take the same branch: agree on whether any of them was signalled.
    if (comm->any(stop_requested())) {
      const std::string dir = save_checkpoint();
      log::warn("stop requested (signal {}): checkpoint {} written at step {}; exiting for requeue",
                stop_signal(), dir, step);
      return {step, skipped_steps, last_checkpoint, /*preempted=*/true};
    }
    if (step % cfg.checkpoint.every == 0 || step == max_steps) save_checkpoint();
  }
  return {step, skipped_steps, last_checkpoint, /*preempted=*/false};
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

std::string Trainer::Impl::save_checkpoint() {
  // Rank 0 stages and writes the shared state, every rank its own position (and optimizer
  // shard); the rename that makes it complete happens only after all of them have written.
  const std::string d = store.staging_dir(step);
  if (is_main()) store.stage(step);
  comm->barrier();
  const data::PairLoaderState position = loader->state();
  checkpoint::RankState own;
  own.rank = comm->rank();
  own.world_size = comm->world_size();
  own.epoch = position.epoch;
  own.pairs_consumed = position.pairs_consumed;
  if (optimizer->sharded()) own.optimizer_shard = optimizer->state();
  checkpoint::write_rank_state(d, own);
  if (is_main()) checkpoint::write_shared_state(d, shared_state());
  comm->barrier();
  if (is_main()) {
    last_checkpoint = store.commit(step);
    log::info("checkpoint: {}", last_checkpoint);
  } else {
    last_checkpoint =
        (fs::path(store.root()) / checkpoint::CheckpointStore::step_dir_name(step)).string();
  }
  comm->barrier();
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
  if (saved.config_yaml != config::to_yaml(cfg)) {
    log::warn("resuming from {} with a config that differs from the checkpoint's config.yaml", dir);
  }
  policy->load_parameters(saved.unet, dir);
  const checkpoint::RankState own = checkpoint::read_rank_state(dir, comm->rank(), saved);
  optimizer->load_state(checkpoint::optimizer_state_for(dir, saved, own, optimizer->sharded()),
                        dir);
  objective::CorrectionEma::State correction;
  const torch::Tensor E = saved.correction.to(torch::kFloat64).contiguous();
  correction.E.assign(E.data_ptr<double>(), E.data_ptr<double>() + E.numel());
  correction.momentum = saved.correction_momentum;
  correction.updates = saved.correction_updates;
  ema.load_state(correction);
  step = saved.step;
  skipped_steps = saved.skipped_steps;
  nonfinite_in_row = saved.nonfinite_in_row;
  data::PairLoaderState position;
  position.epoch = own.epoch;
  position.pairs_consumed = own.pairs_consumed;
  loader->load_state(position);
  last_checkpoint = dir;
  log::info("resumed from {} at step {}", dir, step);
}

Trainer::Trainer(config::TrainConfig config, bool resume)
    : impl_(std::make_unique<Impl>(std::move(config), resume)) {}
Trainer::~Trainer() = default;
TrainOutcome Trainer::run() { return impl_->run(); }

}  // namespace dde::train
