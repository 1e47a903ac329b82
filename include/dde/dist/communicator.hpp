// Collectives for data-parallel training on c10d (LibTorch's own distributed engine):
// Gloo on CPU, NCCL on CUDA. One process is a world of one: every call is then a no-op.
// A collective that a dead or hung peer never completes throws a dde::Error after the
// configured timeout instead of waiting forever.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "dde/dist/environment.hpp"

namespace dde::dist {

class Communicator {
 public:
  // backend: "auto" (nccl on CUDA, gloo otherwise), "gloo", "nccl".
  static std::unique_ptr<Communicator> create(const DistEnvironment& env,
                                              const std::string& backend,
                                              const torch::Device& device,
                                              std::chrono::seconds timeout);
  virtual ~Communicator() = default;

  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  virtual std::string backend() const = 0;

  // Every rank's tensors take root's values.
  virtual void broadcast(std::vector<torch::Tensor>& tensors, int64_t root) = 0;
  // Sums in place across ranks, packed into buckets of about `bucket_bytes`.
  virtual void all_reduce_sum(std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) = 0;
  // Rows of every rank, concatenated in rank order: [n, ...] per rank -> [world * n, ...].
  virtual torch::Tensor all_gather(const torch::Tensor& tensor) = 0;
  // ZeRO-1's pair (c10d _reduce_scatter_base / _allgather_base, implemented by NCCL and Gloo):
  // `flat` [world * n] summed over ranks -> this rank's slice [n] of the sum, and
  // every rank's `shard` [n] -> [world * n] in rank order.
  virtual torch::Tensor reduce_scatter_sum(const torch::Tensor& flat) = 0;
  virtual torch::Tensor all_gather_flat(const torch::Tensor& shard) = 0;
  virtual void barrier() = 0;
  // True on every rank if it is true on any rank.
  bool any(bool flag);
};

}  // namespace dde::dist
