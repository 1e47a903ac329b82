#include <fmt/format.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <utility>

#include "dde/dist/device.hpp"
#include "dde/pairs/cache_encoder.hpp"
#include "dde/pairs/caption_tokenizers.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/log.hpp"
#include "dde/util/threads.hpp"
#include "trainer_impl.hpp"

// The trainer's builder: everything a run needs, made from the config in dependency order.
namespace dde::train {
namespace {

namespace fs = std::filesystem;

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

// The loader's options: the data section, the batch, the rank, and what the manifest's text
// encoders expect of the shards.
data::PairLoaderOptions loader_options(const config::TrainConfig& cfg,
                                       const models::Manifest& manifest, int64_t resolution,
                                       const dist::Communicator& comm,
                                       const torch::Device& device) {
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
  lo.rank = comm.rank();
  lo.world_size = comm.world_size();
  lo.max_image_pixels = cfg.data.max_image_pixels;
  lo.verify_sha256 = cfg.data.verify;
  lo.pin_memory = device.is_cuda();
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    lo.empty_prompt_ids.push_back(e.empty_prompt_ids);
    lo.expected_vocab_sha256.push_back(e.vocab_sha256);
  }
  lo.caption_tokenizers = pairs::caption_tokenizer_specs(manifest);
  if (!cfg.data.cache.empty()) {
    lo.cache_index = cfg.data.cache;
    lo.cache_expected = pairs::cache_expectation(cfg, manifest, resolution);
  }
  return lo;
}

objective::TimestepSamplerOptions sampler_options(const config::MethodConfig& m,
                                                  objective::Method method,
                                                  const objective::NoiseSchedule& schedule) {
  objective::TimestepSamplerOptions o;
  o.distribution = objective::method_distribution(method);
  o.num_timesteps = schedule.num_timesteps;
  o.gamma = m.gamma;
  o.single_shot = schedule.single_shot;  // uniform_ct: p(t) proportional to c_t
  o.sampler_steps = m.sampler_steps;
  o.t_lo = m.t_lo;
  o.t_hi = config::effective_t_hi(m, schedule.num_timesteps);
  return o;
}

}  // namespace

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
      store((fs::path(cfg.run.output_dir) / "checkpoints").string(), cfg.checkpoint.keep),
      memory(device) {
  log::set_rank(static_cast<int>(env.rank));
  const util::ThreadBudget threads = util::apply_thread_budget(cfg.run.threads, cfg.data.workers);
  decode_worker_nice = threads.worker_nice;
  thread_tuner = util::ThreadTuner(threads.intra_op, threads.adaptive);
  comm = dist::Communicator::create(env, cfg.dist.backend, device,
                                    std::chrono::seconds(cfg.dist.timeout_s),
                                    cfg.dist.force_process_group);
  config::validate_against_timesteps(cfg, manifest.num_train_timesteps);
  configure_method();
  resolution = pairs::resolve_resolution(cfg.data.resolution, manifest);
  accumulation = config::accumulation_steps(cfg, comm->world_size());
  sampler =
      std::make_unique<objective::TimestepSampler>(sampler_options(cfg.method, method, schedule));

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
  load_models();
  optimizer = DataParallelOptimizer::create(policy->named_parameters(), cfg.optim,
                                            cfg.dist.shard_optimizer, *comm, kBucketBytes);
  make_loader();
  make_evaluator();
  start_outputs(start);
}

void Trainer::Impl::configure_method() {
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
  method_params.mapo_beta = cfg.method.mapo_beta;
  method_params.mapo_snr = cfg.method.mapo_snr;
}

void Trainer::Impl::load_models() {
  models::UNetOptions policy_options;
  policy_options.trainable = true;
  policy_options.gradient_checkpointing = cfg.train.gradient_checkpointing;
  policy_options.fp32_output_head = cfg.train.fp32_output_head;
  policy_options.lora = {cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.run.seed};
  policy = std::make_unique<models::UNet>(manifest, device, policy_options);
  int64_t trained = 0;
  for (const torch::Tensor& p : policy->parameters()) trained += p.numel();
  if (!policy->has_adapters()) {
    log::info("policy UNet: the whole UNet, {} parameters trained", trained);
  } else {
    std::string targets;
    for (const std::string& t : cfg.lora.targets) targets += (targets.empty() ? "" : ", ") + t;
    const double alpha = cfg.lora.alpha > 0 ? cfg.lora.alpha : static_cast<double>(cfg.lora.rank);
    log::info(
        "LoRA: rank {}, alpha {} (scale {:.6g}) on {} linear layers ({}): {} parameters "
        "trained",
        cfg.lora.rank, alpha, alpha / static_cast<double>(cfg.lora.rank),
        policy->adapted_modules().size(), targets, trained);
    const auto start = std::chrono::steady_clock::now();
    const std::string& base = base_identity();
    log::info("LoRA: base UNet sha256 {} ({:.1f} s; checkpoints record it, a resume checks it)",
              base,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const torch::ScalarType frozen = pairs::frozen_dtype(cfg.model.frozen_dtype);
  if (objective::uses_reference(method) && policy->has_adapters()) {
    reference = policy->base_view();
    log::info(
        "reference UNet: the policy's base weights with the adapters off (LoRA: one UNet "
        "in memory)");
  } else if (objective::uses_reference(method)) {
    models::UNetOptions reference_options;
    reference_options.dtype = frozen;
    reference_options.fp32_output_head = cfg.train.fp32_output_head;
    reference = std::make_unique<models::UNet>(reference_manifest, device, reference_options);
    log::info("reference UNet: loaded ({}, frozen)", c10::toString(frozen));
  } else {
    log::info("reference UNet: none (method {} trains without one)",
              objective::method_name(method));
  }
  // A latent cache replaces the frozen encoders; the held-out evaluator still encodes images.
  if (cfg.data.cache.empty() || !cfg.data.eval_index.empty()) {
    text = std::make_unique<models::TextConditioner>(manifest, device, frozen);
    vae = std::make_unique<models::LatentEncoder>(manifest, device, frozen);
  }
  pair_path = std::make_unique<pairs::PairPath>(manifest, schedule, device, resolution, text.get(),
                                                vae.get());
}

void Trainer::Impl::make_loader() {
  data::PairLoaderOptions options = loader_options(cfg, manifest, resolution, *comm, device);
  options.worker_nice = decode_worker_nice;
  loader = std::make_unique<data::PairLoader>(options);
}

void Trainer::Impl::make_evaluator() {
  if (cfg.data.eval_index.empty()) return;
  evaluator = std::make_unique<Evaluator>(EvaluatorContext{
      &cfg, &manifest, &reference_manifest, policy.get(), reference.get(), text.get(), vae.get(),
      [this](models::UNet& unet, const torch::Tensor& x, const torch::Tensor& t,
             const models::Conditioning& cond) { return predict(unet, x, t, cond); },
      &schedule, method, method_params, comm.get(), device, resolution});
}

// The run folder, the validation images, resume, rank 0's weights everywhere, metrics.
void Trainer::Impl::start_outputs(const StartOptions& start) {
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
