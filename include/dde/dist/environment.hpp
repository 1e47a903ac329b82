// Where this process stands in a multi-process job, read from the launcher's environment:
// torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_*),
// SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID),
// or a single process when neither is present.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace dde::dist {

struct DistEnvironment {
  std::string source = "single";  // "single" | "torchrun" | "slurm"
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  bool agent_store = false;   // torchrun's agent hosts the store: every rank is a client
  int64_t restart_count = 0;  // TORCHELASTIC_RESTART_COUNT: keys are prefixed per attempt
};

using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

// init_method: "auto" (torchrun's variables, then SLURM's, then one process), "env", "slurm".
// Inconsistent or malformed variables are a dde::Error naming the variable.
DistEnvironment detect_environment(const std::string& init_method, const EnvLookup& lookup);
DistEnvironment detect_environment(const std::string& init_method);  // from the process env

// First host of a SLURM node list: "gpu[003-004,010],cpu01" -> "gpu003".
std::string first_slurm_host(const std::string& nodelist);

}  // namespace dde::dist
