// The one typed training configuration: YAML over the documented defaults below, then `--set`
// overrides, then validate(). Unknown keys, wrong types and out-of-range values are dde::Errors
// that name the key by its dotted path (and file:line:column where there is one).
//
// Paths are kept exactly as written and are relative to the working directory of the process, not
// to the config file (what torchrun/SLURM users expect: launch from the repository root).
//
// Knows nothing of models or tensors; the objective, data and training code map these fields onto
// their own option structs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace dde::config {

struct RunConfig {
  std::string output_dir;       // required: checkpoints, metrics.jsonl, logs
  uint64_t seed = 0;            // seeds every RNG of the run (data order, noise, timesteps)
  std::string device = "auto";  // auto | cpu | cuda; auto = cuda when available
};

struct ModelConfig {
  std::string manifest;            // required: manifest.json of the exported policy model
  std::string reference_manifest;  // frozen reference model; "" = the same export as `manifest`
};

struct DataConfig {
  std::string index;              // required: index.json of the preference shards
  int64_t resolution = 0;         // training size in pixels, a multiple of 8; 0 = the manifest's
  bool random_crop = false;       // random instead of center crop after the resize
  bool random_flip = true;        // horizontal flip, p = 0.5 per image (Diffusion-DPO)
  double caption_dropout = 0.2;   // in [0, 1]: probability that a caption becomes ""
  int64_t shuffle_buffer = 1000;  // >= 1 pairs held for shuffling across shards
  int64_t workers = 4;            // >= 1 decode threads
  int64_t prefetch_batches = 4;   // >= 1 decoded micro-batches queued ahead
  bool keep_ties = false;         // false: tied pairs in the shards are skipped (and counted)
};

struct MethodConfig {
  std::string name = "dde";       // sft | uniform | discounted | dde_single | dde_step | dde
  double beta = 5000.0;           // > 0, DPO temperature (Diffusion-DPO default)
  double correction_scale = 1.0;  // s: weight of C_t in dde_step / dde (any finite value)
  double ema_momentum = 0.9;      // mu in [0, 1) of the delayed E update (dde-method.md, 4)
  double gamma = 0.9;             // in (0, 1]: per-sampler-step discount of `discounted`
  int64_t sampler_steps = 50;     // > 0: K, sampler steps the discount counts in
  int64_t t_lo = 0;               // >= 0: timestep window [t_lo, t_hi)
  int64_t t_hi = -1;              // -1 = num_train_timesteps; else t_lo < t_hi <= T
};

struct OptimConfig {
  std::string name = "adamw";         // adamw | adafactor (transformers'; uses lr, weight_decay)
  double lr = 2.048e-5;               // > 0 peak learning rate (1e-8 x 2048, Diffusion-DPO)
  int64_t warmup_steps = 500;         // >= 0 linear warm-up steps, then constant
  double beta1 = 0.9;                 // in [0, 1)
  double beta2 = 0.999;               // in [0, 1)
  double weight_decay = 0.01;         // >= 0, decoupled (AdamW)
  double eps = 1e-8;                  // > 0
  double grad_clip = 1.0;             // >= 0 max global grad norm; 0 disables clipping
  int64_t max_nonfinite_in_row = 10;  // >= 1 consecutive skipped non-finite steps before abort
};

struct TrainLoopConfig {
  int64_t global_batch = 2048;     // >= 1 pairs per optimizer step over all ranks
  int64_t micro_batch = 1;         // >= 1 pairs per forward per rank; accumulation is derived
  int64_t max_steps = 2000;        // >= 1 optimizer steps
  std::string precision = "fp32";  // fp32 | bf16 (autocast for the UNets' forward)
};

struct CheckpointConfig {
  int64_t every = 100;  // >= 1 optimizer steps between checkpoints
  int64_t keep = 3;     // >= 1 most recent checkpoints kept
};

struct LoggingConfig {
  int64_t every = 1;        // >= 1 optimizer steps between metrics lines
  bool per_sample = false;  // also log t, z and loss of every pair
  bool progress = true;     // progress line on the terminal (rank 0)
};

struct DistConfig {
  std::string backend = "auto";  // auto | gloo | nccl; auto = nccl on cuda, else gloo
  int64_t timeout_s = 600;       // > 0 seconds before a collective is declared hung
  bool shard_optimizer = false;  // ZeRO-1: each rank keeps the optimizer state of 1/world of
                                 // the parameters (whole tensors); docs/formats.md, section 3
  std::string init_method =
      "auto";  // env | slurm | auto (torchrun's env, then SLURM's, then 1 rank)
};

struct TrainConfig {
  RunConfig run;
  ModelConfig model;
  DataConfig data;
  MethodConfig method;
  OptimConfig optim;
  TrainLoopConfig train;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  DistConfig dist;
};

bool operator==(const TrainConfig& a, const TrainConfig& b);
bool operator!=(const TrainConfig& a, const TrainConfig& b);

// Reads `path`, applies `overrides` ("section.key=value", the value parsed as YAML, e.g.
// "optim.lr=1e-4", "method.name=uniform") and validates. Throws dde::Error.
TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// The YAML tree (a map of sections, or null for all defaults) over the defaults, then validate().
// `source_name` names the tree in errors (a file name, "<string>", ...).
TrainConfig config_from_yaml(const YAML::Node& root, const std::string& source_name);

// Every field, every section, in declaration order; load(to_yaml(c)) == c.
std::string to_yaml(const TrainConfig& config);

// Range, choice, required and cross-field checks. Throws dde::Error naming the key.
void validate(const TrainConfig& config);

// Checks the timestep window against the schedule's T (known once the model is loaded).
void validate_against_timesteps(const TrainConfig& config, int64_t num_timesteps);
// method.t_hi with -1 resolved to num_timesteps.
int64_t effective_t_hi(const MethodConfig& method, int64_t num_timesteps);

// global_batch / (micro_batch x world_size); throws dde::Error unless it divides exactly.
int64_t accumulation_steps(const TrainConfig& config, int64_t world_size);

}  // namespace dde::config
