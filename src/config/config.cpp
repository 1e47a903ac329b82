#include "dde/config/config.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dde/data/limits.hpp"
#include "dde/util/error.hpp"

namespace dde::config {

namespace {

// ---------------------------------------------------------------------------------------------
// Rules: the allowed values of one field, as a check and as text for messages.

struct Rule {
  bool required = false;             // strings: must be non-empty
  std::vector<std::string> choices;  // strings: one of these
  bool has_min = false, min_open = false, has_max = false, max_open = false;
  double min = 0.0, max = 0.0;
  int64_t multiple_of = 0;  // integers: value % multiple_of == 0

  bool admits(double v) const {
    if (!std::isfinite(v)) {
      return false;
    }
    if (has_min && (min_open ? !(v > min) : !(v >= min))) {
      return false;
    }
    if (has_max && (max_open ? !(v < max) : !(v <= max))) {
      return false;
    }
    return true;
  }
};

std::string number_text(double v) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), v);
  return std::string(buffer, result.ptr);
}

std::string join(const std::vector<std::string>& items, const std::string& separator = ", ") {
  std::string out;
  for (const auto& item : items) {
    out += (out.empty() ? "" : separator) + item;
  }
  return out;
}

std::string range_text(const Rule& r) {
  if (r.has_min && r.has_max) {
    return "in " + std::string(r.min_open ? "(" : "[") + number_text(r.min) + ", " +
           number_text(r.max) + (r.max_open ? ")" : "]");
  }
  if (r.has_min) {
    return (r.min_open ? "> " : ">= ") + number_text(r.min);
  }
  if (r.has_max) {
    return (r.max_open ? "< " : "<= ") + number_text(r.max);
  }
  return "a finite number";
}

Rule any() { return {}; }
Rule required() {
  Rule r;
  r.required = true;
  return r;
}
Rule one_of(std::vector<std::string> choices) {
  Rule r;
  r.choices = std::move(choices);
  return r;
}
Rule at_least(double min) {
  Rule r;
  r.has_min = true;
  r.min = min;
  return r;
}
Rule above(double min) {
  Rule r = at_least(min);
  r.min_open = true;
  return r;
}
Rule between(double min, bool min_open, double max, bool max_open) {
  Rule r;
  r.has_min = r.has_max = true;
  r.min = min;
  r.max = max;
  r.min_open = min_open;
  r.max_open = max_open;
  return r;
}
Rule multiple_of(int64_t k) {
  Rule r = at_least(0);
  r.multiple_of = k;
  return r;
}
Rule at_most(Rule r, double max) {
  r.has_max = true;
  r.max = max;
  return r;
}

// Lists: non-empty, every element within `each`.
Rule non_empty_list(Rule each) {
  each.required = true;
  return each;
}

const std::vector<std::string> kMethodNames = {"sft",      "uniform", "discounted", "dde_single",
                                               "dde_step", "dde",     "uniform_ct"};

// ---------------------------------------------------------------------------------------------
// The field table: every key of every section, in file order. A visitor is called as
// v(section, &TrainConfig::section, key, &Section::key, rule).

