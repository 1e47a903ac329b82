#include "dde/util/threads.hpp"

#include <gtest/gtest.h>

#include <map>

namespace {

using dde::util::plan_threads;

dde::util::EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    return it == vars.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
}

TEST(Threads, IntraOpThreadsLeaveTheDecodeWorkersTheirCpus) {
  const auto b = plan_threads(0, /*decode_workers=*/1, /*affinity_cpus=*/2, env_of({}));
  EXPECT_EQ(b.cpus, 2);
  EXPECT_EQ(b.intra_op, 1);
  EXPECT_EQ(plan_threads(0, 4, 16, env_of({})).intra_op, 12);
  EXPECT_EQ(plan_threads(0, 8, 4, env_of({})).intra_op, 1);  // never 0
}

TEST(Threads, SlurmCpusPerTaskCapsTheMask) {
  const auto b = plan_threads(0, 2, 64, env_of({{"SLURM_CPUS_PER_TASK", "8"}}));
  EXPECT_EQ(b.cpus, 8);
  EXPECT_EQ(b.cpus_from, "SLURM_CPUS_PER_TASK");
  EXPECT_EQ(b.intra_op, 6);
  EXPECT_EQ(plan_threads(0, 2, 64, env_of({{"SLURM_CPUS_PER_TASK", "junk"}})).cpus, 64);
}

TEST(Threads, TorchrunRanksShareTheNodeAndItsOmpDefaultIsIgnored) {
  const auto env =
      env_of({{"LOCAL_WORLD_SIZE", "8"}, {"TORCHELASTIC_RUN_ID", "x"}, {"OMP_NUM_THREADS", "1"}});
  const auto b = plan_threads(0, 4, 128, env);
  EXPECT_EQ(b.cpus, 16);
  EXPECT_EQ(b.intra_op, 12);  // not torchrun's OMP_NUM_THREADS=1
}

TEST(Threads, AnExplicitChoiceWins) {
  EXPECT_EQ(plan_threads(3, 4, 128, env_of({{"OMP_NUM_THREADS", "2"}})).intra_op, 3);
  const auto b = plan_threads(0, 4, 128, env_of({{"OMP_NUM_THREADS", "2"}}));
  EXPECT_EQ(b.intra_op, 2);
  EXPECT_EQ(b.intra_op_from, "OMP_NUM_THREADS");
}

}  // namespace
