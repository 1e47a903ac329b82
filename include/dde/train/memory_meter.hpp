// Memory of one optimizer step: what was held when it began and the peak during it, so that
// peak - held is the step's activation (and temporary) memory. CUDA: the caching allocator's
// allocated bytes (peak reset at each step). CPU: the process's resident set (VmRSS, and VmHWM
// after resetting it through /proc/self/clear_refs); freed heap pages may stay resident, so CPU
// figures are upper bounds unless malloc returns large blocks (bench/ sets
// MALLOC_MMAP_THRESHOLD_ so that it does).
#pragma once

#include <torch/torch.h>

namespace dde::train {

struct StepMemory {
  double held_mb = 0.0;          // at the start of the step
  double peak_mb = 0.0;          // highest during the step
  double forward_peak_mb = 0.0;  // highest up to the end of the first micro-batch's forward:
                                 // forward_peak - held is the activation memory (the gradients,
                                 // set to none between steps, are allocated only in backward)
};

class MemoryMeter {
 public:
  explicit MemoryMeter(const torch::Device& device) : device_(device) {}
  void begin_step();
  // After the first micro-batch's forward (host-side reads only: no device sync).
  void mark_forward();
  StepMemory end_step() const;

 private:
  torch::Device device_;
  double held_mb_ = 0.0;
  double forward_peak_mb_ = 0.0;
  double peak_mb() const;
};

}  // namespace dde::train