template <typename Visitor>
void for_each_field(Visitor&& v) {
  using C = TrainConfig;
  v("run", &C::run, "output_dir", &RunConfig::output_dir, required());
  v("run", &C::run, "seed", &RunConfig::seed, any());
  v("run", &C::run, "device", &RunConfig::device, one_of({"auto", "cpu", "cuda", "privateuseone"}));
  v("run", &C::run, "threads", &RunConfig::threads, at_most(at_least(0), 4096));
  v("run", &C::run, "cuda_sync_debug", &RunConfig::cuda_sync_debug,
    one_of({"off", "warn", "error"}));

  v("model", &C::model, "manifest", &ModelConfig::manifest, required());
  v("model", &C::model, "reference_manifest", &ModelConfig::reference_manifest, any());
  v("model", &C::model, "frozen_dtype", &ModelConfig::frozen_dtype, one_of({"fp32", "bf16"}));

  v("data", &C::data, "index", &DataConfig::index, required());
  v("data", &C::data, "resolution", &DataConfig::resolution,
    at_most(multiple_of(8), data::kMaxResolution));
  v("data", &C::data, "random_crop", &DataConfig::random_crop, any());
  v("data", &C::data, "random_flip", &DataConfig::random_flip, any());
  v("data", &C::data, "caption_dropout", &DataConfig::caption_dropout, between(0, false, 1, false));
  v("data", &C::data, "shuffle_buffer", &DataConfig::shuffle_buffer,
    at_most(at_least(1), data::kMaxShuffleBuffer));
  v("data", &C::data, "workers", &DataConfig::workers, at_most(at_least(1), data::kMaxWorkers));
  v("data", &C::data, "prefetch_batches", &DataConfig::prefetch_batches,
    at_most(at_least(1), data::kMaxPrefetchBatches));
  v("data", &C::data, "keep_ties", &DataConfig::keep_ties, any());
  v("data", &C::data, "max_image_pixels", &DataConfig::max_image_pixels,
    at_most(at_least(1), data::kMaxImagePixels));
  v("data", &C::data, "max_bad_pairs", &DataConfig::max_bad_pairs, at_least(0));
  v("data", &C::data, "verify", &DataConfig::verify, any());
  v("data", &C::data, "eval_index", &DataConfig::eval_index, any());
  v("data", &C::data, "cache", &DataConfig::cache, any());

  v("method", &C::method, "name", &MethodConfig::name, one_of(kMethodNames));
  v("method", &C::method, "beta", &MethodConfig::beta, above(0));
  v("method", &C::method, "correction_scale", &MethodConfig::correction_scale, any());
  v("method", &C::method, "ema_momentum", &MethodConfig::ema_momentum, between(0, false, 1, true));
  v("method", &C::method, "gamma", &MethodConfig::gamma, between(0, true, 1, false));
  v("method", &C::method, "sampler_steps", &MethodConfig::sampler_steps, at_least(1));
  v("method", &C::method, "t_lo", &MethodConfig::t_lo, at_least(0));
  v("method", &C::method, "t_hi", &MethodConfig::t_hi, at_least(-1));
  v("method", &C::method, "temperature", &MethodConfig::temperature,
    one_of({"paper", "calibrated"}));
  v("method", &C::method, "ema_debias", &MethodConfig::ema_debias, any());

  v("optim", &C::optim, "name", &OptimConfig::name, one_of({"adamw", "adafactor"}));
  v("optim", &C::optim, "lr", &OptimConfig::lr, above(0));
  v("optim", &C::optim, "warmup_steps", &OptimConfig::warmup_steps, at_least(0));
  v("optim", &C::optim, "schedule", &OptimConfig::schedule,
    one_of({"constant", "cosine", "linear"}));
  v("optim", &C::optim, "min_lr_ratio", &OptimConfig::min_lr_ratio, between(0, false, 1, false));
  v("optim", &C::optim, "beta1", &OptimConfig::beta1, between(0, false, 1, true));
  v("optim", &C::optim, "beta2", &OptimConfig::beta2, between(0, false, 1, true));
  v("optim", &C::optim, "weight_decay", &OptimConfig::weight_decay, at_least(0));
  v("optim", &C::optim, "eps", &OptimConfig::eps, above(0));
  v("optim", &C::optim, "grad_clip", &OptimConfig::grad_clip, at_least(0));
  v("optim", &C::optim, "max_nonfinite_in_row", &OptimConfig::max_nonfinite_in_row, at_least(1));
  v("optim", &C::optim, "max_weight_change", &OptimConfig::max_weight_change, above(0));

  v("train", &C::train, "global_batch", &TrainLoopConfig::global_batch, at_least(1));
  v("train", &C::train, "micro_batch", &TrainLoopConfig::micro_batch,
    at_most(at_least(1), data::kMaxBatchPixels));
  v("train", &C::train, "max_steps", &TrainLoopConfig::max_steps, at_least(1));
  v("train", &C::train, "precision", &TrainLoopConfig::precision, one_of({"fp32", "bf16"}));
  v("train", &C::train, "fp32_output_head", &TrainLoopConfig::fp32_output_head, any());
  v("train", &C::train, "gradient_checkpointing", &TrainLoopConfig::gradient_checkpointing, any());
  v("train", &C::train, "allow_tf32", &TrainLoopConfig::allow_tf32, any());

  v("checkpoint", &C::checkpoint, "every", &CheckpointConfig::every, at_least(1));
  v("checkpoint", &C::checkpoint, "keep", &CheckpointConfig::keep, at_least(1));
  v("checkpoint", &C::checkpoint, "timeout_s", &CheckpointConfig::timeout_s, at_least(1));

  v("logging", &C::logging, "every", &LoggingConfig::every, at_least(1));
  v("logging", &C::logging, "per_sample", &LoggingConfig::per_sample, any());
  v("logging", &C::logging, "progress", &LoggingConfig::progress, any());
  v("logging", &C::logging, "tensorboard", &LoggingConfig::tensorboard, any());
  v("logging", &C::logging, "dump_step", &LoggingConfig::dump_step, at_least(0));

  v("eval", &C::eval, "every", &EvalConfig::every, at_least(1));
  v("eval", &C::eval, "t_bins", &EvalConfig::t_bins, non_empty_list(at_least(0)));
  v("eval", &C::eval, "seed", &EvalConfig::seed, any());
  v("eval", &C::eval, "max_bad_pairs", &EvalConfig::max_bad_pairs, at_least(0));
  // A subsection: the YAML map eval: {sample: {...}}, the paths eval.sample.<key>.
  v("eval.sample", &C::sample, "every", &SampleConfig::every, at_least(0));
  v("eval.sample", &C::sample, "prompts", &SampleConfig::prompts, at_most(at_least(1), 64));
  v("eval.sample", &C::sample, "seed", &SampleConfig::seed, any());
  v("eval.sample", &C::sample, "steps", &SampleConfig::steps, at_most(at_least(1), 1000));
  v("eval.sample", &C::sample, "guidance", &SampleConfig::guidance, at_most(at_least(0), 100));

  v("dist", &C::dist, "backend", &DistConfig::backend, one_of({"auto", "gloo", "nccl"}));
  v("dist", &C::dist, "timeout_s", &DistConfig::timeout_s, at_least(1));
  v("dist", &C::dist, "shard_optimizer", &DistConfig::shard_optimizer, any());
  v("dist", &C::dist, "init_method", &DistConfig::init_method, one_of({"env", "slurm", "auto"}));
  v("dist", &C::dist, "force_process_group", &DistConfig::force_process_group, any());
}

