// Host -> device copies that never block the host: from page-locked memory on CUDA (a pageable
// source would make the driver stage it synchronously), a plain copy elsewhere.
#pragma once

#include <torch/torch.h>

namespace dde::util {

inline torch::Tensor to_device_async(const torch::Tensor& x, const torch::Device& device) {
  if (device.is_cuda() && x.is_cpu() && !x.is_pinned()) {
    return x.pin_memory().to(device, /*non_blocking=*/true);
  }
  return x.to(device, /*non_blocking=*/true);
}

}  // namespace dde::util
