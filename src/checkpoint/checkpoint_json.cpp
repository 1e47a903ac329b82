#include "dde/checkpoint/checkpoint_json.hpp"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

namespace dde::checkpoint {
namespace {

using nlohmann::json;

constexpr const char* kDamagedHint =
    "the checkpoint is damaged: move this step-* directory aside and --resume from the previous "
    "one";

// The JSON object in `text`; anything else (a truncated file, 1e400) is an Error naming the file.
json parse_json_object(const std::string& text, const std::string& path) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    throw damaged_checkpoint_file(path, "a JSON object as dde_train writes it", e.what());
  }
  if (!doc.is_object()) throw damaged_checkpoint_file(path, "a JSON object", doc.type_name());
  return doc;
}

// obj[key] for the readers below; a missing key is an Error naming the file and the key.
const json& member(const json& obj, const std::string& key, const std::string& path) {
  if (!obj.is_object() || !obj.contains(key)) {
    throw damaged_checkpoint_file(path + ": " + key, "the key present", "absent");
  }
  return obj.at(key);
}

// A count (step, epoch, ...): nlohmann's get<int64_t>() would truncate 1.5 and wrap -1 or 2^64.
int64_t count_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  const bool fits = v.is_number_unsigned()
                        ? v.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()}
                        : v.is_number_integer() && v.get<int64_t>() >= 0;
  if (!fits) throw damaged_checkpoint_file(path + ": " + key, "an integer >= 0", v.dump());
  return v.get<int64_t>();
}

double finite_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  if (!v.is_number() || !std::isfinite(v.get<double>())) {
    throw damaged_checkpoint_file(path + ": " + key, "a finite number", v.dump());
  }
  return v.get<double>();
}

std::string text_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  if (!v.is_string()) throw damaged_checkpoint_file(path + ": " + key, "a string", v.dump());
  return v.get<std::string>();
}

bool flag_at(const json& obj, const std::string& key, const std::string& path) {
  const json& v = member(obj, key, path);
  if (!v.is_boolean()) throw damaged_checkpoint_file(path + ": " + key, "true or false", v.dump());
  return v.get<bool>();
}

}  // namespace

Error damaged_checkpoint_file(const std::string& where, const std::string& expected,
                              const std::string& got) {
  return Error({"damaged checkpoint file", where, expected, got, kDamagedHint});
}

std::string trainer_state_json(const TrainerStateFile& s) {
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
  return trainer_state.dump(2);
}

TrainerStateFile parse_trainer_state(const std::string& text, const std::string& path) {
  const json st = parse_json_object(text, path);
  const json format = st.value("format", json());
  const json version = st.value("version", json());
  if (format != "dde-checkpoint" || version != kCheckpointVersion) {
    throw Error({"not a dde checkpoint of a known version", path,
                 "format dde-checkpoint, version " + std::to_string(kCheckpointVersion),
                 "format " + format.dump() + ", version " + version.dump(), kDamagedHint});
  }
  TrainerStateFile s;
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
  return s;
}

std::string rank_state_json(const RankStateFile& s) {
  const json rank_state = {
      {"rank", s.rank},
      {"world_size", s.world_size},
      {"loader",
       {{"epoch", s.epoch}, {"pairs_consumed", s.pairs_consumed}, {"bad_pairs", s.bad_pairs}}},
      {"intra_op_threads", s.intra_op_threads}};
  return rank_state.dump(2);
}

RankStateFile parse_rank_state(const std::string& text, const std::string& path) {
  const json rs = parse_json_object(text, path);
  RankStateFile s;
  s.world_size = count_at(rs, "world_size", path);
  const json& loader = member(rs, "loader", path);
  s.epoch = count_at(loader, "epoch", path + ": loader");
  s.pairs_consumed = count_at(loader, "pairs_consumed", path + ": loader");
  // Absent before the bad-pair budget existed.
  s.bad_pairs = loader.contains("bad_pairs") ? count_at(loader, "bad_pairs", path + ": loader") : 0;
  // Absent before the thread tuner (util/thread_tuner.hpp).
  s.intra_op_threads = rs.contains("intra_op_threads") ? count_at(rs, "intra_op_threads", path) : 0;
  return s;
}

}  // namespace dde::checkpoint