// Sections and their keys, in file order.
const std::vector<std::pair<std::string, std::vector<std::string>>>& schema() {
  static const auto sections = [] {
    std::vector<std::pair<std::string, std::vector<std::string>>> out;
    for_each_field([&](const char* section, auto, const char* key, auto, const Rule&) {
      if (out.empty() || out.back().first != section) {
        out.emplace_back(section, std::vector<std::string>{});
      }
      out.back().second.emplace_back(key);
    });
    return out;
  }();
  return sections;
}

// Top-level section names (a subsection such as eval.sample is a key of its parent).
std::vector<std::string> section_names() {
  std::vector<std::string> names;
  for (const auto& [section, keys] : schema()) {
    if (section.find('.') == std::string::npos) names.push_back(section);
  }
  return names;
}

// The keys a section's map may hold: its fields, then its subsections' last names.
std::vector<std::string> section_keys(const std::string& section) {
  std::vector<std::string> keys;
  for (const auto& [name, fields] : schema()) {
    if (name == section) {
      keys.insert(keys.end(), fields.begin(), fields.end());
    } else if (name.rfind(section + ".", 0) == 0 &&
               name.find('.', section.size() + 1) == std::string::npos) {
      keys.push_back(name.substr(section.size() + 1));
    }
  }
  return keys;
}

bool is_section(const std::string& name) {
  const auto& sections = schema();
  return std::any_of(sections.begin(), sections.end(),
                     [&](const auto& s) { return s.first == name; });
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) {
    row[j] = j;
  }
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// Names users bring from the peers' scripts (diffusers' train_diffusion_dpo.py, Diffusion-DPO's
// train.py), mapped to ours: an unknown key that is one of them gets this hint, not the closest
// spelling of a key of the same section.
const std::map<std::string, std::string>& peer_synonyms() {
  static const std::map<std::string, std::string> m = {
      {"learning_rate", "optim.lr"},
      {"lr_warmup_steps", "optim.warmup_steps"},
      {"warmup", "optim.warmup_steps"},
      {"lr_scheduler", "optim.schedule (constant, cosine or linear)"},
      {"max_grad_norm", "optim.grad_clip"},
      {"adam_beta1", "optim.beta1"},
      {"adam_beta2", "optim.beta2"},
      {"adam_weight_decay", "optim.weight_decay"},
      {"adam_epsilon", "optim.eps"},
      {"use_adafactor", "optim.name: adafactor"},
      {"beta_dpo", "method.beta (diffusers' beta_dpo has no 1/2 factor: its 2500 is our 5000)"},
      {"max_train_steps", "train.max_steps"},
      {"train_batch_size", "train.micro_batch (per rank; train.global_batch is over all ranks)"},
      {"gradient_accumulation_steps",
       "train.global_batch (accumulation = global_batch / (micro_batch x ranks))"},
      {"mixed_precision", "train.precision (fp32 or bf16)"},
      {"checkpointing_steps", "checkpoint.every"},
      {"checkpoints_total_limit", "checkpoint.keep"},
      {"seed", "run.seed"},
      {"output_dir", "run.output_dir"},
      {"dataloader_num_workers", "data.workers"},
      {"no_hflip", "data.random_flip: false"},
      {"pretrained_model_name_or_path",
       "model.manifest (export the pipeline first: python -m dde_tools.export_models)"},
      {"dataset_name",
       "data.index (export the parquet first: python -m dde_tools.export_pickapic)"},
      {"report_to", "logging.* (metrics.jsonl; TensorBoard: see the README)"},
  };
  return m;
}

std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = SIZE_MAX;
  for (const auto& candidate : candidates) {
    const size_t d = edit_distance(word, candidate);
    if (d < best_distance) {
      best = candidate;
      best_distance = d;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Validation (shared by validate() and config_from_yaml(), which knows file positions).

using Locate = std::function<std::string(const std::string& path)>;

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
  } else {
    return std::to_string(v);
  }
}

