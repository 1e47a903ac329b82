// The field table: every key of every section of TrainConfig, in file order, with its rule and its
// one-line documentation. The loader, --set, to_yaml, validate, the resume diff and
// docs/config.md (config_reference_markdown) all read it. Private to src/config/.
//
// A visitor is called as v(field, &TrainConfig::section, &Section::key); the default value is the
// member's initialiser in config.hpp.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/data/limits.hpp"
#include "rule.hpp"

namespace dde::config::detail {

struct Field {
  const char* section;  // dotted for a subsection: "eval.sample"
  const char* key;
  Rule rule;
  const char* doc;  // one line, for docs/config.md

  std::string path() const { return std::string(section) + "." + key; }
};

// f(key, &Section::key, rule, doc) calls v with the section filled in.
template <typename Visitor, typename Section>
auto section_of(Visitor& v, const char* name, Section TrainConfig::*member) {
  return [&v, name, member](const char* key, auto field, Rule rule, const char* doc) {
    v(Field{name, key, std::move(rule), doc}, member, field);
  };
}

template <typename Visitor>
void run_fields(Visitor& v) {
  const auto f = section_of(v, "run", &TrainConfig::run);
  f("output_dir", &RunConfig::output_dir, required(),
    "Folder of the run: checkpoints, metrics.jsonl, logs.");
  f("seed", &RunConfig::seed, any(), "Seeds every RNG of the run (data order, noise, timesteps).");
  f("device", &RunConfig::device, one_of({"auto", "cpu", "cuda", "privateuseone"}),
    "auto = cuda when available. privateuseone: an out-of-tree backend registered as PyTorch's "
    "PrivateUse1 (the tests' strict fake accelerator).");
  f("threads", &RunConfig::threads, at_most(at_least(0), 4096),
    "LibTorch intra-op threads; 0 = every CPU this process is given (affinity, Slurm's "
    "--cpus-per-task), with the decode workers at a lower priority (nice +10), so that they use "
    "what the compute leaves idle (util/threads.hpp); after the first steps, CPUs may move to "
    "the workers where their measured use makes the steps faster (util/thread_tuner.hpp; the "
    "choice is saved in the checkpoint). Set, it keeps the workers' priority and nothing is "
    "tuned. Logged at start-up.");
  f("cuda_sync_debug", &RunConfig::cuda_sync_debug, one_of({"off", "warn", "error"}),
    "CUDA sync debug mode inside the micro-batch loop: a host sync there warns or throws "
    "(torch.cuda.set_sync_debug_mode). No effect on the CPU.");
}

template <typename Visitor>
void model_fields(Visitor& v) {
  const auto f = section_of(v, "model", &TrainConfig::model);
  f("manifest", &ModelConfig::manifest, required(), "manifest.json of the exported policy model.");
  f("reference_manifest", &ModelConfig::reference_manifest, any(),
    "The frozen reference model; \"\" = the same export as model.manifest.");
  f("frozen_dtype", &ModelConfig::frozen_dtype, one_of({"fp32", "bf16"}),
    "Weights of the reference UNet, VAE and text encoders (bf16 ones run under bf16 autocast).");
}

// A subsection: the YAML map model: {lora: {...}}, the paths model.lora.<key>.
template <typename Visitor>
void lora_fields(Visitor& v) {
  const auto f = section_of(v, "model.lora", &TrainConfig::lora);
  f("rank", &LoraConfig::rank, at_most(at_least(0), 1024),
    "Adapter rank r; 0 = no adapters: the whole UNet trains (diffusers' DPO script: 8).");
  f("alpha", &LoraConfig::alpha, at_least(0),
    "The adapters' scale is alpha / rank; 0 = rank (scale 1, as diffusers' DPO script).");
  f("targets", &LoraConfig::targets, non_empty_list(any()),
    "Linear layers that get adapters, by the end of their diffusers module name (peft's "
    "target_modules): the attention projections by default.");
}

template <typename Visitor>
void data_fields(Visitor& v) {
  const auto f = section_of(v, "data", &TrainConfig::data);
  f("index", &DataConfig::index, required(), "index.json of the preference shards.");
  f("resolution", &DataConfig::resolution, at_most(multiple_of(8), data::kMaxResolution),
    "Training size in pixels; 0 = the manifest's.");
  f("random_crop", &DataConfig::random_crop, any(),
    "Random instead of center crop after the resize.");
  f("random_flip", &DataConfig::random_flip, any(),
    "Horizontal flip, p = 0.5 per image (Diffusion-DPO).");
  f("caption_dropout", &DataConfig::caption_dropout, between(0, false, 1, false),
    "Probability that a caption becomes \"\".");
  f("shuffle_buffer", &DataConfig::shuffle_buffer, at_most(at_least(1), data::kMaxShuffleBuffer),
    "Pairs held for shuffling across shards.");
  f("workers", &DataConfig::workers, at_most(at_least(1), data::kMaxWorkers), "Decode threads.");
  f("prefetch_batches", &DataConfig::prefetch_batches,
    at_most(at_least(1), data::kMaxPrefetchBatches), "Decoded micro-batches queued ahead.");
  f("keep_ties", &DataConfig::keep_ties, any(),
    "false: tied pairs in the shards are skipped (and counted).");
  f("max_image_pixels", &DataConfig::max_image_pixels, at_most(at_least(1), data::kMaxImagePixels),
    "Images whose header claims more pixels are bad pairs (Pillow's MAX_IMAGE_PIXELS), as are "
    "those with an aspect ratio over 20; both are refused before any pixel is allocated.");
  f("max_bad_pairs", &DataConfig::max_bad_pairs, at_least(0),
    "Skipped bad pairs (all ranks) before the run stops.");
  f("verify", &DataConfig::verify, any(),
    "sha256 every shard at start (sizes and counts are always checked).");
  f("eval_index", &DataConfig::eval_index, any(),
    "index.json of held-out shards; \"\" = no held-out evaluation.");
  f("cache", &DataConfig::cache, any(),
    "index.json of a latent cache of data.index (dde_encode_cache); \"\" = encode the images and "
    "captions while training. With a cache the VAE and text encoders are not loaded (unless "
    "data.eval_index needs them); data.random_crop is then an error.");
}

inline const std::vector<std::string>& method_names() {
  static const std::vector<std::string> names = {"sft",      "uniform", "discounted", "dde_single",
                                                 "dde_step", "dde",     "uniform_ct", "mapo"};
  return names;
}

template <typename Visitor>
void method_fields(Visitor& v) {
  const auto f = section_of(v, "method", &TrainConfig::method);
  f("name", &MethodConfig::name, one_of(method_names()), "The objective (docs/method.md §7.3).");
  f("beta", &MethodConfig::beta, above(0), "DPO temperature (Diffusion-DPO's default).");
  f("correction_scale", &MethodConfig::correction_scale, any(),
    "s: weight of C_t in dde_step and dde.");
  f("ema_momentum", &MethodConfig::ema_momentum, between(0, false, 1, true),
    "mu of the delayed E update (docs/method.md §4).");
  f("gamma", &MethodConfig::gamma, between(0, true, 1, false),
    "Per-sampler-step discount of `discounted`.");
  f("sampler_steps", &MethodConfig::sampler_steps, at_least(1),
    "K, the sampler steps the discount counts in.");
  f("t_lo", &MethodConfig::t_lo, at_least(0), "Timestep window [t_lo, t_hi): its start.");
  f("t_hi", &MethodConfig::t_hi, at_least(-1),
    "Timestep window [t_lo, t_hi): its end; -1 = num_train_timesteps, else t_lo < t_hi <= T.");
  f("temperature", &MethodConfig::temperature, one_of({"paper", "calibrated"}),
    "calibrated (dde_single and dde only): every beta in z becomes beta / G, G the geometric mean "
    "of c_t over the sampleable t (docs/method.md §7.1).");
  f("ema_debias", &MethodConfig::ema_debias, any(),
    "C_t from E[k] / (1 - mu^n[k]) (docs/method.md §7.2).");
  f("mapo_beta", &MethodConfig::mapo_beta, above(0),
    "mapo: b, the weight of the margin term (MaPO's default; docs/method.md §8.1).");
  f("mapo_snr", &MethodConfig::mapo_snr, above(0),
    "mapo: s, scales the errors inside f(x) = x / (e^x - 1) (MaPO's default).");
}

template <typename Visitor>
void optim_fields(Visitor& v) {
  const auto f = section_of(v, "optim", &TrainConfig::optim);
  f("name", &OptimConfig::name, one_of({"adamw", "adafactor"}),
    "adafactor: transformers' Adafactor (uses lr and weight_decay).");
  f("lr", &OptimConfig::lr, above(0), "Peak learning rate (1e-8 x 2048, Diffusion-DPO).");
  f("warmup_steps", &OptimConfig::warmup_steps, at_least(0),
    "Linear warm-up steps, then the schedule.");
  f("schedule", &OptimConfig::schedule, one_of({"constant", "cosine", "linear"}),
    "After warm-up the lr stays (constant, the paper's), or decays to min_lr_ratio x lr at "
    "train.max_steps along a half cosine or a line.");
  f("min_lr_ratio", &OptimConfig::min_lr_ratio, between(0, false, 1, false),
    "The decaying schedules' final lr / lr.");
  f("beta1", &OptimConfig::beta1, between(0, false, 1, true), "AdamW's beta1.");
  f("beta2", &OptimConfig::beta2, between(0, false, 1, true), "AdamW's beta2.");
  f("weight_decay", &OptimConfig::weight_decay, at_least(0), "Decoupled weight decay (AdamW).");
  f("eps", &OptimConfig::eps, above(0), "AdamW's epsilon.");
  f("grad_clip", &OptimConfig::grad_clip, at_least(0),
    "Max global gradient norm; 0 disables clipping.");
  f("max_nonfinite_in_row", &OptimConfig::max_nonfinite_in_row, at_least(1),
    "Consecutive failed steps before the run stops.");
  f("max_weight_change", &OptimConfig::max_weight_change, above(0),
    "A step whose update changes the weights' global 2-norm by more than this fraction of it "
    "fails, as a non-finite one does (it is rolled back to the last checkpoint that passed).");
}

template <typename Visitor>
void train_fields(Visitor& v) {
  const auto f = section_of(v, "train", &TrainConfig::train);
  f("global_batch", &TrainLoopConfig::global_batch, at_least(1),
    "Pairs per optimizer step over all ranks.");
  f("micro_batch", &TrainLoopConfig::micro_batch, at_most(at_least(1), data::kMaxBatchPixels),
    "Pairs per forward per rank; the accumulation steps are derived.");
  f("max_steps", &TrainLoopConfig::max_steps, at_least(1), "Optimizer steps.");
  f("precision", &TrainLoopConfig::precision, one_of({"fp32", "bf16"}),
    "bf16: autocast for the UNets' forward.");
  f("fp32_output_head", &TrainLoopConfig::fp32_output_head, any(),
    "bf16: the UNets' output head (conv_norm_out, conv_out) of an fp32 model still runs in fp32, "
    "so the per-pair errors that form Delta carry fp32 rather than bf16 rounding "
    "(bench/README.md).");
  f("gradient_checkpointing", &TrainLoopConfig::gradient_checkpointing, any(),
    "Recompute each UNet block in backward.");
  f("allow_tf32", &TrainLoopConfig::allow_tf32, any(),
    "CUDA: TF32 tensor cores for fp32 matmuls and convolutions.");
}

template <typename Visitor>
void checkpoint_fields(Visitor& v) {
  const auto f = section_of(v, "checkpoint", &TrainConfig::checkpoint);
  f("every", &CheckpointConfig::every, at_least(1), "Optimizer steps between checkpoints.");
  f("keep", &CheckpointConfig::keep, at_least(1), "Most recent checkpoints kept.");
  f("timeout_s", &CheckpointConfig::timeout_s, at_least(1),
    "Seconds the ranks wait for each other around a checkpoint write (a 10 GB SDXL state on a "
    "slow disk outlasts dist.timeout_s, which bounds the training collectives).");
}

template <typename Visitor>
void logging_fields(Visitor& v) {
  const auto f = section_of(v, "logging", &TrainConfig::logging);
  f("every", &LoggingConfig::every, at_least(1), "Optimizer steps between metrics lines.");
  f("per_sample", &LoggingConfig::per_sample, any(), "Also log t, z and loss of every pair.");
  f("progress", &LoggingConfig::progress, any(), "Progress line on the terminal (rank 0).");
  f("tensorboard", &LoggingConfig::tensorboard, any(),
    "Also TensorBoard event files in run.output_dir/tensorboard.");
  f("dump_step", &LoggingConfig::dump_step, at_least(0),
    "Write the first micro-batch of this step (inputs, noise, per-pair errors) to debug/ for "
    "parity checks; 0 = never.");
}

template <typename Visitor>
void eval_fields(Visitor& v) {
  const auto f = section_of(v, "eval", &TrainConfig::eval);
  f("every", &EvalConfig::every, at_least(1), "Optimizer steps between evaluations.");
  f("t_bins", &EvalConfig::t_bins, non_empty_list(at_least(0)),
    "The timesteps each held-out pair is evaluated at, each below T.");
  f("seed", &EvalConfig::seed, any(),
    "Seeds the evaluation noise; not run.seed, so runs stay comparable.");
  f("max_bad_pairs", &EvalConfig::max_bad_pairs, at_least(0),
    "Held-out pairs (per rank) that fail the training set's checks (decode, vocabulary) and are "
    "left out and counted before the run stops.");
}

// A subsection: the YAML map eval: {sample: {...}}, the paths eval.sample.<key>.
template <typename Visitor>
void sample_fields(Visitor& v) {
  const auto f = section_of(v, "eval.sample", &TrainConfig::sample);
  f("every", &SampleConfig::every, at_least(0),
    "Optimizer steps between grids; 0 = no validation images.");
  f("prompts", &SampleConfig::prompts, at_most(at_least(1), 64),
    "The captions sampled (one image each, four to a row): a count (the first N distinct "
    "captions of the shards), a list of captions ([\"a red cube\", \"\"]; \"\" is the "
    "unconditional image), or the path of a UTF-8 file with one caption per line (blank lines "
    "skipped). Typed captions are tokenized in C++ for every text encoder (docs/tokenizer.md).");
  f("seed", &SampleConfig::seed, any(), "Image i starts from torch.randn with the seed seed + i.");
  f("steps", &SampleConfig::steps, at_most(at_least(1), 1000),
    "DDIM steps (diffusers' leading spacing, offset 1).");
  f("guidance", &SampleConfig::guidance, at_most(at_least(0), 100),
    "Classifier-free guidance scale; <= 1: no guidance (as diffusers).");
}

template <typename Visitor>
void dist_fields(Visitor& v) {
  const auto f = section_of(v, "dist", &TrainConfig::dist);
  f("backend", &DistConfig::backend, one_of({"auto", "gloo", "nccl"}),
    "auto = nccl on cuda, else gloo.");
  f("timeout_s", &DistConfig::timeout_s, at_least(1),
    "Seconds before a collective is declared hung.");
  f("shard_optimizer", &DistConfig::shard_optimizer, any(),
    "ZeRO-1: each rank keeps the optimizer state of 1/world of the parameters (whole tensors); "
    "docs/formats.md, section 3.");
  f("init_method", &DistConfig::init_method, one_of({"env", "slurm", "auto"}),
    "auto: torchrun's env, then SLURM's, then 1 rank.");
  f("force_process_group", &DistConfig::force_process_group, any(),
    "A real process group at world size 1 (tests NCCL on 1 GPU).");
}

// Every field of every section, in file order.
template <typename Visitor>
void for_each_field(Visitor&& v) {
  run_fields(v);
  model_fields(v);
  lora_fields(v);
  data_fields(v);
  method_fields(v);
  optim_fields(v);
  train_fields(v);
  checkpoint_fields(v);
  logging_fields(v);
  eval_fields(v);
  sample_fields(v);
  dist_fields(v);
}

// What a section is for (docs/config.md), by its dotted name; "" for none.
inline const char* section_doc(const std::string& section) {
  static const std::vector<std::pair<std::string, const char*>> docs = {
      {"run", "Where the run writes, its seed, device and threads."},
      {"model", "The exported models (python -m dde_tools.export_models)."},
      {"model.lora",
       "LoRA (docs/method.md §8.2): with rank > 0 the trainer adds adapters W + (alpha / rank) "
       "B A to the targeted linear layers of the UNet and trains only A and B (B starts at 0, so "
       "the policy is the base at step 0). The reference is the same weights with the adapters "
       "off: one UNet in memory. Checkpoints hold the adapters and the base's identity; "
       "export_diffusers --lora writes a diffusers LoRA folder."},
      {"data", "The preference pairs (tar shards) and how they are decoded."},
      {"method", "The objective and its constants (docs/method.md)."},
      {"optim", "Optimizer and learning-rate schedule."},
      {"train", "Batch sizes, steps and precision of the training loop."},
      {"checkpoint", "When checkpoints are written and how many are kept."},
      {"logging", "metrics.jsonl, the progress line and TensorBoard."},
      {"eval",
       "Held-out preference accuracy on data.eval_index (src/train/evaluator.cpp): at step 0, "
       "every `every` steps and at the last step, each pair at every t of t_bins, noise from "
       "(seed, pair, t)."},
      {"eval.sample",
       "Validation images (src/train/validation_images.cpp): at step 0, every `every` steps and "
       "at the last step, rank 0 samples `prompts` (typed captions, a file of them, or the first "
       "N distinct captions of data.eval_index, else data.index) with the policy: DDIM with "
       "`steps` steps and "
       "classifier-free guidance `guidance` against the empty caption, image i from the noise of "
       "seed + i. One PNG grid per evaluation in run.output_dir/samples/ (and TensorBoard's "
       "images with logging.tensorboard)."},
      {"dist", "Multi-rank training on c10d (torchrun or SLURM)."},
  };
  for (const auto& [name, doc] : docs) {
    if (name == section) return doc;
  }
  return "";
}

// A value as messages and the resume diff print it: strings quoted, lists in brackets.
template <typename T>
std::string value_text(const T& v) {
  if constexpr (std::is_same_v<T, std::string>) {
    return "'" + v + "'";
  } else if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_same_v<T, double>) {
    return number_text(v);
  } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    std::vector<std::string> items;
    items.reserve(v.size());
    for (const int64_t item : v) {
      items.push_back(std::to_string(item));
    }
    return "[" + join(items) + "]";
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    std::vector<std::string> items;
    items.reserve(v.size());
    for (const std::string& item : v) items.push_back("'" + item + "'");
    return "[" + join(items) + "]";
  } else if constexpr (std::is_same_v<T, PromptList>) {
    if (!v.typed()) return std::to_string(v.count);
    if (!v.file.empty()) return "'" + v.file + "'";
    std::vector<std::string> items;
    items.reserve(v.texts.size());
    for (const std::string& item : v.texts) items.push_back("'" + item + "'");
    return "[" + join(items) + "]";
  } else {
    return std::to_string(v);
  }
}

