#include "dde/train/data_parallel_optimizer.hpp"

#include <gtest/gtest.h>

namespace {

using dde::train::DataParallelOptimizer;
using dde::train::NamedTensors;

NamedTensors fresh_params() {
  torch::manual_seed(3);
  return {{"w", torch::randn({5, 4}).requires_grad_(true)},
          {"b", torch::randn({4}).requires_grad_(true)},
          {"k", torch::randn({2, 3, 3, 3}).requires_grad_(true)}};
}

// One process: sharding's flat-buffer path (pack, reduce-scatter, clip from the shard's squares,
// all-gather) must give exactly the replicated result. Two ranks: tests/e2e/test_optimizers.py.
TEST(DataParallelOptimizer, ShardedEqualsReplicatedOnOneRank) {
  auto comm = dde::dist::Communicator::create({}, "auto", torch::kCPU, std::chrono::seconds(10));
  for (const std::string name : {"adamw", "adafactor"}) {
    dde::config::OptimConfig optim;
    optim.name = name;
    NamedTensors a = fresh_params(), b = fresh_params();
    auto replicated = DataParallelOptimizer::create(a, optim, false, *comm, 1 << 20);
    auto sharded = DataParallelOptimizer::create(b, optim, true, *comm, 1 << 20);
    EXPECT_TRUE(sharded->sharded());
    for (int s = 0; s < 4; ++s) {
      torch::manual_seed(50 + s);
      for (size_t i = 0; i < a.size(); ++i) {
        const torch::Tensor g = torch::randn_like(a[i].second) * 3.0;
        a[i].second.mutable_grad() = g.clone();
        b[i].second.mutable_grad() = g.clone();
      }
      for (auto* opt : {replicated.get(), sharded.get()}) opt->reduce_gradients();
      const double norm_a = replicated->clip_grad_norm(1.0);
      const double norm_b = sharded->clip_grad_norm(1.0);
      EXPECT_NEAR(norm_a, norm_b, 1e-12 * norm_a);
      replicated->step(1e-2);
      sharded->step(1e-2);
      replicated->zero_grad();
      sharded->zero_grad();
    }
    for (size_t i = 0; i < a.size(); ++i) {
      // One process, the same kernels on both sides: the only difference is the grad norm's
      // float64 summation order (per-shard sums), which moves the clip factor by ~1e-16 and the
      // float32 updates by at most one rounding (2^-24 of an update <= 10 lr = 0.1): 4 steps stay
      // below 4 x 0.1 x 2^-24 = 2.4e-8, inside 1e-7 on any processor.
      EXPECT_TRUE(torch::allclose(a[i].second, b[i].second, 0, 1e-7)) << name << " " << a[i].first;
      EXPECT_FALSE(b[i].second.grad().defined());
    }
    EXPECT_EQ(replicated->state().size(), sharded->state().size());
  }
}

}  // namespace
