// The update half of a data-parallel step, as the trainer runs it on every rank:
//   reduce_gradients -> clip_grad_norm (global norm, the non-finite guard reads it) -> step.
// Replicated (dist.shard_optimizer: false): gradients are all-reduced in buckets and every rank
// runs the whole optimizer. Sharded (ZeRO stage 1, true): gradients are reduce-scattered over a
// flat padded buffer (dist/shard_layout.hpp) so each rank holds the sum for its own parameters
// only, the global grad norm is the all-reduced sum of each rank's squares, each rank updates
// its parameters with 1/world of the optimizer state, and the weights are all-gathered.
#pragma once

#include <memory>
#include <string>

#include "dde/config/config.hpp"
#include "dde/dist/communicator.hpp"
#include "dde/train/optimizer.hpp"

namespace dde::train {

class DataParallelOptimizer {
 public:
  // `params` are the trainable parameters in the same order on every rank; `comm` outlives this.
  static std::unique_ptr<DataParallelOptimizer> create(NamedTensors params,
                                                       const config::OptimConfig& optim, bool shard,
                                                       dist::Communicator& comm,
                                                       int64_t bucket_bytes);
  virtual ~DataParallelOptimizer() = default;

  // Sums the gradients over ranks, wherever this rank's update needs them.
  virtual void reduce_gradients() = 0;
  // Global 2-norm of the summed gradients before clipping (float64, equal on every rank);
  // scales them to max_norm when above it (max_norm <= 0: only measures).
  virtual double clip_grad_norm(double max_norm) = 0;
  // The optimizer update at `lr`; afterwards every rank holds the same weights.
  virtual void step(double lr) = 0;
  virtual void zero_grad() = 0;
  // The optimizer state this rank holds, by name: all of it when replicated, its own
  // parameters' when sharded. load_state takes what this rank needs and ignores the rest.
  virtual NamedTensors state() const = 0;
  virtual void load_state(const NamedTensors& state, const std::string& where) = 0;
  virtual bool sharded() const = 0;
};

}  // namespace dde::train
