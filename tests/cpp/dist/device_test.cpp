#include "dde/dist/device.hpp"

#include <gtest/gtest.h>

#include "util/expect_error.hpp"

namespace {

using dde::dist::cuda_device_for_rank;

TEST(DistDevice, LocalRankPicksTheGpu) {
  EXPECT_EQ(cuda_device_for_rank(0, 8), 0);
  EXPECT_EQ(cuda_device_for_rank(5, 8), 5);
}

TEST(DistDevice, OneVisibleGpuIsDeviceZeroWhateverTheLocalRank) {
  // srun/torchrun with CUDA_VISIBLE_DEVICES set per task: LOCAL_RANK 3 sees only device 0.
  EXPECT_EQ(cuda_device_for_rank(3, 1), 0);
}

TEST(DistDevice, MoreRanksThanGpusIsAnError) {
  expect_error_mentions([] { cuda_device_for_rank(4, 4); },
                        {"more ranks on this node than visible GPUs", "LOCAL_RANK", "< 4", "got 4",
                         "CUDA_VISIBLE_DEVICES"});
  expect_error_mentions([] { cuda_device_for_rank(0, 0); }, {"no CUDA device"});
  expect_error_mentions([] { cuda_device_for_rank(-1, 2); }, {"LOCAL_RANK", ">= 0"});
}

TEST(DistDevice, CpuIsAsked) {
  EXPECT_EQ(dde::dist::select_device("cpu", 3), torch::Device(torch::kCPU));
}

TEST(DistDevice, SyncDebugModeIsValidatedAndRestored) {
  expect_error_mentions([] { dde::dist::set_cuda_sync_debug("loud"); },
                        {"sync debug", "off, warn or error", "loud"});
  EXPECT_EQ(dde::dist::set_cuda_sync_debug("off"), "off");
}

TEST(DistDevice, SyncDebugErrorStopsAHostSync) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto x = torch::ones({4}, torch::Device(torch::kCUDA, 0));
  {
    const dde::dist::CudaSyncDebugScope scope("error");
    EXPECT_THROW((void)x.sum().item<float>(), c10::Error);
  }
  EXPECT_EQ(x.sum().item<float>(), 4.0F);  // restored: syncs allowed again
}

}  // namespace