template <typename T>
void check_field(const std::string& path, const T& value, const T& default_value, const Rule& rule,
                 const Locate& locate) {
  const std::string hint_default = "the default is " + value_text(default_value);
  if constexpr (std::is_same_v<T, std::string>) {
    if (rule.required && value.empty()) {
      throw Error({"missing required config key", locate(path), "a non-empty path",
                   value.empty() ? "nothing" : value_text(value),
                   "set " + path + " in the config file or pass --set " + path + "=..."});
    }
    if (!rule.choices.empty() &&
        std::find(rule.choices.begin(), rule.choices.end(), value) == rule.choices.end()) {
      const bool fp16 = value == "fp16" && std::find(rule.choices.begin(), rule.choices.end(),
                                                     "bf16") != rule.choices.end();
      throw Error({"config value not allowed", locate(path), "one of " + join(rule.choices),
                   value_text(value),
                   fp16 ? std::string("use bf16: fp16 needs loss scaling (a GradScaler), which "
                                      "dde_train does not do; bf16 has fp32's range and needs none")
                        : "did you mean '" + closest(value, rule.choices) + "'?"});
    }
  } else if constexpr (std::is_same_v<T, double> || std::is_same_v<T, int64_t>) {
    const auto v = static_cast<double>(value);
    if (!rule.admits(v)) {
      throw Error({"config value out of range", locate(path), range_text(rule), value_text(value),
                   hint_default});
    }
    if constexpr (std::is_same_v<T, int64_t>) {
      if (rule.multiple_of > 0 && value % rule.multiple_of != 0) {
        throw Error({"config value out of range", locate(path),
                     "0 or a multiple of " + std::to_string(rule.multiple_of), value_text(value),
                     hint_default});
      }
    }
  } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    if (rule.required && value.empty()) {
      throw Error({"empty config list", locate(path), "at least one value", "[]", hint_default});
    }
    for (const int64_t item : value) {
      if (!rule.admits(static_cast<double>(item))) {
        throw Error({"config value out of range", locate(path), "every element " + range_text(rule),
                     value_text(value), hint_default});
      }
    }
  }
}

// What the data side would allocate per micro-batch and in its queue (data/limits.hpp);
// with data.resolution 0 (the manifest's) the loader checks the same bounds later.
void check_data_memory(const TrainConfig& c, const Locate& locate) {
  const int64_t pixels = c.data.resolution * c.data.resolution;
  if (pixels == 0) {
    return;
  }
  if (c.train.micro_batch > data::kMaxBatchPixels / pixels) {
    throw Error(
        {"micro-batch too large for the resolution", locate("train.micro_batch"),
         "train.micro_batch x data.resolution^2 <= " + std::to_string(data::kMaxBatchPixels) +
             " pixels (6 GiB of float32 pairs)",
         std::to_string(c.train.micro_batch) + " x " + std::to_string(c.data.resolution) + "^2",
         "lower train.micro_batch (gradient accumulation keeps the global batch)"});
  }
  if ((c.data.prefetch_batches + 1) * c.train.micro_batch > data::kMaxQueuedPixels / pixels) {
    throw Error({"data prefetch queue too large", locate("data.prefetch_batches"),
                 "(data.prefetch_batches + 1) x train.micro_batch x data.resolution^2 <= " +
                     std::to_string(data::kMaxQueuedPixels) + " pixels (12 GiB)",
                 "(" + std::to_string(c.data.prefetch_batches) + " + 1) x " +
                     std::to_string(c.train.micro_batch) + " x " +
                     std::to_string(c.data.resolution) + "^2",
                 "lower data.prefetch_batches or train.micro_batch"});
  }
}

void validate_impl(const TrainConfig& c, const Locate& locate) {
  const TrainConfig defaults;
  for_each_field([&](const char* section, auto sp, const char* key, auto mp, const Rule& rule) {
    check_field(std::string(section) + "." + key, (c.*sp).*mp, (defaults.*sp).*mp, rule, locate);
  });
  // Cross-field checks.
  if (c.method.t_hi == 0 || (c.method.t_hi != -1 && c.method.t_hi <= c.method.t_lo)) {
    throw Error({"empty timestep window", locate("method.t_hi"),
                 "-1 (= num_train_timesteps) or t_hi > t_lo = " + std::to_string(c.method.t_lo),
                 std::to_string(c.method.t_hi), "the window is [method.t_lo, method.t_hi)"});
  }
  check_data_memory(c, locate);
  if (c.method.temperature == "calibrated" && c.method.name != "dde_single" &&
      c.method.name != "dde") {
    throw Error({"calibrated temperature for a method without c_t", locate("method.temperature"),
                 "method.temperature: calibrated with method.name dde_single or dde",
                 "method.name: " + c.method.name,
                 "use method.temperature: paper (the calibration divides c_t's scale out)"});
  }
  if (!c.data.cache.empty() && c.data.random_crop) {
    throw Error({"random crop with a latent cache", locate("data.random_crop"),
                 "data.random_crop: false with data.cache (the cache holds center crops)",
                 "data.random_crop: true, data.cache: " + c.data.cache,
                 "set data.random_crop: false, or train from the images (data.cache: \"\")"});
  }
  if (c.train.global_batch % c.train.micro_batch != 0) {
    throw Error({"global batch not divisible by the micro-batch", locate("train.global_batch"),
                 "a multiple of train.micro_batch = " + std::to_string(c.train.micro_batch),
                 std::to_string(c.train.global_batch),
                 "global_batch = micro_batch x accumulation steps x ranks"});
  }
}

// ---------------------------------------------------------------------------------------------
// Reading a YAML tree into the struct.

