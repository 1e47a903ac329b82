#include "dde/dist/environment.hpp"

#include <gtest/gtest.h>

#include <map>

#include "dde/util/error.hpp"
#include "util/env_of.hpp"

namespace {

using dde::dist::detect_environment;

TEST(DistEnvironment, NoLauncherIsOneProcess) {
  const auto env = detect_environment("auto", env_of({}));
  EXPECT_EQ(env.source, "single");
  EXPECT_EQ(env.world_size, 1);
  EXPECT_EQ(env.rank, 0);
}

TEST(DistEnvironment, TorchrunVariables) {
  const auto env = detect_environment("auto", env_of({{"RANK", "3"},
                                                      {"WORLD_SIZE", "8"},
                                                      {"LOCAL_RANK", "3"},
                                                      {"MASTER_ADDR", "node7"},
                                                      {"MASTER_PORT", "29600"},
                                                      {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                                                      {"TORCHELASTIC_RESTART_COUNT", "2"}}));
  EXPECT_EQ(env.source, "torchrun");
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 3);
  EXPECT_EQ(env.master_addr, "node7");
  EXPECT_EQ(env.master_port, 29600);
  EXPECT_TRUE(env.agent_store);
  EXPECT_EQ(env.restart_count, 2);
}

TEST(DistEnvironment, SlurmVariablesGiveRendezvousFromNodelistAndJobId) {
  const auto env =
      detect_environment("auto", env_of({{"SLURM_PROCID", "9"},
                                         {"SLURM_NTASKS", "16"},
                                         {"SLURM_LOCALID", "1"},
                                         {"SLURM_JOB_NODELIST", "gpu[003-004,010],cpu01"},
                                         {"SLURM_JOB_ID", "123456"}}));
  EXPECT_EQ(env.source, "slurm");
  EXPECT_EQ(env.rank, 9);
  EXPECT_EQ(env.world_size, 16);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.master_addr, "gpu003");
  EXPECT_EQ(env.master_port, 20000 + 123456 % 20000);
}

TEST(DistEnvironment, TorchrunWinsOverSlurmUnderAuto) {
  const auto env = detect_environment(
      "auto",
      env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}}));
  EXPECT_EQ(env.source, "torchrun");
  EXPECT_EQ(detect_environment("slurm", env_of({{"RANK", "1"},
                                                {"WORLD_SIZE", "2"},
                                                {"SLURM_PROCID", "0"},
                                                {"SLURM_NTASKS", "1"}}))
                .source,
            "slurm");
}

TEST(DistEnvironment, FirstSlurmHost) {
  EXPECT_EQ(dde::dist::first_slurm_host("node01"), "node01");
  EXPECT_EQ(dde::dist::first_slurm_host("a01,a02"), "a01");
  EXPECT_EQ(dde::dist::first_slurm_host("gpu-[17-20]"), "gpu-17");
  EXPECT_EQ(dde::dist::first_slurm_host("x[7,9]-ib"), "x7-ib");
}

TEST(DistEnvironment, BadVariablesNameTheVariable) {
  try {
    detect_environment("auto", env_of({{"RANK", "two"}, {"WORLD_SIZE", "2"}}));
    FAIL() << "expected an error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("RANK"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("two"), std::string::npos) << e.what();
  }
  try {
    detect_environment("auto", env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}}));
    FAIL() << "expected an error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank outside the world"), std::string::npos) << e.what();
  }
  EXPECT_THROW(detect_environment("env", env_of({})), dde::Error);
  EXPECT_THROW(detect_environment("slurm", env_of({})), dde::Error);
}

}  // namespace
