#include "dde/dist/environment.hpp"

#include <cstdlib>

#include "dde/util/error.hpp"

namespace dde::dist {
namespace {

int64_t parse_int(const EnvLookup& lookup, const std::string& name, int64_t min_value) {
  const auto value = lookup(name);
  if (!value) {
    throw Error({"launcher variable missing", name, "set by the launcher", "unset",
                 "launch with torchrun or srun, or unset the other launcher variables"});
  }
  try {
    size_t used = 0;
    const int64_t v = std::stoll(*value, &used);
    if (used != value->size() || v < min_value) throw std::invalid_argument("range");
    return v;
  } catch (const std::exception&) {
    throw Error(
        {"bad launcher variable", name, "an integer >= " + std::to_string(min_value), *value, ""});
  }
}

void check_rank(const DistEnvironment& env, const std::string& rank_var) {
  if (env.rank >= env.world_size) {
    throw Error({"rank outside the world", rank_var, "< " + std::to_string(env.world_size),
                 std::to_string(env.rank), "check the launcher's task count"});
  }
}

DistEnvironment from_torchrun(const EnvLookup& lookup) {
  DistEnvironment env;
  env.source = "torchrun";
  env.rank = parse_int(lookup, "RANK", 0);
  env.world_size = parse_int(lookup, "WORLD_SIZE", 1);
  env.local_rank = lookup("LOCAL_RANK") ? parse_int(lookup, "LOCAL_RANK", 0) : 0;
  env.master_addr = lookup("MASTER_ADDR").value_or("127.0.0.1");
  env.master_port = lookup("MASTER_PORT") ? parse_int(lookup, "MASTER_PORT", 1) : 29500;
  const auto agent = lookup("TORCHELASTIC_USE_AGENT_STORE");
  env.agent_store = agent && (*agent == "True" || *agent == "true" || *agent == "1");
  env.restart_count =
      lookup("TORCHELASTIC_RESTART_COUNT") ? parse_int(lookup, "TORCHELASTIC_RESTART_COUNT", 0) : 0;
  check_rank(env, "RANK");
  return env;
}

DistEnvironment from_slurm(const EnvLookup& lookup) {
  DistEnvironment env;
  env.source = "slurm";
  env.rank = parse_int(lookup, "SLURM_PROCID", 0);
  env.world_size = parse_int(lookup, "SLURM_NTASKS", 1);
  env.local_rank = lookup("SLURM_LOCALID") ? parse_int(lookup, "SLURM_LOCALID", 0) : 0;
  if (const auto addr = lookup("MASTER_ADDR")) {
    env.master_addr = *addr;
  } else if (const auto nodes = lookup("SLURM_JOB_NODELIST")) {
    env.master_addr = first_slurm_host(*nodes);
  }
  if (lookup("MASTER_PORT")) {
    env.master_port = parse_int(lookup, "MASTER_PORT", 1);
  } else if (lookup("SLURM_JOB_ID")) {
    // A port per job, so two jobs sharing a node do not meet in one store.
    env.master_port = 20000 + parse_int(lookup, "SLURM_JOB_ID", 0) % 20000;
  }
  env.restart_count =
      lookup("SLURM_RESTART_COUNT") ? parse_int(lookup, "SLURM_RESTART_COUNT", 0) : 0;
  check_rank(env, "SLURM_PROCID");
  return env;
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  // The first entry ends at the first comma outside brackets.
  std::string first;
  int depth = 0;
  for (char c : nodelist) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    first += c;
  }
  const size_t open = first.find('[');
  if (open == std::string::npos) return first;
  const size_t close = first.find(']', open);
  if (close == std::string::npos) {
    throw Error({"malformed SLURM node list", "SLURM_JOB_NODELIST", "name[a-b,...]", nodelist,
                 "set MASTER_ADDR explicitly"});
  }
  std::string range = first.substr(open + 1, close - open - 1);
  range = range.substr(0, range.find(','));
  range = range.substr(0, range.find('-'));
  return first.substr(0, open) + range + first.substr(close + 1);
}

DistEnvironment detect_environment(const std::string& init_method, const EnvLookup& lookup) {
  const bool has_torchrun = lookup("RANK").has_value() && lookup("WORLD_SIZE").has_value();
  const bool has_slurm = lookup("SLURM_PROCID").has_value() && lookup("SLURM_NTASKS").has_value();
  if (init_method == "env") {
    if (!has_torchrun) {
      throw Error({"dist.init_method is env but RANK/WORLD_SIZE are not set", "environment",
                   "torchrun's variables", "unset",
                   "launch with torchrun, or use dist.init_method: auto"});
    }
    return from_torchrun(lookup);
  }
  if (init_method == "slurm") {
    if (!has_slurm) {
      throw Error({"dist.init_method is slurm but SLURM_PROCID/SLURM_NTASKS are not set",
                   "environment", "srun's variables", "unset",
                   "launch with srun, or use dist.init_method: auto"});
    }
    return from_slurm(lookup);
  }
  if (has_torchrun) return from_torchrun(lookup);
  if (has_slurm) return from_slurm(lookup);
  return DistEnvironment{};
}

DistEnvironment detect_environment(const std::string& init_method) {
  return detect_environment(init_method, [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  });
}

}  // namespace dde::dist
