#include "dde/train/memory_meter.hpp"

#include <c10/cuda/CUDACachingAllocator.h>

#include <fstream>
#include <sstream>
#include <string>

namespace dde::train {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

// A "Vm...:   1234 kB" line of /proc/self/status, in MiB; 0 where it cannot be read.
double proc_status_mb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream fields(line.substr(key.size() + 1));
      double kb = 0.0;
      fields >> kb;
      return kb / 1024.0;
    }
  }
  return 0.0;
}

double cuda_allocated_mb(const torch::Device& device, bool peak) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  const auto& bytes =
      stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
  return static_cast<double>(peak ? bytes.peak : bytes.current) / kMiB;
}

}  // namespace

void MemoryMeter::begin_step() {
  if (device_.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device_.index());
    held_mb_ = cuda_allocated_mb(device_, /*peak=*/false);
    return;
  }
  std::ofstream("/proc/self/clear_refs") << "5";  // resets VmHWM to the current RSS (Linux >= 4.0)
  held_mb_ = proc_status_mb("VmRSS");
}

double MemoryMeter::peak_mb() const {
  return device_.is_cuda() ? cuda_allocated_mb(device_, /*peak=*/true) : proc_status_mb("VmHWM");
}

void MemoryMeter::mark_forward() { forward_peak_mb_ = peak_mb(); }

StepMemory MemoryMeter::end_step() const {
  StepMemory m;
  m.held_mb = held_mb_;
  m.peak_mb = peak_mb();
  m.forward_peak_mb = forward_peak_mb_;
  return m;
}

}  // namespace dde::train
