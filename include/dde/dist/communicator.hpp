// Collectives for data-parallel training on c10d (LibTorch's own distributed engine):
// Gloo on CPU, NCCL on CUDA. One process is a world of one: every call is then a no-op, unless
// force_process_group asks for a real process group anyway (so that one GPU runs the NCCL path).
// Every tensor handed to a collective must live on the communicator's device (NCCL takes only
// CUDA tensors): another device is a dde::Error, in a world of one too. On the CPU that check
// cannot see a host tensor (every tensor is on the host); the tests' strict fake accelerator
// (run.device: privateuseone, scripts/fake_device_check.sh) is where it bites without a GPU.
// Gloo with a device that is neither the CPU nor CUDA stages through host copies, after the
// check. Dtypes are kept (NCCL reduces float64).
// A collective that fails, or that a dead or hung peer never completes, throws a dde::Error
// (Gloo: after the configured timeout; NCCL: from its watchdog, which aborts the process group).
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dde/dist/environment.hpp"

namespace dde::dist {

class Communicator {
 public:
  // backend: "auto" (nccl on CUDA, gloo otherwise), "gloo", "nccl". device: the device whose
  // tensors the collectives take (cuda:N with its index, or cpu). force_process_group: build the
  // process group (store, backend) even when world_size is 1.
  static std::unique_ptr<Communicator> create(const DistEnvironment& env,
                                              const std::string& backend,
                                              const torch::Device& device,
                                              std::chrono::seconds timeout,
                                              bool force_process_group = false);
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  virtual std::string backend() const = 0;
  const torch::Device& device() const { return device_; }

  // Every rank's tensors take root's values.
  void broadcast(std::vector<torch::Tensor>& tensors, int64_t root);
  // Sums in place across ranks, packed into buckets of about `bucket_bytes`.
  void all_reduce_sum(std::vector<torch::Tensor>& tensors, int64_t bucket_bytes);
  // Rows of every rank, concatenated in rank order: [n, ...] per rank -> [world * n, ...].
  torch::Tensor all_gather(const torch::Tensor& tensor);
  // ZeRO-1's pair (c10d _reduce_scatter_base / _allgather_base, implemented by NCCL and Gloo):
  // `flat` [world * n] summed over ranks -> this rank's slice [n] of the sum, and
  // every rank's `shard` [n] -> [world * n] in rank order.
  torch::Tensor reduce_scatter_sum(const torch::Tensor& flat);
  torch::Tensor all_gather_flat(const torch::Tensor& shard);
  // Every rank reaches it: within dist.timeout_s, or within `timeout` (a wait that outlasts the
  // training collectives' bound, e.g. around a checkpoint write).
  void barrier() { do_barrier(std::nullopt); }
  void barrier_within(std::chrono::seconds timeout) { do_barrier(timeout); }
  // True on every rank if it is true on any rank (one host sync when there is a process group).
  bool any(bool flag);

 protected:
  explicit Communicator(const torch::Device& device) : device_(device) {}

 private:
  virtual void do_barrier(std::optional<std::chrono::seconds> timeout) = 0;
  virtual void do_broadcast(std::vector<torch::Tensor>& tensors, int64_t root) = 0;
  virtual void do_all_reduce_sum(std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) = 0;
  virtual torch::Tensor do_all_gather(const torch::Tensor& tensor) = 0;
  virtual torch::Tensor do_reduce_scatter_sum(const torch::Tensor& flat) = 0;
  virtual torch::Tensor do_all_gather_flat(const torch::Tensor& shard) = 0;
  void check_on_device(const torch::Tensor& tensor, const char* collective, size_t index) const;

  torch::Device device_;
};

}  // namespace dde::dist
