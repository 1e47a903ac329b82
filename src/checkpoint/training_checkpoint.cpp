#include "dde/checkpoint/training_checkpoint.hpp"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::checkpoint {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kCorrectionKey = "correction.E";
constexpr const char* kLoraDir = "lora";
constexpr const char* kLoraJson = "lora.json";
constexpr const char* kLoraWeights = "adapter_model.safetensors";
constexpr const char* kCorrectionCountsKey = "correction.n";

std::string rank_file(const std::string& dir, int64_t rank) {
  return (fs::path(dir) / fmt::format("rank-{:05d}.json", rank)).string();
}

std::string unet_dir(const std::string& dir) { return (fs::path(dir) / "unet").string(); }

std::string training_state_path(const std::string& dir) {
  return (fs::path(dir) / "training_state.safetensors").string();
}

std::string optimizer_shard_path(const std::string& dir, int64_t rank) {
  return (fs::path(dir) / fmt::format("optimizer-rank-{:05d}.safetensors", rank)).string();
}

}  // namespace

const std::vector<std::string> kPositionKeys = {
    "run.seed",          "data.index",           "data.resolution",     "data.random_crop",
    "data.random_flip",  "data.caption_dropout", "data.shuffle_buffer", "data.keep_ties",
    "train.global_batch"};

void write_shared_state(const std::string& dir, const SharedState& s) {
  const fs::path d(dir);
  if (s.lora_json.empty()) {
    fs::create_directories(d / "unet");
    write_file_atomic((d / "unet" / "config.json").string(), s.unet_config_json);
    save_safetensors((d / "unet" / "diffusion_pytorch_model.safetensors").string(), s.unet,
                     {{"format", "pt"}});
  } else {
    fs::create_directories(d / kLoraDir);
    write_file_atomic((d / kLoraDir / kLoraJson).string(), s.lora_json);
    save_safetensors((d / kLoraDir / kLoraWeights).string(), s.unet, {{"format", "pt"}});
  }
  NamedTensors training_state = s.optimizer;
  training_state.emplace_back(kCorrectionKey, s.correction);
  if (s.correction_counts.defined()) {
    training_state.emplace_back(kCorrectionCountsKey, s.correction_counts);
  }
  save_safetensors(training_state_path(dir), training_state);
  const TrainerStateFile trainer_state{
      s.step,           s.skipped_steps,     s.nonfinite_in_row,    s.world_size,        s.method,
      s.optimizer_name, s.optimizer_sharded, s.correction_momentum, s.correction_updates};
  write_file_atomic((d / "trainer_state.json").string(), trainer_state_json(trainer_state));
  const torch::Tensor E = s.correction.to(torch::kCPU, torch::kFloat64).contiguous();
  const json correction = {
      {"step", s.step},
      {"momentum", s.correction_momentum},
      {"E", std::vector<double>(E.data_ptr<double>(), E.data_ptr<double>() + E.numel())}};
  write_file_atomic((d / "correction_ema.json").string(), correction.dump());
  write_file_atomic((d / "config.yaml").string(), s.config_yaml);
}

void write_rank_state(const std::string& dir, const RankState& s) {
  const RankStateFile rank_state{s.rank,           s.world_size, s.epoch,
                                 s.pairs_consumed, s.bad_pairs,  s.intra_op_threads};
  write_file_atomic(rank_file(dir, s.rank), rank_state_json(rank_state));
  if (!s.optimizer_shard.empty()) {
    save_safetensors(optimizer_shard_path(dir, s.rank), s.optimizer_shard);
  }
}

namespace {
// A NaN or Inf in a checkpoint would be trained on (a NaN AdamW moment poisons every later
// update): refused at load, naming the file and the first bad tensor.
void require_finite(const NamedTensors& tensors, const std::string& file) {
  for (const auto& [name, t] : tensors) {
    if (!t.is_floating_point()) continue;
    const torch::Tensor finite = torch::isfinite(t);
    if (finite.all().item<bool>()) continue;
    throw Error(
        {"non-finite values in a checkpoint", file + ": " + name, "finite values",
         fmt::format("{} of {} elements NaN or Inf", (~finite).sum().item<int64_t>(), t.numel()),
         "it was written by a diverging run or is damaged: resume from an earlier "
         "checkpoint (move this step-* folder aside), or start again"});
  }
}
}  // namespace

