// Validation: each field against its rule, the cross-field checks, and the checks that need more
// than the config (the schedule's T, the world size, the file system).
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/data/limits.hpp"
#include "dde/util/error.hpp"
#include "field_table.hpp"

namespace dde::config {

namespace detail {
namespace {

bool contains(const std::vector<std::string>& items, const std::string& item) {
  return std::find(items.begin(), items.end(), item) != items.end();
}

void check_value(const std::string& path, const std::string& value, const std::string&,
                 const Rule& rule, const Locate& locate) {
  if (rule.required && value.empty()) {
    throw Error({"missing required config key", locate(path), "a non-empty path",
                 value.empty() ? "nothing" : value_text(value),
                 "set " + path + " in the config file or pass --set " + path + "=..."});
  }
  if (!rule.choices.empty() && !contains(rule.choices, value)) {
    const bool fp16 = value == "fp16" && contains(rule.choices, "bf16");
    throw Error({"config value not allowed", locate(path), "one of " + join(rule.choices),
                 value_text(value),
                 fp16 ? std::string("use bf16: fp16 needs loss scaling (a GradScaler), which "
                                    "dde_train does not do; bf16 has fp32's range and needs none")
                      : "did you mean '" + closest(value, rule.choices) + "'?"});
  }
}

template <typename T>
void check_number(const std::string& path, const T& value, const T& default_value, const Rule& rule,
                  const Locate& locate) {
  const std::string hint_default = "the default is " + value_text(default_value);
  if (!rule.admits(static_cast<double>(value))) {
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
}

void check_value(const std::string& path, double value, double default_value, const Rule& rule,
                 const Locate& locate) {
  check_number(path, value, default_value, rule, locate);
}

void check_value(const std::string& path, int64_t value, int64_t default_value, const Rule& rule,
                 const Locate& locate) {
  check_number(path, value, default_value, rule, locate);
}

void check_value(const std::string& path, const std::vector<int64_t>& value,
                 const std::vector<int64_t>& default_value, const Rule& rule,
                 const Locate& locate) {
  const std::string hint_default = "the default is " + value_text(default_value);
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

// Names: non-empty where required, each a dotted name (letters, digits, '_', '.').
void check_value(const std::string& path, const std::vector<std::string>& value,
                 const std::vector<std::string>& default_value, const Rule& rule,
                 const Locate& locate) {
  const std::string hint_default = "the default is " + value_text(default_value);
  if (rule.required && value.empty()) {
    throw Error({"empty config list", locate(path), "at least one name", "[]", hint_default});
  }
  for (const std::string& item : value) {
    const bool name = !item.empty() && item.front() != '.' && item.back() != '.' &&
                      item.find("..") == std::string::npos &&
                      item.find_first_not_of(
                          "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                          "0123456789_.") == std::string::npos;
    if (!name) {
      throw Error({"bad name in config list", locate(path),
                   "dotted module names such as to_q or to_out.0", "'" + item + "'", hint_default});
    }
  }
}

// A count within the rule, or 1 to rule.max typed captions (a file's are counted when read).
void check_value(const std::string& path, const PromptList& value, const PromptList&,
                 const Rule& rule, const Locate& locate) {
  const std::string hint =
      "write e.g. " + path + ": 8, or " + path + ": [\"a red cube\", \"a cat\"], or a file path";
  const bool both = !value.texts.empty() && !value.file.empty();
  if (both || (value.typed() && value.count != 0)) {
    throw Error({"eval.sample.prompts needs exactly one form", locate(path),
                 "a count, a list of captions or a file path", value_text(value), hint});
  }
  if (!value.typed() && !rule.admits(static_cast<double>(value.count))) {
    throw Error({"config value out of range", locate(path), range_text(rule), value_text(value),
                 "the default is 4"});
  }
  if (!value.texts.empty() && !rule.admits(static_cast<double>(value.texts.size()))) {
    throw Error({"too many captions", locate(path), "a list of length " + range_text(rule),
                 std::to_string(value.texts.size()) + " captions",
                 "keep the ones to watch (one image each)"});
  }
}

// Booleans and seeds: every value is allowed.
void check_value(const std::string&, bool, bool, const Rule&, const Locate&) {}
void check_value(const std::string&, uint64_t, uint64_t, const Rule&, const Locate&) {}

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

// What writes each input file (for the hint of a missing one).
std::string input_file_origin(const std::string& key) {
  if (key.find("manifest") != std::string::npos) {
    return "export the pipeline first: python -m dde_tools.export_models --pipeline DIR --out DIR";
  }
  if (key == "data.cache") return "encode it first: build/dde_encode_cache --config ... --out DIR";
  if (key == "eval.sample.prompts") {
    return "write the captions one per line, or give them as a list: [\"a red cube\", \"a cat\"]";
  }
  return "export the pairs first: python -m dde_tools.export_pickapic --parquet ... --out DIR";
}
}  // namespace

void validate_impl(const TrainConfig& c, const Locate& locate) {
  const TrainConfig defaults;
  for_each_field([&](const Field& field, auto sp, auto mp) {
    check_value(field.path(), (c.*sp).*mp, (defaults.*sp).*mp, field.rule, locate);
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
  if (c.lora.rank > 0 && !c.model.reference_manifest.empty()) {
    throw Error({"LoRA with a separate reference model", locate("model.reference_manifest"),
                 "model.reference_manifest: \"\" with model.lora.rank > 0 (the reference is the "
                 "base with its adapters off)",
                 "model.reference_manifest: " + c.model.reference_manifest,
                 "drop model.reference_manifest, or train the whole UNet (model.lora.rank: 0)"});
  }
  if (c.train.global_batch % c.train.micro_batch != 0) {
    throw Error({"global batch not divisible by the micro-batch", locate("train.global_batch"),
                 "a multiple of train.micro_batch = " + std::to_string(c.train.micro_batch),
                 std::to_string(c.train.global_batch),
                 "global_batch = micro_batch x accumulation steps x ranks"});
  }
}

}  // namespace detail

void check_input_files(const TrainConfig& config) {
  namespace fs = std::filesystem;
  const std::vector<std::pair<const char*, const std::string*>> inputs = {
      {"model.manifest", &config.model.manifest},
      {"model.reference_manifest", &config.model.reference_manifest},
      {"data.index", &config.data.index},
      {"data.eval_index", &config.data.eval_index},
      {"data.cache", &config.data.cache},
      {"eval.sample.prompts", &config.sample.prompts.file}};
  for (const auto& [key, path] : inputs) {
    if (path->empty()) continue;
    std::error_code ec;
    const std::string absolute = fs::absolute(*path, ec).lexically_normal().string();
    const fs::file_status status = fs::status(*path, ec);
    if (fs::is_regular_file(status)) continue;
    const bool folder = fs::is_directory(status);
    const bool loop = ec == std::errc::too_many_symbolic_link_levels;
    std::error_code link_ec;
    const bool dangling =
        !loop && !fs::exists(status) && fs::is_symlink(fs::symlink_status(*path, link_ec));
    const bool other = ec && !loop && ec != std::errc::no_such_file_or_directory;
    throw Error(
        {folder ? "a folder where a file is expected"
         : loop ? "input path is a symbolic link loop"
                : "input file not found",
         std::string(key) + " = " + *path + " (" + absolute + ")", "a readable file",
         folder     ? "a folder"
         : loop     ? "a symbolic link loop (" + ec.message() + ")"
         : dangling ? "a dangling symbolic link"
         : other    ? ec.message()
                    : "no such file",
         (folder ? std::string("name the file inside it (e.g. ") +
                       (std::string(key).find("manifest") != std::string::npos ? "manifest.json"
                                                                               : "index.json") +
                       ")"
                 : "relative paths are read from the working directory " +
                       fs::current_path(ec).string()) +
             "; " + detail::input_file_origin(key)});
  }
}

void validate(const TrainConfig& config) {
  detail::validate_impl(config, [](const std::string& path) { return "config: " + path; });
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

}  // namespace dde::config
