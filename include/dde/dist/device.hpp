// The device a rank computes on, chosen from the launcher's LOCAL_RANK before anything is
// allocated, and CUDA's sync debug mode (a host sync inside a marked region warns or throws).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace dde::dist {

// The CUDA device index of a rank: 0 when the process sees one GPU (a launcher that gives each
// task its own GPU through CUDA_VISIBLE_DEVICES: LOCAL_RANK may be 3 while only device 0 exists),
// otherwise LOCAL_RANK itself. LOCAL_RANK >= device_count > 1 is a dde::Error (two ranks on one GPU
// would make NCCL fail), as is device_count < 1.
int64_t cuda_device_for_rank(int64_t local_rank, int64_t device_count);

// requested: "cpu", "cuda" (an error without a GPU) or "auto" (cuda when available). A CUDA
// device is made the current one (c10::cuda::set_device) so that every later allocation, stream
// and NCCL communicator of this process lands on it.
torch::Device select_device(const std::string& requested, int64_t local_rank);

// mode: "off", "warn" or "error" (torch.cuda.set_sync_debug_mode's levels). A no-op in a build
// without CUDA and for "off"; otherwise needs a CUDA build. Returns the previous mode.
std::string set_cuda_sync_debug(const std::string& mode);

// Sets `mode` for its lifetime (the micro-batch loop), restoring the previous one after.
class CudaSyncDebugScope {
 public:
  explicit CudaSyncDebugScope(const std::string& mode);
  ~CudaSyncDebugScope();
  CudaSyncDebugScope(const CudaSyncDebugScope&) = delete;
  CudaSyncDebugScope& operator=(const CudaSyncDebugScope&) = delete;

 private:
  bool active_;
  std::string previous_;
};

}  // namespace dde::dist