std::string node_text(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "null (no value)";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Scalar:
      return "'" + node.Scalar() + "'";
    case YAML::NodeType::Undefined:
      break;
  }
  return "nothing";
}

// The whole text as one number (std::from_chars; a leading '+' allowed, as YAML does).
template <typename T>
bool parse_number(const std::string& text, T& out) {
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  if (begin != end && *begin == '+') {
    ++begin;
  }
  const auto result = std::from_chars(begin, end, out);
  return begin != end && result.ec == std::errc() && result.ptr == end;
}

bool parse_scalar(const std::string& text, std::string& out) {
  out = text;
  return true;
}
bool parse_scalar(const std::string& text, int64_t& out) { return parse_number(text, out); }
bool parse_scalar(const std::string& text, uint64_t& out) {
  return !text.empty() && text[0] != '-' && parse_number(text, out);
}
bool parse_scalar(const std::string& text, double& out) {
  // YAML 1.2 spells the special floats .inf, -.inf, .nan (validation rejects them later).
  for (const char* inf : {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"}) {
    if (text == inf) {
      out = std::numeric_limits<double>::infinity();
      return true;
    }
  }
  for (const char* inf : {"-.inf", "-.Inf", "-.INF"}) {
    if (text == inf) {
      out = -std::numeric_limits<double>::infinity();
      return true;
    }
  }
  if (text == ".nan" || text == ".NaN" || text == ".NAN") {
    out = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  return parse_number(text, out);
}
bool parse_scalar(const std::string& text, bool& out) {
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (lower == "true" || lower == "yes" || lower == "on") {
    out = true;
    return true;
  }
  if (lower == "false" || lower == "no" || lower == "off") {
    out = false;
    return true;
  }
  return false;
}

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
  } else {
    return "a boolean (true or false)";
  }
}

class TreeReader {
 public:
  TreeReader(std::string source, std::vector<std::pair<std::string, std::string>> overrides)
      : source_(std::move(source)), overrides_(std::move(overrides)) {}

  TrainConfig read(const YAML::Node& root) {
    if (root.IsDefined() && !root.IsNull() && !root.IsMap()) {
      throw Error({"wrong type for config file", origin("", root.Mark()),
                   "a map of sections (" + join(section_names()) + ")", node_text(root),
                   "write 'section:' lines with indented 'key: value' lines below"});
    }
    check_keys(root);
    TrainConfig config;
    const TrainConfig defaults;
    for_each_field([&](const char* section, auto sp, const char* key, auto mp, const Rule&) {
      const Entry entry = lookup(root, section, key);
      if (entry.value.IsDefined()) {
        read_value(std::string(section) + "." + key, entry, (defaults.*sp).*mp, (config.*sp).*mp);
      }
    });
    validate_impl(config, [&](const std::string& path) { return locate(root, path); });
    return config;
  }

 private:
  struct Entry {
    YAML::Node value;  // undefined when the key is absent
    YAML::Mark mark;   // of the value, or of the key when the value is empty
  };

  static Entry lookup(const YAML::Node& root, const std::string& section, const std::string& key) {
    Entry entry{YAML::Node(YAML::NodeType::Undefined), YAML::Mark::null_mark()};
    if (!root.IsDefined() || !root.IsMap()) {
      return entry;
    }
    YAML::Node section_node = root;  // reset(), not operator=: that would rewrite the tree
    std::stringstream parts(section);
    for (std::string part; std::getline(parts, part, '.');) {
      if (!section_node.IsDefined() || !section_node.IsMap()) return entry;
      const YAML::Node& parent = section_node;
      const YAML::Node child = parent[part];  // invalid (not reset()-able) when absent
      if (!child.IsDefined()) return entry;
      section_node.reset(child);
    }
    if (!section_node.IsDefined() || !section_node.IsMap()) {
      return entry;
    }
    for (const auto& item : section_node) {
      if (item.first.IsScalar() && item.first.Scalar() == key) {
        entry.value = item.second;
        entry.mark = item.second.IsNull() ? item.first.Mark() : item.second.Mark();
      }
    }
    return entry;
  }

  // "file.yaml:3:5: optim.lr", "--set optim.lr=-1: optim.lr", or "file.yaml: run.output_dir".
  std::string origin(const std::string& path, const YAML::Mark& mark) const {
    std::string from = source_;
    for (const auto& [override_path, text] : overrides_) {
      if (path == override_path || path.rfind(override_path + ".", 0) == 0) {
        from = "--set " + text;
      }
    }
    if (from == source_ && mark.line >= 0) {
      from += ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
    }
    return path.empty() ? from : from + ": " + path;
  }

  std::string locate(const YAML::Node& root, const std::string& path) const {
    const auto dot = path.rfind('.');
    return origin(path, lookup(root, path.substr(0, dot), path.substr(dot + 1)).mark);
  }

