#include "dde/checkpoint/training_checkpoint.hpp"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
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

constexpr const char* kDamagedHint =
    "the checkpoint is damaged: move this step-* directory aside and --resume from the previous "
    "one";

Error damaged_file(const std::string& where, const std::string& expected, const std::string& got) {
  return Error({"damaged checkpoint file", where, expected, got, kDamagedHint});
}

// The JSON object in `path`; anything else (a truncated file, 1e400) is an Error naming the file.
json read_json_object(const std::string& path) {
  json doc;
  try {
    doc = json::parse(util::read_text_file(path, util::kMaxCheckpointJsonBytes, "checkpoint JSON"));
  } catch (const json::exception& e) {
    throw damaged_file(path, "a JSON object as dde_train writes it", e.what());
  }
  if (!doc.is_object()) throw damaged_file(path, "a JSON object", doc.type_name());
  return doc;
}

// obj[key] for the readers below; a missing key is an Error naming the file and the key.
const json& member(const json& obj, const std::string& key, const std::string& path) {
  if (!obj.is_object() || !obj.contains(key)) {
    throw damaged_file(path + ": " + key, "the key present", "absent");
  }
  return obj.at(key);
}

// A count (step, epoch, ...): nlohmann's get<int64_t>() would truncate 1.5 and wrap -1 or 2^64.
int64_t count_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  const bool fits = v.is_number_unsigned()
                        ? v.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()}
                        : v.is_number_integer() && v.get<int64_t>() >= 0;
  if (!fits) throw damaged_file(path + ": " + key, "an integer >= 0", v.dump());
  return v.get<int64_t>();
}

double finite_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  if (!v.is_number() || !std::isfinite(v.get<double>())) {
    throw damaged_file(path + ": " + key, "a finite number", v.dump());
  }
  return v.get<double>();
}

std::string text_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  if (!v.is_string()) throw damaged_file(path + ": " + key, "a string", v.dump());
  return v.get<std::string>();
}

bool flag_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  if (!v.is_boolean()) throw damaged_file(path + ": " + key, "true or false", v.dump());
  return v.get<bool>();
}

}  // namespace

const std::vector<std::string> kPositionKeys = {
    "run.seed",          "data.index",           "data.resolution",     "data.random_crop",
    "data.random_flip",  "data.caption_dropout", "data.shuffle_buffer", "data.keep_ties",
    "train.global_batch"};

void write_shared_state(const std::string& dir, const SharedState& s) {
  const fs::path d(dir);
  fs::create_directories(d / "unet");
  write_file_atomic((d / "unet" / "config.json").string(), s.unet_config_json);
  save_safetensors((d / "unet" / "diffusion_pytorch_model.safetensors").string(), s.unet,
                   {{"format", "pt"}});
  NamedTensors training_state = s.optimizer;
  training_state.emplace_back(kCorrectionKey, s.correction);
  if (s.correction_counts.defined()) {
    training_state.emplace_back(kCorrectionCountsKey, s.correction_counts);
  }
  save_safetensors(training_state_path(dir), training_state);
  const json trainer_state = {
      {"format", "dde-checkpoint"},
      {"version", kCheckpointVersion},
      {"step", s.step},
      {"skipped_steps", s.skipped_steps},
      {"nonfinite_in_row", s.nonfinite_in_row},
      {"world_size", s.world_size},
      {"method", s.method},
      {"optimizer", {{"name", s.optimizer_name}, {"sharded", s.optimizer_sharded}}},
      {"correction", {{"momentum", s.correction_momentum}, {"updates", s.correction_updates}}}};
  write_file_atomic((d / "trainer_state.json").string(), trainer_state.dump(2));
  const torch::Tensor E = s.correction.to(torch::kCPU, torch::kFloat64).contiguous();
  const json correction = {
      {"step", s.step},
      {"momentum", s.correction_momentum},
      {"E", std::vector<double>(E.data_ptr<double>(), E.data_ptr<double>() + E.numel())}};
  write_file_atomic((d / "correction_ema.json").string(), correction.dump());
  write_file_atomic((d / "config.yaml").string(), s.config_yaml);
}

void write_rank_state(const std::string& dir, const RankState& s) {
  const json rank_state = {
      {"rank", s.rank},
      {"world_size", s.world_size},
      {"loader",
       {{"epoch", s.epoch}, {"pairs_consumed", s.pairs_consumed}, {"bad_pairs", s.bad_pairs}}}};
  write_file_atomic(rank_file(dir, s.rank), rank_state.dump(2));
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
  const json st = read_json_object(path);
  const json format = st.value("format", json());
  const json version = st.value("version", json());
  if (format != "dde-checkpoint" || version != kCheckpointVersion) {
    throw Error({"not a dde checkpoint of a known version", path,
                 "format dde-checkpoint, version " + std::to_string(kCheckpointVersion),
                 "format " + format.dump() + ", version " + version.dump(), kDamagedHint});
  }
  SharedState s;
  s.step = count_at(st, "step", path);
  s.skipped_steps = count_at(st, "skipped_steps", path);
  s.nonfinite_in_row = count_at(st, "nonfinite_in_row", path);
  s.world_size = count_at(st, "world_size", path);
  s.method = text_at(st, "method", path);
  // Checkpoints from before optimizer choice and sharding hold replicated AdamW state.
  const json optimizer = st.value("optimizer", json{{"name", "adamw"}, {"sharded", false}});
  s.optimizer_name = text_at(optimizer, "name", path + ": optimizer");
  s.optimizer_sharded = flag_at(optimizer, "sharded", path + ": optimizer");
  const json& correction = member(st, "correction", path);
  s.correction_momentum = finite_at(correction, "momentum", path + ": correction");
  s.correction_updates = count_at(correction, "updates", path + ": correction");
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
  s.unet_config_json = util::read_text_file((fs::path(unet_dir(dir)) / "config.json").string(),
                                            util::kMaxCheckpointJsonBytes, "checkpoint JSON");
  s.unet =
      load_safetensors((fs::path(unet_dir(dir)) / "diffusion_pytorch_model.safetensors").string())
          .tensors;
  require_finite(s.unet,
                 (fs::path(unet_dir(dir)) / "diffusion_pytorch_model.safetensors").string());
  s.config_yaml = util::read_text_file((fs::path(dir) / "config.yaml").string(),
                                       util::kMaxConfigFileBytes, "checkpoint config");
  return s;
}

RankState read_rank_state(const std::string& dir, int64_t rank, const SharedState& saved) {
  const std::string path = rank_file(dir, rank);
  const json rs = read_json_object(path);
  RankState s;
  s.rank = rank;
  s.world_size = count_at(rs, "world_size", path);
  const json& loader = member(rs, "loader", path);
  s.epoch = count_at(loader, "epoch", path + ": loader");
  s.pairs_consumed = count_at(loader, "pairs_consumed", path + ": loader");
  // Absent before the bad-pair budget existed.
  s.bad_pairs = loader.contains("bad_pairs") ? count_at(loader, "bad_pairs", path + ": loader") : 0;
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
    throw damaged_file(path, "the YAML config dde_train writes", e.what());
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
