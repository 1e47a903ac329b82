#include "dde/util/thread_tuner.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace dde::util {

ThreadTuner::ThreadTuner(int64_t cpus, bool enabled)
    : cpus_(std::max<int64_t>(1, cpus)),
      enabled_(enabled && cpus_ > 1),
      threads_(cpus_),
      phase_(enabled_ ? Phase::kWarmup : Phase::kDecided) {}

void ThreadTuner::restore(int64_t threads) {
  if (!enabled_ || threads <= 0) return;  // not tuning: the user's count stays
  const int64_t kept = std::min(threads, cpus_);
  decide(kept, fmt::format("{} intra-op threads, as the checkpoint's run chose", kept));
}

void ThreadTuner::decide(int64_t threads, std::string why) {
  changed_ = threads != threads_;
  threads_ = threads;
  phase_ = Phase::kDecided;
  summary_ = std::move(why);
}

int64_t ThreadTuner::after_step(double seconds, double worker_cpu_seconds) {
  changed_ = false;
  switch (phase_) {
    case Phase::kDecided:
      break;
    case Phase::kWarmup:
      if (++count_ == kWarmupSteps) {
        phase_ = Phase::kAll;
        count_ = 0;
      }
      break;
    case Phase::kAll: {
      all_seconds_ += seconds;
      all_cpu_ += worker_cpu_seconds;
      if (++count_ < kProbeSteps) break;
      const double demand = all_seconds_ > 0 ? all_cpu_ / all_seconds_ : 0.0;
      if (!(demand >= kDemandFloor)) {
        decide(cpus_, fmt::format("decode workers used {:.3f} CPU (under {}): {} intra-op threads",
                                  demand, kDemandFloor, cpus_));
        break;
      }
      const auto reserve = static_cast<int64_t>(std::ceil(demand));
      fewer_threads_ = std::clamp<int64_t>(cpus_ - reserve, 1, cpus_ - 1);
      threads_ = fewer_threads_;
      changed_ = true;
      phase_ = Phase::kSettle;
      count_ = 0;
      break;
    }
    case Phase::kSettle:  // the first step after the switch is not measured
      phase_ = Phase::kFewer;
      break;
    case Phase::kFewer: {
      fewer_seconds_ += seconds;
      if (++count_ < kProbeSteps) break;
      const double all = all_seconds_ / kProbeSteps, fewer = fewer_seconds_ / kProbeSteps;
      const double demand = all_cpu_ / all_seconds_;
      const bool keep_fewer = fewer < all * (1.0 - kMargin);
      decide(keep_fewer ? fewer_threads_ : cpus_,
             fmt::format(
                 "decode workers used {:.3f} CPU; mean step {:.4f} s at {} intra-op threads, "
                 "{:.4f} s at {}: {} intra-op threads",
                 demand, all, cpus_, fewer, fewer_threads_, keep_fewer ? fewer_threads_ : cpus_));
      break;
    }
  }
  return threads_;
}

}  // namespace dde::util
