// The one typed training configuration: YAML over the documented defaults (docs/config.md), then
// `--set` overrides, then validate(). Unknown keys, wrong types and out-of-range values are
// dde::Errors that name the key by its dotted path (and file:line:column where there is one).
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

// The sections of TrainConfig. Each field's meaning, type, allowed values and YAML key are declared
// once, in the field table (src/config/field_table.hpp), with the member initialisers below as the
// defaults; docs/config.md is generated from both (config_reference_markdown()).

struct RunConfig {
  std::string output_dir;
  uint64_t seed = 0;
  std::string device = "auto";
  int64_t threads = 0;
  std::string cuda_sync_debug = "off";
};

struct ModelConfig {
  std::string manifest;
  std::string reference_manifest;
  std::string frozen_dtype = "fp32";
};

// model.lora: low-rank adapters on the UNet's linear layers (docs/method.md §8.2). rank 0 = off
// (the whole UNet is trained against a frozen copy). With rank > 0 only the adapters train, and
// the reference is the same UNet with its adapters off: one copy of the weights.
struct LoraConfig {
  int64_t rank = 0;
  double alpha = 0.0;  // the adapters' scale is alpha / rank; 0 = rank (scale 1)
  std::vector<std::string> targets = {"to_q", "to_k", "to_v", "to_out.0"};
};

struct DataConfig {
  std::string index;
  int64_t resolution = 0;
  bool random_crop = false;
  bool random_flip = true;
  double caption_dropout = 0.2;
  int64_t shuffle_buffer = 1000;
  int64_t workers = 4;
  int64_t prefetch_batches = 4;
  bool keep_ties = false;
  int64_t max_image_pixels = 89478485;
  int64_t max_bad_pairs = 100;
  bool verify = false;
  std::string eval_index;
  std::string cache;
};

struct MethodConfig {
  std::string name = "dde";
  double beta = 5000.0;
  double correction_scale = 1.0;
  double ema_momentum = 0.9;
  double gamma = 0.9;
  int64_t sampler_steps = 50;
  int64_t t_lo = 0;
  int64_t t_hi = -1;
  std::string temperature = "paper";
  bool ema_debias = false;
  double mapo_beta = 0.1;  // mapo (docs/method.md §8.1): b, the margin term's weight
  double mapo_snr = 0.5;   // mapo: s, scales the errors inside f
};

struct OptimConfig {
  std::string name = "adamw";
  double lr = 2.048e-5;
  int64_t warmup_steps = 500;
  std::string schedule = "constant";
  double min_lr_ratio = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 0.01;
  double eps = 1e-8;
  double grad_clip = 1.0;
  int64_t max_nonfinite_in_row = 10;
  double max_weight_change = 0.5;
};

struct TrainLoopConfig {
  int64_t global_batch = 2048;
  int64_t micro_batch = 1;
  int64_t max_steps = 2000;
  std::string precision = "fp32";
  bool fp32_output_head = true;
  bool gradient_checkpointing = false;
  bool allow_tf32 = true;
};

struct CheckpointConfig {
  int64_t every = 100;
  int64_t keep = 3;
  int64_t timeout_s = 3600;
};

struct LoggingConfig {
  int64_t every = 1;
  bool per_sample = false;
  bool progress = true;
  bool tensorboard = false;
  int64_t dump_step = 0;
};

struct EvalConfig {
  int64_t every = 100;
  std::vector<int64_t> t_bins = {100, 300, 500, 700, 900};
  uint64_t seed = 0;
  int64_t max_bad_pairs = 10;
};

// eval.sample.prompts, in one of three forms: a count (8), the captions themselves
// (["a red cube", "a cat"]) or the path of a UTF-8 text file with one caption per line.
struct PromptList {
  int64_t count = 4;               // > 0: the first `count` distinct captions of the shards
  std::vector<std::string> texts;  // typed captions in grid order ("" is the unconditional one)
  std::string file;                // one caption per line, blank lines skipped
  bool typed() const { return !texts.empty() || !file.empty(); }
};
bool operator==(const PromptList& a, const PromptList& b);
bool operator!=(const PromptList& a, const PromptList& b);

struct SampleConfig {
  int64_t every = 0;
  PromptList prompts;
  uint64_t seed = 0;
  int64_t steps = 20;
  double guidance = 5.0;
};

struct DistConfig {
  std::string backend = "auto";
  int64_t timeout_s = 600;
  bool shard_optimizer = false;
  std::string init_method = "auto";
  bool force_process_group = false;
};

struct TrainConfig {
  RunConfig run;
  ModelConfig model;
  LoraConfig lora;  // the YAML section model.lora
  DataConfig data;
  MethodConfig method;
  OptimConfig optim;
  TrainLoopConfig train;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  EvalConfig eval;
  SampleConfig sample;  // the YAML section eval.sample
  DistConfig dist;
};

bool operator==(const TrainConfig& a, const TrainConfig& b);
bool operator!=(const TrainConfig& a, const TrainConfig& b);

// Reads `path`, applies `overrides` ("section.key=value", the value parsed as YAML, e.g.
// "optim.lr=1e-4", "method.name=uniform") and validates. Throws dde::Error.
TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Refuses, before a YAML text (a config file, a --set value, a checkpoint's config.yaml) becomes a
// tree, what a config does not hold: a text over 1 MiB, nesting deeper than 32 levels, lists over
// 4096 entries, maps over 1024 keys, strings over 4096 bytes (dde/util/input_limits.hpp), anchors
// and aliases, tags and merge keys (<<); a dde::Error located at source:line:column. A syntax
// error is left to YAML::Load (or thrown here as yaml-cpp's YAML::ParserException).
void check_yaml_text(const std::string& text, const std::string& source);

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

// Every input file the config names (model.manifest, model.reference_manifest, data.index,
// data.eval_index, data.cache) exists and is a regular file; else a dde::Error naming the key and
// the absolute path, and a folder given for a file as such. (--dry-run and the trainer's start.)
void check_input_files(const TrainConfig& config);

// global_batch / (micro_batch x world_size); throws dde::Error unless it divides exactly.
int64_t accumulation_steps(const TrainConfig& config, int64_t world_size);

// A key whose value differs between two configs (a resume against its checkpoint's config.yaml).
struct ConfigChange {
  std::string key;  // dotted path, e.g. "optim.lr"
  std::string before, after;
};
// Every key that differs, in file order, with both values as config_from_yaml would read them.
std::vector<ConfigChange> config_changes(const TrainConfig& before, const TrainConfig& after);

// docs/config.md: per section, a markdown table of every key (dotted path), its type, its default
// (as to_yaml prints it), the values it allows and its documentation (dde_train
// --config-reference).
std::string config_reference_markdown();

}  // namespace dde::config