  void check_keys(const YAML::Node& root) const {
    if (!root.IsDefined() || !root.IsMap()) {
      return;
    }
    std::set<std::string> seen_sections;
    for (const auto& section_entry : root) {
      const std::string section = key_text(section_entry.first, "");
      if (!is_section(section) || section.find('.') != std::string::npos) {
        throw Error({"unknown config section", origin(section, section_entry.first.Mark()),
                     "one of the sections " + join(section_names()), "'" + section + "'",
                     "did you mean '" + closest(section, section_names()) + "'?"});
      }
      if (!seen_sections.insert(section).second) {
        throw Error({"duplicate config section", origin(section, section_entry.first.Mark()),
                     "each section once", "'" + section + "' again", "merge the two blocks"});
      }
      check_section(section, section_entry.second);
    }
  }

  // The keys of one section's map (and of its subsections', recursively).
  void check_section(const std::string& section, const YAML::Node& body) const {
    const std::vector<std::string> keys = section_keys(section);
    if (body.IsNull()) {
      return;
    }
    if (!body.IsMap()) {
      throw Error({"wrong type for config section", origin(section, body.Mark()),
                   "a map with keys " + join(keys), node_text(body),
                   "write '" + section + ":' followed by indented 'key: value' lines"});
    }
    std::set<std::string> seen_keys;
    for (const auto& entry : body) {
      const std::string key = key_text(entry.first, section + ".");
      const std::string path = section + "." + key;
      if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
        const auto synonym = peer_synonyms().find(key);
        throw Error({"unknown config key", origin(path, entry.first.Mark()),
                     "one of the " + section + " keys " + join(keys), "'" + key + "'",
                     synonym != peer_synonyms().end()
                         ? "'" + key + "' is the peers' name: here it is " + synonym->second
                         : "did you mean '" + section + "." + closest(key, keys) + "'?"});
      }
      if (!seen_keys.insert(key).second) {
        throw Error({"duplicate config key", origin(path, entry.first.Mark()),
                     "each key once per section", "'" + key + "' again",
                     "delete one of the two lines"});
      }
      if (is_section(path)) check_section(path, entry.second);
    }
  }

  std::string key_text(const YAML::Node& key, const std::string& prefix) const {
    if (!key.IsScalar()) {
      throw Error({"bad config key", origin(prefix + "?", key.Mark()), "a plain name",
                   node_text(key), "keys are names such as 'lr'"});
    }
    return key.Scalar();
  }

  template <typename T>
  void read_value(const std::string& path, const Entry& entry, const T& default_value,
                  T& out) const {
    const YAML::Node& node = entry.value;
    if constexpr (std::is_same_v<T, std::string>) {
      if (node.IsNull()) {
        out.clear();  // "key:" with no value reads as the empty string
        return;
      }
    }
    if (!node.IsScalar() || !parse_scalar(node.Scalar(), out)) {
      std::string example = value_text(default_value);
      if constexpr (std::is_same_v<T, std::string>) {
        example = default_value.empty() ? "some/path" : default_value;
      }
      throw Error({"wrong type for config key", origin(path, entry.mark), type_text<T>(),
                   node_text(node), "write e.g. " + path + ": " + example});
    }
  }

  // A YAML sequence of integers ([100, 500] or one "- 100" line per element).
  void read_value(const std::string& path, const Entry& entry,
                  const std::vector<int64_t>& default_value, std::vector<int64_t>& out) const {
    const YAML::Node& node = entry.value;
    bool ok = node.IsSequence();
    out.clear();
    for (size_t i = 0; ok && i < node.size(); ++i) {
      int64_t item = 0;
      ok = node[i].IsScalar() && parse_scalar(node[i].Scalar(), item);
      out.push_back(item);
    }
    if (!ok) {
      throw Error({"wrong type for config key", origin(path, entry.mark),
                   type_text<std::vector<int64_t>>(), node_text(node),
                   "write e.g. " + path + ": " + value_text(default_value)});
    }
  }

  std::string source_;
  std::vector<std::pair<std::string, std::string>> overrides_;  // (dotted path, "--set" text)
};

// ---------------------------------------------------------------------------------------------
// --set overrides.

bool is_name(const std::string& part) {
  if (part.empty() || std::isdigit(static_cast<unsigned char>(part[0]))) {
    return false;
  }
  return std::all_of(part.begin(), part.end(),
                     [](unsigned char ch) { return std::isalnum(ch) || ch == '_'; });
}

[[noreturn]] void bad_override(const std::string& text, const std::string& why) {
  throw Error({"bad --set override", "--set " + text,
               "section.key=value, e.g. optim.lr=1e-4 or method.name=uniform", "'" + text + "'",
               why});
}

// Sets parent[parts[i]..] = value; a map value merges into an existing map key by key. Records the
// dotted path of every assigned leaf in `origins`.
void set_path(YAML::Node parent, const std::vector<std::string>& parts, size_t i,
              const YAML::Node& value, const std::string& text,
              std::vector<std::pair<std::string, std::string>>& origins,
              const std::string& prefix) {
  const std::string& key = parts[i];
  const std::string path = prefix.empty() ? key : prefix + "." + key;
  const YAML::Node existing = parent[key];
  if (i + 1 == parts.size()) {
    if (value.IsMap() && existing.IsDefined() && existing.IsMap()) {
      for (const auto& entry : value) {
        if (!entry.first.IsScalar()) {
          bad_override(text, "map keys must be names");
        }
        set_path(existing, {entry.first.Scalar()}, 0, entry.second, text, origins, path);
      }
      return;
    }
    parent[key] = value;
    origins.emplace_back(path, text);
    return;
  }
  if (!existing.IsDefined() || existing.IsNull()) {
    parent[key] = YAML::Node(YAML::NodeType::Map);
  } else if (!existing.IsMap()) {
    bad_override(text, "'" + path + "' is " + node_text(existing) + ", not a section");
  }
  set_path(parent[key], parts, i + 1, value, text, origins, path);
}

