#include "dde/util/threads.hpp"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <map>
#include <thread>

#include "util/env_of.hpp"

namespace {

using dde::util::kDecodeWorkerNice;
using dde::util::plan_threads;

TEST(Threads, ComputeGetsEveryCpuAndTheDecodeWorkersYield) {
  const auto b = plan_threads(0, /*decode_workers=*/1, /*affinity_cpus=*/2, env_of({}));
  EXPECT_EQ(b.cpus, 2);
  EXPECT_EQ(b.intra_op, 2);
  EXPECT_EQ(b.worker_nice, kDecodeWorkerNice);
  EXPECT_EQ(plan_threads(0, 4, 16, env_of({})).intra_op, 16);
  EXPECT_EQ(plan_threads(0, 8, 4, env_of({})).intra_op, 4);
  // Without decode workers (the cache encoder) nothing is lowered.
  EXPECT_EQ(plan_threads(0, 0, 4, env_of({})).worker_nice, 0);
  // The default plan with workers is tuned after the first steps (util/thread_tuner.hpp); a
  // user's split, a single CPU or no workers are not.
  EXPECT_TRUE(b.adaptive);
  EXPECT_FALSE(plan_threads(0, 0, 4, env_of({})).adaptive);
  EXPECT_FALSE(plan_threads(0, 2, 1, env_of({})).adaptive);
  EXPECT_FALSE(plan_threads(2, 2, 4, env_of({})).adaptive);
  EXPECT_FALSE(plan_threads(0, 2, 4, env_of({{"OMP_NUM_THREADS", "2"}})).adaptive);
}

TEST(Threads, SlurmCpusPerTaskCapsTheMask) {
  const auto b = plan_threads(0, 2, 64, env_of({{"SLURM_CPUS_PER_TASK", "8"}}));
  EXPECT_EQ(b.cpus, 8);
  EXPECT_EQ(b.cpus_from, "SLURM_CPUS_PER_TASK");
  EXPECT_EQ(b.intra_op, 8);
  EXPECT_EQ(plan_threads(0, 2, 64, env_of({{"SLURM_CPUS_PER_TASK", "junk"}})).cpus, 64);
}

TEST(Threads, TorchrunRanksShareTheNodeAndItsOmpDefaultIsIgnored) {
  const auto env =
      env_of({{"LOCAL_WORLD_SIZE", "8"}, {"TORCHELASTIC_RUN_ID", "x"}, {"OMP_NUM_THREADS", "1"}});
  const auto b = plan_threads(0, 4, 128, env);
  EXPECT_EQ(b.cpus, 16);
  EXPECT_EQ(b.intra_op, 16);  // not torchrun's OMP_NUM_THREADS=1
  EXPECT_EQ(b.worker_nice, kDecodeWorkerNice);
}

TEST(Threads, AnExplicitChoiceWinsAndKeepsTheWorkersPriority) {
  const auto chosen = plan_threads(3, 4, 128, env_of({{"OMP_NUM_THREADS", "2"}}));
  EXPECT_EQ(chosen.intra_op, 3);
  EXPECT_EQ(chosen.worker_nice, 0);
  const auto b = plan_threads(0, 4, 128, env_of({{"OMP_NUM_THREADS", "2"}}));
  EXPECT_EQ(b.intra_op, 2);
  EXPECT_EQ(b.intra_op_from, "OMP_NUM_THREADS");
  EXPECT_EQ(b.worker_nice, 0);
}

int thread_nice() { return getpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid))); }

TEST(Threads, LoweringOneThreadLeavesTheOthersAlone) {
  const int before = thread_nice();
  int inside = before;
  std::thread worker([&] {
    ASSERT_TRUE(dde::util::lower_this_thread_priority(kDecodeWorkerNice));
    inside = thread_nice();
  });
  worker.join();
  EXPECT_EQ(inside, std::min(19, before + kDecodeWorkerNice));
  EXPECT_EQ(thread_nice(), before);  // the calling (compute) thread keeps its priority
}

}  // namespace
