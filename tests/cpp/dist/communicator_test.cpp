#include "dde/dist/communicator.hpp"

#include <gtest/gtest.h>

#include "dde/util/error.hpp"
#include "util/expect_error.hpp"

namespace {

using dde::dist::Communicator;
using dde::dist::DistEnvironment;

constexpr std::chrono::seconds kTimeout{30};

// One process, a real Gloo process group behind a real TCPStore on localhost (port 0: the
// store picks a free one).
std::unique_ptr<Communicator> gloo_world_of_one() {
  DistEnvironment env;
  env.source = "test";
  env.master_port = 0;
  return Communicator::create(env, "gloo", torch::kCPU, kTimeout, /*force_process_group=*/true);
}

torch::Tensor f64(std::vector<double> v) { return torch::tensor(v, torch::kFloat64); }

TEST(Communicator, WorldOfOneHasNoProcessGroupUnlessForced) {
  const auto single = Communicator::create(DistEnvironment{}, "auto", torch::kCPU, kTimeout);
  EXPECT_EQ(single->backend(), "none");
  const auto forced = gloo_world_of_one();
  EXPECT_EQ(forced->backend(), "gloo");
  EXPECT_EQ(forced->world_size(), 1);
  EXPECT_EQ(forced->rank(), 0);
  EXPECT_EQ(forced->device(), torch::Device(torch::kCPU));
}

TEST(Communicator, GlooWorldOfOneRunsEveryCollective) {
  const auto comm = gloo_world_of_one();
  // Mixed dtypes (the trainer's float32 gradients and float64 figures), split into buckets.
  std::vector<torch::Tensor> tensors{f64({1.5, -2.0}),
                                     torch::arange(6, torch::kFloat32).view({2, 3}),
                                     torch::full({3}, 0.25, torch::kFloat32), f64({7.0})};
  std::vector<torch::Tensor> expected;
  expected.reserve(tensors.size());
  for (const auto& t : tensors) expected.push_back(t.clone());
  comm->all_reduce_sum(tensors, /*bucket_bytes=*/16);
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_TRUE(torch::equal(tensors[i], expected[i])) << i;
    EXPECT_EQ(tensors[i].scalar_type(), expected[i].scalar_type()) << i;
  }
  const auto rows = torch::rand({3, 4}, torch::kFloat64);
  const auto gathered = comm->all_gather(rows);
  EXPECT_TRUE(torch::equal(gathered, rows));
  std::vector<torch::Tensor> weights{torch::ones({4})};
  comm->broadcast(weights, /*root=*/0);
  EXPECT_TRUE(torch::equal(weights[0], torch::ones({4})));
  EXPECT_TRUE(comm->any(true));
  EXPECT_FALSE(comm->any(false));
  comm->barrier();
}

TEST(Communicator, RefusesATensorOnAnotherDevice) {
  // A process group on the CPU handed a tensor elsewhere (meta: no storage, any machine).
  const auto comm = gloo_world_of_one();
  std::vector<torch::Tensor> tensors{f64({1.0}), torch::zeros({2}, torch::Device(torch::kMeta))};
  expect_error_mentions([&] { comm->all_reduce_sum(tensors, 1 << 20); },
                        {"wrong device", "all_reduce_sum: tensor 1", "expected a tensor on cpu",
                         "got a tensor on meta", "comm.device()"});
  expect_error_mentions([&] { comm->all_gather(torch::zeros({2}, torch::Device(torch::kMeta))); },
                        {"wrong device", "all_gather", "meta"});
}

TEST(Communicator, WorldOfOneRefusesTooSoNcclMistakesShowOnTheCpu) {
  // The trainer's figures on the host while the communicator is for another device: the very
  // mistake that makes NCCL fail at the first step, caught without a process group or a GPU.
  const auto comm =
      Communicator::create(DistEnvironment{}, "auto", torch::Device(torch::kMeta), kTimeout);
  std::vector<torch::Tensor> stats{f64({1.0, 2.0})};
  expect_error_mentions([&] { comm->all_reduce_sum(stats, 1 << 20); },
                        {"wrong device", "expected a tensor on meta", "got a tensor on cpu"});
  expect_error_mentions([&] { comm->broadcast(stats, 0); }, {"broadcast: tensor 0", "cpu"});
  expect_error_mentions([&] { comm->all_gather(stats[0]); }, {"all_gather", "cpu"});
}

TEST(Communicator, AFailingCollectiveIsADdeError) {
  // Gloo refuses a root outside the world with a c10::Error: it reaches the user as ours.
  const auto comm = gloo_world_of_one();
  std::vector<torch::Tensor> tensors{f64({1.0})};
  expect_error_mentions(
      [&] { comm->broadcast(tensors, /*root=*/3); },
      {"collective failed: broadcast", "rank 0 of 1 (gloo on cpu)", "dist.timeout_s", "--resume"});
}

TEST(Communicator, BackendAndDeviceMustAgree) {
  DistEnvironment env;
  env.master_port = 0;
  expect_error_mentions(
      [&] {
        Communicator::create(env, "nccl", torch::kCPU, kTimeout, /*force_process_group=*/true);
      },
      {"NCCL needs CUDA tensors", "dist.backend", "gloo"});
  expect_error_mentions(
      [&] { Communicator::create(env, "auto", torch::Device(torch::kCUDA), kTimeout); },
      {"without an index", "cuda:N"});
}

#ifdef DDE_WITH_NCCL
TEST(Communicator, NcclWorldOfOneOnTheRanksGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  DistEnvironment env;
  env.master_port = 0;
  const torch::Device gpu(torch::kCUDA, 0);
  const auto comm = Communicator::create(env, "auto", gpu, kTimeout, /*force_process_group=*/true);
  EXPECT_EQ(comm->backend(), "nccl");
  std::vector<torch::Tensor> tensors{
      torch::tensor({1.5, -2.0}, torch::dtype(torch::kFloat64).device(gpu)),
      torch::ones({3}, torch::dtype(torch::kFloat32).device(gpu))};
  comm->all_reduce_sum(tensors, 1 << 20);
  EXPECT_TRUE(torch::equal(tensors[0].cpu(), f64({1.5, -2.0})));
  EXPECT_TRUE(torch::equal(comm->all_gather(tensors[1]).cpu(), torch::ones({3})));
  EXPECT_TRUE(comm->any(true));
  EXPECT_FALSE(comm->any(false));
  comm->barrier();
  std::vector<torch::Tensor> host{f64({1.0})};
  expect_error_mentions([&] { comm->all_reduce_sum(host, 8); },
                        {"wrong device", "expected a tensor on cuda:0", "got a tensor on cpu"});
}
#endif

}  // namespace