void apply_override(YAML::Node& root, const std::string& text,
                    std::vector<std::pair<std::string, std::string>>& origins) {
  const auto equals = text.find('=');
  if (equals == std::string::npos) {
    bad_override(text, "missing '='");
  }
  std::string key = text.substr(0, equals);
  key.erase(key.find_last_not_of(" \t") + 1);
  key.erase(0, std::min(key.find_first_not_of(" \t"), key.size()));
  std::vector<std::string> parts;
  std::stringstream stream(key);
  for (std::string part; std::getline(stream, part, '.');) {
    parts.push_back(part);
  }
  if (key.empty() || key.back() == '.' || parts.empty() ||
      !std::all_of(parts.begin(), parts.end(), is_name)) {
    bad_override(text, "the key must be a dotted path of names such as optim.lr");
  }
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(equals + 1));
  } catch (const YAML::Exception& e) {
    bad_override(text, "the value is not valid YAML: " + e.msg);
  }
  if (!root.IsMap()) {
    root = YAML::Node(YAML::NodeType::Map);
  }
  set_path(root, parts, 0, value, text, origins, "");
}

// ---------------------------------------------------------------------------------------------
// Emitting.

class Emitter {
 public:
  Emitter() { out_ << YAML::BeginMap; }

  template <typename T>
  void field(const std::string& section, const std::string& key, const T& value) {
    open(section);
    out_ << YAML::Key << key << YAML::Value;
    if constexpr (std::is_same_v<T, std::string>) {
      out_ << YAML::DoubleQuoted << value;
    } else if constexpr (std::is_same_v<T, double>) {
      std::string text = number_text(value);
      if (text.find_first_of(".eEni") == std::string::npos) {
        text += ".0";  // keep it a float for readers that type scalars (Python's yaml)
      }
      out_ << text;
    } else if constexpr (std::is_same_v<T, bool>) {
      out_ << (value ? "true" : "false");
    } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
      out_ << YAML::Flow << YAML::BeginSeq;
      for (const int64_t item : value) {
        out_ << item;
      }
      out_ << YAML::EndSeq;
    } else {
      out_ << value;
    }
  }

  std::string finish() {
    for (size_t i = 0; i <= open_.size(); ++i) out_ << YAML::EndMap;
    return std::string(out_.c_str()) + "\n";
  }

 private:
  // Closes the maps of the sections left and opens those entered: "eval" then "eval.sample"
  // nests sample's map in eval's.
  void open(const std::string& section) {
    std::vector<std::string> parts;
    std::stringstream stream(section);
    for (std::string part; std::getline(stream, part, '.');) parts.push_back(part);
    size_t common = 0;
    while (common < parts.size() && common < open_.size() && parts[common] == open_[common]) {
      ++common;
    }
    for (; open_.size() > common; open_.pop_back()) out_ << YAML::EndMap;
    for (size_t i = common; i < parts.size(); ++i) {
      out_ << YAML::Key << parts[i] << YAML::Value << YAML::BeginMap;
      open_.push_back(parts[i]);
    }
  }

  YAML::Emitter out_;
  std::vector<std::string> open_;  // the sections whose maps are open, outermost first
};

}  // namespace

bool operator==(const TrainConfig& a, const TrainConfig& b) {
  bool equal = true;
  for_each_field([&](const char*, auto sp, const char*, auto mp, const Rule&) {
    equal = equal && (a.*sp).*mp == (b.*sp).*mp;
  });
  return equal;
}

bool operator!=(const TrainConfig& a, const TrainConfig& b) { return !(a == b); }

namespace {
// What writes each input file (for the hint of a missing one).
std::string input_file_origin(const std::string& key) {
  if (key.find("manifest") != std::string::npos) {
    return "export the pipeline first: python -m dde_tools.export_models --pipeline DIR --out DIR";
  }
  if (key == "data.cache") return "encode it first: build/dde_encode_cache --config ... --out DIR";
  return "export the pairs first: python -m dde_tools.export_pickapic --parquet ... --out DIR";
}
}  // namespace