// The type of a field as errors and docs name it.
template <typename T>
const char* type_text() {
  if constexpr (std::is_same_v<T, std::string>) {
    return "a string";
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return "an integer";
  } else if constexpr (std::is_same_v<T, uint64_t>) {
    return "a non-negative integer";
  } else if constexpr (std::is_same_v<T, double>) {
    return "a number";
  } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    return "a list of integers, e.g. [100, 500]";
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    return "a list of strings, e.g. [\"to_q\", \"to_v\"]";
  } else if constexpr (std::is_same_v<T, PromptList>) {
    return "a count, a list of captions or a file path";
  } else {
    return "a boolean (true or false)";
  }
}

// --- Shared by the files of src/config/ (each defined in the file named).

// Where a dotted path was set, for errors: "file.yaml:3:5: optim.lr", "config: optim.lr", ...
using Locate = std::function<std::string(const std::string& path)>;

// validate.cpp: every field's rule, then the cross-field checks.
void validate_impl(const TrainConfig& c, const Locate& locate);

// schema.cpp: the sections and keys of the table.
std::vector<std::string> section_names();  // top level only: a subsection is a key of its parent
std::vector<std::string> section_keys(const std::string& section);  // fields, then subsections
bool is_section(const std::string& name);

// suggest.cpp: hints for a misspelt name.
std::string closest(const std::string& word, const std::vector<std::string>& candidates);
const std::map<std::string, std::string>& peer_synonyms();

// reader.cpp: "null (no value)", "a list", "a map" or the quoted scalar.
std::string node_text(const YAML::Node& node);

// overrides.cpp: one "--set section.key=value" into the tree; records (dotted path, text) of every
// assigned leaf in `origins`.
void apply_override(YAML::Node& root, const std::string& text,
                    std::vector<std::pair<std::string, std::string>>& origins);

// emit.cpp: a value as to_yaml prints it.
std::string yaml_text(const std::string& v);
std::string yaml_text(double v);
std::string yaml_text(bool v);
std::string yaml_text(int64_t v);
std::string yaml_text(uint64_t v);
std::string yaml_text(const std::vector<int64_t>& v);
std::string yaml_text(const PromptList& v);
std::string yaml_text(const std::vector<std::string>& v);

}  // namespace dde::config::detail
