#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "dde/data/shard_index.hpp"
#include "dde/train/stop_signal.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"
#include "trainer_impl.hpp"

// The trainer's state on disk and its guards: checkpoints and resume (the layout is
// checkpoint/training_checkpoint.hpp's), the check after an update and the roll-back, and the
// stops that save first.
namespace dde::train {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

// lora.json's fields that must match for a resume (the adapters' shapes and what they adapt).
json lora_identity(const json& lora) {
  return {{"rank", lora.at("rank")},
          {"alpha", lora.at("alpha")},
          {"targets", lora.at("targets")},
          {"base", lora.at("base").at("unet_sha256")}};
}

json parse_lora_json(const std::string& text, const std::string& path) {
  try {
    json j = json::parse(text);
    lora_identity(j);  // every field present
    return j;
  } catch (const json::exception& e) {
    throw Error({"damaged LoRA checkpoint file", path,
                 "the lora.json dde_train writes (format dde-lora, rank, alpha, targets, base)",
                 e.what(), "resume from an earlier checkpoint"});
  }
}
}  // namespace

// The base UNet's identity: the sha256 over its unit files' sha256, in manifest order; hashed
// once per process (a few seconds for SDXL's 10 GB).
const std::string& Trainer::Impl::base_identity() {
  if (base_unet_sha256.empty()) {
    std::string joined;
    for (const models::UNetBlockInfo& b : manifest.unet_blocks) {
      joined += b.name + " " + data::file_sha256(b.file) + "\n";
    }
    base_unet_sha256 = data::sha256_hex(joined);
  }
  return base_unet_sha256;
}

std::string Trainer::Impl::lora_json() {
  const double alpha = cfg.lora.alpha > 0 ? cfg.lora.alpha : static_cast<double>(cfg.lora.rank);
  json unet_config;
  try {
    unet_config = json::parse(manifest.unet_config_json);
  } catch (const json::exception&) {
    unet_config = manifest.unet_config_json;  // kept verbatim
  }
  const json doc = {{"format", "dde-lora"},
                    {"version", 1},
                    {"rank", cfg.lora.rank},
                    {"alpha", alpha},
                    {"targets", cfg.lora.targets},
                    {"modules", policy->adapted_modules()},
                    {"base", {{"manifest", manifest.path}, {"unet_sha256", base_identity()}}},
                    {"unet_config", unet_config}};
  return doc.dump(2) + "\n";
}

// A LoRA checkpoint resumes only as the same LoRA on the same base; a full one only without.
void Trainer::Impl::check_lora_resume(const std::string& dir,
                                      const checkpoint::SharedState& saved) {
  const std::string path = (fs::path(dir) / "lora" / "lora.json").string();
  const bool now = policy->has_adapters();
  if (saved.lora_json.empty() != !now) {
    throw Error({now ? "resuming LoRA training from a full checkpoint"
                     : "resuming full training from a LoRA checkpoint",
                 dir, now ? "lora/ (model.lora.rank > 0)" : "unet/ (model.lora.rank: 0)",
                 now ? "unet/" : "lora/",
                 "resume with the checkpoint's model.lora, or start a new run directory"});
  }
  if (!now) return;
  const json before = lora_identity(parse_lora_json(saved.lora_json, path));
  const json after = lora_identity(json::parse(lora_json()));
  if (before.at("base") != after.at("base")) {
    throw Error({"resuming LoRA adapters on another base model", path + ": base.unet_sha256",
                 "the base they were trained on: " + before.at("base").get<std::string>() + " (" +
                     parse_lora_json(saved.lora_json, path).at("base").value("manifest", "?") + ")",
                 "this run's model.manifest: " + after.at("base").get<std::string>() + " (" +
                     manifest.path + ")",
                 "resume with the manifest of the base they were trained on, or start a new run"});
  }
  if (before != after) {
    throw Error({"resuming LoRA adapters of another shape", path, before.dump(), after.dump(),
                 "resume with the checkpoint's model.lora (rank, alpha, targets)"});
  }
}

torch::Tensor global_norm(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> floating;
  for (const torch::Tensor& t : tensors) {
    if (t.defined() && t.is_floating_point() && t.numel() > 0) floating.push_back(t.detach());
  }
  if (floating.empty()) return torch::zeros({}, torch::kFloat64);
  const std::vector<torch::Tensor> norms = torch::_foreach_norm(floating, 2);
  return torch::stack(norms).to(torch::kFloat64).pow(2).sum().sqrt();
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
  own.intra_op_threads = thread_tuner.decision();
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

checkpoint::SharedState Trainer::Impl::shared_state() {
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
  if (policy->has_adapters()) s.lora_json = lora_json();
  s.config_yaml = config::to_yaml(cfg);
  return s;
}

void Trainer::Impl::restore(const std::string& dir) {
  const checkpoint::SharedState saved = checkpoint::read_shared_state(dir);
  checkpoint::check_resumable(dir, saved,
                              {objective::method_name(method), cfg.optim.name, comm->world_size()});
  check_lora_resume(dir, saved);
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
  thread_tuner.restore(own.intra_op_threads);
  if (thread_tuner.changed_last_step())
    at::set_num_threads(static_cast<int>(thread_tuner.threads()));
  if (thread_tuner.decision() > 0) log::info("threads: {}", thread_tuner.summary());
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

// More bad pairs than data.max_bad_pairs over all ranks (the same global count on every rank):
// the weights are saved for --resume, and every bad pair is in metrics.jsonl and train.log.
void Trainer::Impl::stop_for_bad_pairs(int64_t bad_total) {
  const std::string dir = save_checkpoint(loader->state());
  std::string reasons;
  for (const auto& [reason, count] : bad_pairs_by_reason) {
    reasons += fmt::format("{}{} {}", reasons.empty() ? "" : ", ", reason, count);
  }
  throw Error({"too many bad pairs in the data", "step " + std::to_string(step),
               "at most data.max_bad_pairs = " + std::to_string(cfg.data.max_bad_pairs),
               fmt::format("{} skipped over all ranks{}", bad_total,
                           reasons.empty() ? "" : " (seen by rank 0's process: " + reasons + ")"),
               "each one is in metrics.jsonl (kind bad_pair) and train.log; re-export those "
               "shards, or raise data.max_bad_pairs; the weights are saved in " +
                   dir + " for --resume"});
}

}  // namespace dde::train
