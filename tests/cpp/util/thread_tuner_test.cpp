#include "dde/util/thread_tuner.hpp"

#include <gtest/gtest.h>

#include <cstdint>

namespace {

using dde::util::ThreadTuner;

constexpr int64_t kWarm = ThreadTuner::kWarmupSteps;
constexpr int64_t kProbe = ThreadTuner::kProbeSteps;

// Feeds `steps` steps of `seconds` wall time with the workers busy `demand` cores of it; returns
// the count after the last one.
int64_t feed(ThreadTuner& tuner, int64_t steps, double seconds, double demand) {
  int64_t threads = tuner.threads();
  for (int64_t i = 0; i < steps; ++i) threads = tuner.after_step(seconds, demand * seconds);
  return threads;
}

TEST(ThreadTuner, DecodingBelowTheFloorChangesNothing) {
  ThreadTuner tuner(2, true);
  EXPECT_EQ(tuner.decision(), 0);  // measuring
  EXPECT_EQ(feed(tuner, kWarm + kProbe - 1, 0.5, 0.04), 2);
  EXPECT_FALSE(tuner.decided());
  EXPECT_EQ(feed(tuner, 1, 0.5, 0.04), 2);
  EXPECT_TRUE(tuner.decided());
  EXPECT_FALSE(tuner.changed_last_step());
  EXPECT_EQ(tuner.decision(), 2);
  EXPECT_NE(tuner.summary().find("0.040 CPU"), std::string::npos) << tuner.summary();
}

TEST(ThreadTuner, HeavyDecodingTriesFewerThreadsAndKeepsThemWhenFaster) {
  ThreadTuner tuner(2, true);
  EXPECT_EQ(feed(tuner, kWarm + kProbe - 1, 1.0, 0.6), 2);
  EXPECT_EQ(tuner.after_step(1.0, 0.6), 1);  // the trial starts
  EXPECT_TRUE(tuner.changed_last_step());
  EXPECT_FALSE(tuner.decided());
  EXPECT_EQ(tuner.after_step(9.0, 0.0), 1);  // the settle step is not measured
  EXPECT_EQ(feed(tuner, kProbe, 0.8, 0.6), 1);
  EXPECT_TRUE(tuner.decided());
  EXPECT_FALSE(tuner.changed_last_step());  // already at 1
  EXPECT_EQ(tuner.decision(), 1);
  EXPECT_EQ(feed(tuner, 20, 5.0, 0.0), 1);  // decided once: later steps change nothing
  EXPECT_NE(tuner.summary().find("1.0000 s at 2 intra-op threads, 0.8000 s at 1"),
            std::string::npos)
      << tuner.summary();
}

TEST(ThreadTuner, TheTrialIsUndoneUnlessClearlyFaster) {
  for (const double fewer : {1.2, 1.0, 1.0 - ThreadTuner::kMargin / 2}) {
    ThreadTuner tuner(2, true);
    feed(tuner, kWarm + kProbe, 1.0, 0.6);
    feed(tuner, 1, 1.0, 0.0);
    EXPECT_EQ(feed(tuner, kProbe, fewer, 0.6), 2) << fewer;
    EXPECT_TRUE(tuner.decided());
    EXPECT_TRUE(tuner.changed_last_step());  // back from the trial's 1
    EXPECT_EQ(tuner.decision(), 2);
  }
}

TEST(ThreadTuner, TheTrialLeavesTheWorkersTheirDemandRoundedUp) {
  ThreadTuner eight(8, true);
  EXPECT_EQ(feed(eight, kWarm + kProbe, 1.0, 2.3), 5);
  ThreadTuner whole(8, true);  // a whole number of CPUs is left as it is
  EXPECT_EQ(feed(whole, kWarm + kProbe, 1.0, 2.0), 6);
  ThreadTuner four(4, true);
  EXPECT_EQ(feed(four, kWarm + kProbe, 1.0, 50.0), 1);  // never below one thread
  ThreadTuner above(4, true);                           // just above the floor: a trial
  EXPECT_EQ(feed(above, kWarm + kProbe, 1.0, ThreadTuner::kDemandFloor * 1.01), 3);
  ThreadTuner below(4, true);  // just below: none
  EXPECT_EQ(feed(below, kWarm + kProbe, 1.0, ThreadTuner::kDemandFloor * 0.99), 4);
  EXPECT_TRUE(below.decided());
}

TEST(ThreadTuner, AUsersCountOrOneCpuIsNeverTuned) {
  for (ThreadTuner tuner : {ThreadTuner(4, false), ThreadTuner(1, true)}) {
    const int64_t cpus = tuner.threads();
    EXPECT_TRUE(tuner.decided());
    EXPECT_EQ(feed(tuner, 20, 1.0, 3.0), cpus);
    EXPECT_EQ(tuner.decision(), 0);  // nothing to record in a checkpoint
    tuner.restore(1);
    EXPECT_EQ(tuner.threads(), cpus);
  }
}

TEST(ThreadTuner, ARestoredDecisionIsUsedAsIs) {
  ThreadTuner tuner(8, true);
  tuner.restore(3);
  EXPECT_TRUE(tuner.decided());
  EXPECT_TRUE(tuner.changed_last_step());
  EXPECT_EQ(tuner.threads(), 3);
  EXPECT_EQ(feed(tuner, 20, 1.0, 0.0), 3);
  EXPECT_EQ(tuner.decision(), 3);
  ThreadTuner fewer_cpus(2, true);  // the checkpoint's run had more CPUs
  fewer_cpus.restore(6);
  EXPECT_EQ(fewer_cpus.threads(), 2);
  ThreadTuner undecided(2, true);  // a checkpoint written while it measured: measure again
  undecided.restore(0);
  EXPECT_FALSE(undecided.decided());
}

}  // namespace