SharedState read_shared_state(const std::string& dir) {
  const std::string path = (fs::path(dir) / "trainer_state.json").string();
  const TrainerStateFile st = parse_trainer_state(
      util::read_text_file(path, util::kMaxCheckpointJsonBytes, "checkpoint JSON"), path);
  SharedState s;
  s.step = st.step;
  s.skipped_steps = st.skipped_steps;
  s.nonfinite_in_row = st.nonfinite_in_row;
  s.world_size = st.world_size;
  s.method = st.method;
  s.optimizer_name = st.optimizer_name;
  s.optimizer_sharded = st.optimizer_sharded;
  s.correction_momentum = st.correction_momentum;
  s.correction_updates = st.correction_updates;
  for (auto& [name, tensor] : load_safetensors(training_state_path(dir)).tensors) {
    if (name == kCorrectionKey) {
      s.correction = tensor;
    } else if (name == kCorrectionCountsKey) {
      s.correction_counts = tensor;
    } else {
      s.optimizer.emplace_back(name, tensor);
    }
  }
  if (!s.correction.defined()) {
    throw Error({"correction array missing", training_state_path(dir) + ": " + kCorrectionKey,
                 "present", "absent", "the checkpoint is damaged: resume from an earlier one"});
  }
  require_finite(s.optimizer, training_state_path(dir));
  require_finite({{kCorrectionKey, s.correction}}, training_state_path(dir));
  const fs::path lora = fs::path(dir) / kLoraDir;
  std::error_code ec;
  if (fs::exists(lora / kLoraJson, ec)) {  // a LoRA checkpoint: adapters, no unet/
    s.lora_json = util::read_text_file((lora / kLoraJson).string(), util::kMaxCheckpointJsonBytes,
                                       "checkpoint JSON");
    s.unet = load_safetensors((lora / kLoraWeights).string()).tensors;
    require_finite(s.unet, (lora / kLoraWeights).string());
  } else {
    s.unet_config_json = util::read_text_file((fs::path(unet_dir(dir)) / "config.json").string(),
                                              util::kMaxCheckpointJsonBytes, "checkpoint JSON");
    s.unet =
        load_safetensors((fs::path(unet_dir(dir)) / "diffusion_pytorch_model.safetensors").string())
            .tensors;
    require_finite(s.unet,
                   (fs::path(unet_dir(dir)) / "diffusion_pytorch_model.safetensors").string());
  }
  s.config_yaml = util::read_text_file((fs::path(dir) / "config.yaml").string(),
                                       util::kMaxConfigFileBytes, "checkpoint config");
  return s;
}

RankState read_rank_state(const std::string& dir, int64_t rank, const SharedState& saved) {
  const std::string path = rank_file(dir, rank);
  const RankStateFile rs = parse_rank_state(
      util::read_text_file(path, util::kMaxCheckpointJsonBytes, "checkpoint JSON"), path);
  RankState s;
  s.rank = rank;
  s.world_size = rs.world_size;
  s.epoch = rs.epoch;
  s.pairs_consumed = rs.pairs_consumed;
  s.bad_pairs = rs.bad_pairs;
  s.intra_op_threads = rs.intra_op_threads;
  if (saved.optimizer_sharded) {
    s.optimizer_shard = load_safetensors(optimizer_shard_path(dir, rank)).tensors;
    require_finite(s.optimizer_shard, optimizer_shard_path(dir, rank));
  }
  return s;
}

void check_resumable(const std::string& dir, const SharedState& saved, const ResumingRun& run) {
  if (saved.method != run.method) {
    throw Error({"checkpoint was trained with another method", dir, run.method, saved.method,
                 "resume with the same method.name, or start a new run directory"});
  }
  if (saved.world_size != run.world_size) {
    // Each rank's share of the data stream depends on the world size (docs/formats.md).
    throw Error({"checkpoint was written by another world size", dir,
                 std::to_string(saved.world_size) + " ranks",
                 std::to_string(run.world_size) + " ranks",
                 "resume with the same number of processes, or start a new run directory from its "
                 "unet/ weights"});
  }
  if (saved.optimizer_name != run.optimizer_name) {
    throw Error({"checkpoint was trained with another optimizer", dir + ": optim.name",
                 saved.optimizer_name, run.optimizer_name,
                 "resume with the same optim.name, or start a new run directory from its unet/"});
  }
}

std::vector<config::ConfigChange> check_resume_config(const std::string& dir,
                                                      const std::string& saved_yaml,
                                                      const config::TrainConfig& now) {
  const std::string path = (fs::path(dir) / "config.yaml").string();
  YAML::Node root;
  try {
    config::check_yaml_text(saved_yaml, path);
    root = YAML::Load(saved_yaml);
  } catch (const YAML::Exception& e) {
    throw damaged_checkpoint_file(path, "the YAML config dde_train writes", e.what());
  }
  const config::TrainConfig saved = config::config_from_yaml(root, path);
  std::vector<config::ConfigChange> harmless;
  std::string keys, before, after;
  for (config::ConfigChange& c : config::config_changes(saved, now)) {
    if (std::find(kPositionKeys.begin(), kPositionKeys.end(), c.key) == kPositionKeys.end()) {
      harmless.push_back(std::move(c));
      continue;
    }
    const char* sep = keys.empty() ? "" : ", ";
    keys += sep + c.key;
    before += sep + c.key + " " + c.before;
    after += sep + c.key + " " + c.after;
  }
  if (!keys.empty()) {
    // The data position and every pair's random choices follow from these keys: a resume
    // under other values would silently train on another stream than the one it continues.
    throw Error({"resume with a config that changes the data stream", path + ": " + keys, before,
                 after,
                 "resume with the checkpoint's values, or start a new run (another "
                 "run.output_dir) from its unet/ weights"});
  }
  return harmless;
}

NamedTensors optimizer_state_for(const std::string& dir, const SharedState& saved,
                                 const RankState& own, bool now_sharded) {
  if (!saved.optimizer_sharded) return saved.optimizer;
  if (now_sharded) return own.optimizer_shard;
  NamedTensors all;
  for (int64_t r = 0; r < saved.world_size; ++r) {
    NamedTensors shard = r == own.rank ? own.optimizer_shard
                                       : load_safetensors(optimizer_shard_path(dir, r)).tensors;
    for (auto& entry : shard) all.push_back(std::move(entry));
  }
  return all;
}

}  // namespace dde::checkpoint
