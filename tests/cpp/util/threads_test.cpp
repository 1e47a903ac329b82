#include "dde/util/threads.hpp"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <torch/torch.h>
#include <unistd.h>

#include <map>
#include <thread>

#include "util/env_of.hpp"
#include "util/process_threads.hpp"

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

// A helper thread runs one operator over a tensor above ATen's grain, with or without
// serial_operators_in_this_thread first. Returns the threads that operator started (its OpenMP
// team) and the helper's intra-op count afterwards.
std::pair<int64_t, int> threads_started_by_an_operator(bool serial, bool* serial_took) {
  const torch::Tensor big = torch::ones({1 << 20});
  int64_t started = -1;
  int count = 0;
  std::thread helper([&] {
    if (serial) *serial_took = dde::util::serial_operators_in_this_thread();
    const int64_t before = process_threads();
    const torch::Tensor doubled = big * 2;
    started = process_threads() - before;
    count = at::get_num_threads();
  });
  helper.join();
  return {started, count};
}

TEST(Threads, SerialOperatorsStartNoOpenMpTeamAndLeaveTheOtherThreadsAlone) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);  // as the default plan on two CPUs, whatever this machine has
  bool took = false;
  const auto [serial_started, serial_count] = threads_started_by_an_operator(true, &took);
  const auto [plain_started, plain_count] = threads_started_by_an_operator(false, nullptr);
  const int main_count = at::get_num_threads();
  at::set_num_threads(before);
  if (dlsym(RTLD_DEFAULT, "omp_set_num_threads") == nullptr) {
    GTEST_SKIP() << "this LibTorch has no OpenMP runtime: nothing to limit";
  }
  EXPECT_TRUE(took);
  // The control: without the call a helper thread starts a team of its own for the operator
  // (this is what made libgomp put the compute's idle threads to sleep).
  EXPECT_EQ(plain_count, 2);
  EXPECT_EQ(plain_started, 1);
  EXPECT_EQ(serial_count, 1);
  EXPECT_EQ(serial_started, 0);
  EXPECT_EQ(main_count, 2);  // the calling (compute) thread keeps its count
}

}  // namespace
