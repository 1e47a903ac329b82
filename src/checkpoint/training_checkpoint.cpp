#include "dde/checkpoint/training_checkpoint.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/util/error.hpp"

namespace dde::checkpoint {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kCorrectionKey = "correction.E";

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

void write_shared_state(const std::string& dir, const SharedState& s) {
  const fs::path d(dir);
  fs::create_directories(d / "unet");
  write_file_atomic((d / "unet" / "config.json").string(), s.unet_config_json);
  save_safetensors((d / "unet" / "diffusion_pytorch_model.safetensors").string(), s.unet,
                   {{"format", "pt"}});
  NamedTensors training_state = s.optimizer;
  training_state.emplace_back(kCorrectionKey, s.correction);
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

SharedState read_shared_state(const std::string& dir) {
  const std::string path = (fs::path(dir) / "trainer_state.json").string();
  const json st = json::parse(read_text_file(path));
  if (st.value("format", "") != "dde-checkpoint" ||
      st.value("version", int64_t{0}) != kCheckpointVersion) {
    throw Error({"not a dde checkpoint of a known version", path,
                 "format dde-checkpoint, version " + std::to_string(kCheckpointVersion),
                 st.value("format", std::string("?")) + " v" +
                     std::to_string(st.value("version", int64_t{0})),
                 ""});
  }
  SharedState s;
  s.step = st.at("step").get<int64_t>();
  s.skipped_steps = st.at("skipped_steps").get<int64_t>();
  s.nonfinite_in_row = st.at("nonfinite_in_row").get<int64_t>();
  s.world_size = st.at("world_size").get<int64_t>();
  s.method = st.at("method").get<std::string>();
  // Checkpoints from before optimizer choice and sharding hold replicated AdamW state.
  const json optimizer = st.value("optimizer", json{{"name", "adamw"}, {"sharded", false}});
  s.optimizer_name = optimizer.at("name").get<std::string>();
  s.optimizer_sharded = optimizer.at("sharded").get<bool>();
  s.correction_momentum = st.at("correction").at("momentum").get<double>();
  s.correction_updates = st.at("correction").at("updates").get<int64_t>();
  for (auto& [name, tensor] : load_safetensors(training_state_path(dir)).tensors) {
    if (name == kCorrectionKey) {
      s.correction = tensor;
    } else {
      s.optimizer.emplace_back(name, tensor);
    }
  }
  if (!s.correction.defined()) {
    throw Error({"correction array missing", training_state_path(dir) + ": " + kCorrectionKey,
                 "present", "absent", "the checkpoint is damaged: resume from an earlier one"});
  }
  s.unet_config_json = read_text_file((fs::path(unet_dir(dir)) / "config.json").string());
  s.unet =
      load_safetensors((fs::path(unet_dir(dir)) / "diffusion_pytorch_model.safetensors").string())
          .tensors;
  s.config_yaml = read_text_file((fs::path(dir) / "config.yaml").string());
  return s;
}

RankState read_rank_state(const std::string& dir, int64_t rank, const SharedState& saved) {
  const json rs = json::parse(read_text_file(rank_file(dir, rank)));
  RankState s;
  s.rank = rank;
  s.world_size = rs.at("world_size").get<int64_t>();
  s.epoch = rs.at("loader").at("epoch").get<int64_t>();
  s.pairs_consumed = rs.at("loader").at("pairs_consumed").get<int64_t>();
  s.bad_pairs = rs.at("loader").value("bad_pairs", int64_t{0});  // absent before the budget
  if (saved.optimizer_sharded)
    s.optimizer_shard = load_safetensors(optimizer_shard_path(dir, rank)).tensors;
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