void check_input_files(const TrainConfig& config) {
  namespace fs = std::filesystem;
  const std::vector<std::pair<const char*, const std::string*>> inputs = {
      {"model.manifest", &config.model.manifest},
      {"model.reference_manifest", &config.model.reference_manifest},
      {"data.index", &config.data.index},
      {"data.eval_index", &config.data.eval_index},
      {"data.cache", &config.data.cache}};
  for (const auto& [key, path] : inputs) {
    if (path->empty()) continue;
    std::error_code ec;
    const std::string absolute = fs::absolute(*path, ec).lexically_normal().string();
    const fs::file_status status = fs::status(*path, ec);
    if (fs::is_regular_file(status)) continue;
    const bool folder = fs::is_directory(status);
    const bool dangling = !fs::exists(status) && fs::is_symlink(fs::symlink_status(*path, ec));
    throw Error(
        {folder ? "a folder where a file is expected" : "input file not found",
         std::string(key) + " = " + *path + " (" + absolute + ")", "a readable file",
         folder     ? "a folder"
         : dangling ? "a dangling symbolic link"
                    : "no such file",
         (folder ? std::string("name the file inside it (e.g. ") +
                       (std::string(key).find("manifest") != std::string::npos ? "manifest.json"
                                                                               : "index.json") +
                       ")"
                 : "relative paths are read from the working directory " +
                       fs::current_path(ec).string()) +
             "; " + input_file_origin(key)});
  }
}

TrainConfig config_from_yaml(const YAML::Node& root, const std::string& source_name) {
  return TreeReader(source_name, {}).read(root);
}

TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw Error({"config file not found", path, "a readable YAML file",
                 std::filesystem::exists(path, ec) ? "not a regular file" : "no such file",
                 "paths are relative to the working directory (" +
                     std::filesystem::current_path(ec).string() + ")"});
  }
  std::ifstream in(path);
  std::stringstream content;
  content << in.rdbuf();
  if (!in) {
    throw Error({"cannot read config file", path, "", "", "check its permissions"});
  }
  YAML::Node root;
  try {
    root = YAML::Load(content.str());
  } catch (const YAML::ParserException& e) {
    throw Error(
        {"YAML parse error: " + e.msg,
         path + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1), "",
         "", "fix the YAML syntax at that position"});
  }
  std::vector<std::pair<std::string, std::string>> origins;
  for (const auto& text : overrides) {
    apply_override(root, text, origins);
  }
  return TreeReader(path, std::move(origins)).read(root);
}

std::string to_yaml(const TrainConfig& config) {
  Emitter emitter;
  for_each_field([&](const char* section, auto sp, const char* key, auto mp, const Rule&) {
    emitter.field(section, key, (config.*sp).*mp);
  });
  return emitter.finish();
}

void validate(const TrainConfig& config) {
  validate_impl(config, [](const std::string& path) { return "config: " + path; });
}

int64_t effective_t_hi(const MethodConfig& method, int64_t num_timesteps) {
  return method.t_hi == -1 ? num_timesteps : method.t_hi;
}

void validate_against_timesteps(const TrainConfig& config, int64_t num_timesteps) {
  const int64_t t_lo = config.method.t_lo;
  const int64_t t_hi = effective_t_hi(config.method, num_timesteps);
  if (num_timesteps < 1 || t_lo < 0 || t_lo >= t_hi || t_hi > num_timesteps) {
    throw Error({"timestep window outside the schedule", "config: method.t_lo/method.t_hi",
                 "0 <= t_lo < t_hi <= " + std::to_string(num_timesteps) +
                     " (the model's num_train_timesteps)",
                 "[" + std::to_string(t_lo) + ", " + std::to_string(t_hi) + ")" +
                     (config.method.t_hi == -1 ? " (t_hi = -1 means T)" : ""),
                 "use t_hi = -1 for the whole schedule"});
  }
  for (const int64_t t : config.eval.t_bins) {
    if (t < 0 || t >= num_timesteps) {
      throw Error({"evaluation timestep outside the schedule", "config: eval.t_bins",
                   "every t in [0, " + std::to_string(num_timesteps) +
                       ") (the model's num_train_timesteps)",
                   std::to_string(t), "choose t bins inside the schedule"});
    }
  }
}

int64_t accumulation_steps(const TrainConfig& config, int64_t world_size) {
  const int64_t global = config.train.global_batch;
  const int64_t micro = config.train.micro_batch;
  if (world_size < 1) {
    throw Error({"bad world size", "accumulation_steps", ">= 1 rank", std::to_string(world_size),
                 "check the launcher's WORLD_SIZE"});
  }
  if (micro < 1 || global % (micro * world_size) != 0) {
    throw Error({"global batch does not split over the ranks", "config: train.global_batch",
                 "a multiple of micro_batch x world_size = " + std::to_string(micro) + " x " +
                     std::to_string(world_size),
                 std::to_string(global),
                 "change train.global_batch or train.micro_batch, or the number of ranks"});
  }
  return global / (micro * world_size);
}

std::vector<ConfigChange> config_changes(const TrainConfig& before, const TrainConfig& after) {
  std::vector<ConfigChange> changes;
  for_each_field(
      [&](const char* section, auto section_member, const char* key, auto field, const Rule&) {
        const std::string old_text = value_text(before.*section_member.*field);
        const std::string new_text = value_text(after.*section_member.*field);
        if (old_text != new_text) {
          changes.push_back({std::string(section) + "." + key, old_text, new_text});
        }
      });
  return changes;
}

}  // namespace dde::config
