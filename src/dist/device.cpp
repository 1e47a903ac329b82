#include "dde/dist/device.hpp"

// CMake defines DDE_WITH_NCCL only in builds against a CUDA LibTorch, which link c10_cuda.
#ifdef DDE_WITH_NCCL
#define DDE_CUDA_BUILD 1
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "dde/util/error.hpp"

namespace dde::dist {

int64_t cuda_device_for_rank(int64_t local_rank, int64_t device_count) {
  if (device_count < 1) {
    throw Error({"no CUDA device", "run.device", "at least one visible GPU",
                 std::to_string(device_count) + " devices",
                 "check CUDA_VISIBLE_DEVICES and the driver, or set run.device: cpu"});
  }
  if (local_rank < 0) {
    throw Error({"bad local rank", "LOCAL_RANK", ">= 0", std::to_string(local_rank), ""});
  }
  if (device_count == 1) return 0;
  if (local_rank >= device_count) {
    throw Error({"more ranks on this node than visible GPUs", "LOCAL_RANK",
                 "< " + std::to_string(device_count) + " (the GPUs this process sees)",
                 std::to_string(local_rank),
                 "start one rank per GPU (torchrun --nproc-per-node), or show each task one GPU "
                 "with CUDA_VISIBLE_DEVICES"});
  }
  return local_rank;
}

torch::Device select_device(const std::string& requested, int64_t local_rank) {
  if (requested == "cpu") return torch::kCPU;
  if (requested == "privateuseone") {
    // An out-of-tree backend registered as PrivateUse1 (the tests' fake accelerator, loaded by
    // scripts/fake_device_check.sh): its device 0, whatever the rank (one per process).
    if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::PrivateUse1)) {
      throw Error({"no PrivateUse1 backend registered", "run.device", "a loaded backend",
                   "privateuseone with none in this process",
                   "load one first (tests: LD_PRELOAD=build/tests/cpp/libdde_fake_device.so), or "
                   "set run.device: auto, cpu or cuda"});
    }
    return {c10::DeviceType::PrivateUse1, 0};
  }
  const bool available = torch::cuda::is_available();
  if (requested == "cuda" && !available) {
    throw Error({"CUDA requested but not available", "run.device", "a visible GPU", "none",
                 "set run.device: cpu (or auto), or check CUDA_VISIBLE_DEVICES and the driver"});
  }
  if (!available) return torch::kCPU;
  const auto count = static_cast<int64_t>(static_cast<unsigned char>(torch::cuda::device_count()));
  const auto index = static_cast<c10::DeviceIndex>(cuda_device_for_rank(local_rank, count));
#ifdef DDE_CUDA_BUILD
  c10::cuda::set_device(index);
#endif
  return {torch::kCUDA, index};
}

#ifdef DDE_CUDA_BUILD
namespace {
c10::cuda::SyncDebugMode parse_sync_mode(const std::string& mode) {
  if (mode == "off") return c10::cuda::SyncDebugMode::L_DISABLED;
  if (mode == "warn") return c10::cuda::SyncDebugMode::L_WARN;
  if (mode == "error") return c10::cuda::SyncDebugMode::L_ERROR;
  throw Error({"bad CUDA sync debug mode", "run.cuda_sync_debug", "off, warn or error", mode, ""});
}
std::string sync_mode_name(c10::cuda::SyncDebugMode mode) {
  switch (mode) {
    case c10::cuda::SyncDebugMode::L_WARN:
      return "warn";
    case c10::cuda::SyncDebugMode::L_ERROR:
      return "error";
    default:
      return "off";
  }
}
}  // namespace

std::string set_cuda_sync_debug(const std::string& mode) {
  const c10::cuda::SyncDebugMode wanted = parse_sync_mode(mode);
  c10::cuda::WarningState& state = c10::cuda::warning_state();
  std::string previous = sync_mode_name(state.get_sync_debug_mode());
  state.set_sync_debug_mode(wanted);
  return previous;
}
#else
std::string set_cuda_sync_debug(const std::string& mode) {
  if (mode != "off" && mode != "warn" && mode != "error") {
    throw Error(
        {"bad CUDA sync debug mode", "run.cuda_sync_debug", "off, warn or error", mode, ""});
  }
  return "off";
}
#endif

CudaSyncDebugScope::CudaSyncDebugScope(const std::string& mode) : active_(mode != "off") {
  if (active_) previous_ = set_cuda_sync_debug(mode);
}

CudaSyncDebugScope::~CudaSyncDebugScope() {
  if (active_) set_cuda_sync_debug(previous_);
}

}  // namespace dde::dist
