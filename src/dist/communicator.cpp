#include "dde/dist/communicator.hpp"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DDE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::dist {
namespace {

// A world of one process.
class SingleProcess final : public Communicator {
 public:
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return 1; }
  std::string backend() const override { return "none"; }
  void broadcast(std::vector<torch::Tensor>& /*tensors*/, int64_t /*root*/) override {}
  void all_reduce_sum(std::vector<torch::Tensor>& /*tensors*/, int64_t /*bucket_bytes*/) override {}
  torch::Tensor all_gather(const torch::Tensor& tensor) override { return tensor; }
  torch::Tensor reduce_scatter_sum(const torch::Tensor& flat) override { return flat; }
  torch::Tensor all_gather_flat(const torch::Tensor& shard) override { return shard; }
  void barrier() override {}
};

class ProcessGroupCommunicator final : public Communicator {
 public:
  ProcessGroupCommunicator(c10::intrusive_ptr<c10d::Backend> group, std::string backend,
                           int64_t rank, int64_t world_size, std::chrono::seconds timeout)
      : group_(std::move(group)),
        backend_(std::move(backend)),
        rank_(rank),
        world_size_(world_size),
        timeout_(timeout) {}

  int64_t rank() const override { return rank_; }
  int64_t world_size() const override { return world_size_; }
  std::string backend() const override { return backend_; }

  void broadcast(std::vector<torch::Tensor>& tensors, int64_t root) override {
    for (torch::Tensor& t : tensors) {
      std::vector<torch::Tensor> one{t};
      c10d::BroadcastOptions options;
      options.rootRank = root;
      wait(group_->broadcast(one, options), "broadcast");
    }
  }

  void all_reduce_sum(std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) override {
    // Pack same-dtype tensors into flat buckets: few large collectives instead of many small.
    size_t begin = 0;
    while (begin < tensors.size()) {
      size_t end = begin;
      int64_t bytes = 0;
      while (
          end < tensors.size() && tensors[end].scalar_type() == tensors[begin].scalar_type() &&
          (end == begin || bytes + static_cast<int64_t>(tensors[end].nbytes()) <= bucket_bytes)) {
        bytes += static_cast<int64_t>(tensors[end].nbytes());
        ++end;
      }
      std::vector<torch::Tensor> flat_parts;
      for (size_t i = begin; i < end; ++i) flat_parts.push_back(tensors[i].reshape({-1}));
      std::vector<torch::Tensor> bucket{torch::cat(flat_parts)};
      wait(group_->allreduce(bucket), "all_reduce");
      int64_t offset = 0;
      for (size_t i = begin; i < end; ++i) {
        const int64_t n = tensors[i].numel();
        tensors[i].copy_(bucket[0].slice(0, offset, offset + n).view_as(tensors[i]));
        offset += n;
      }
      begin = end;
    }
  }

  torch::Tensor all_gather(const torch::Tensor& tensor) override {
    std::vector<std::vector<torch::Tensor>> outputs(1);
    for (int64_t r = 0; r < world_size_; ++r) outputs[0].push_back(torch::empty_like(tensor));
    std::vector<torch::Tensor> input{tensor.contiguous()};
    wait(group_->allgather(outputs, input), "all_gather");
    return torch::cat(outputs[0], 0);
  }

  torch::Tensor reduce_scatter_sum(const torch::Tensor& flat) override {
    check_flat(flat, "reduce_scatter");
    torch::Tensor input = flat.contiguous();
    torch::Tensor output = torch::empty({flat.numel() / world_size_}, flat.options());
    c10d::ReduceScatterOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    wait(group_->_reduce_scatter_base(output, input, options), "reduce_scatter");
    return output;
  }

  torch::Tensor all_gather_flat(const torch::Tensor& shard) override {
    torch::Tensor input = shard.contiguous();
    torch::Tensor output = torch::empty({shard.numel() * world_size_}, shard.options());
    wait(group_->_allgather_base(output, input), "all_gather");
    return output;
  }

  void barrier() override {
    c10d::BarrierOptions options;
    options.timeout = timeout_;
    wait(group_->barrier(options), "barrier");
  }

 private:
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) const {
    try {
      work->wait(std::chrono::duration_cast<std::chrono::milliseconds>(timeout_));
    } catch (const std::exception& e) {
      throw Error({std::string("collective failed: ") + what,
                   "rank " + std::to_string(rank_) + " of " + std::to_string(world_size_) + " (" +
                       backend_ + ")",
                   "every rank alive and taking part (waiting at most dist.timeout_s = " +
                       std::to_string(timeout_.count()) + " s)",
                   e.what(),
                   "a peer died or hung: check the other ranks' logs; resume with --resume"});
    }
  }

  void check_flat(const torch::Tensor& flat, const char* what) const {
    if (flat.dim() != 1 || flat.numel() % world_size_ != 0) {
      throw Error({std::string("bad input to ") + what, "rank " + std::to_string(rank_),
                   "a flat tensor whose size is a multiple of the world size " +
                       std::to_string(world_size_),
                   c10::str(flat.sizes()), "this is a bug in the caller"});
    }
  }

  c10::intrusive_ptr<c10d::Backend> group_;
  std::string backend_;
  int64_t rank_;
  int64_t world_size_;
  std::chrono::seconds timeout_;
};

}  // namespace

bool Communicator::any(bool flag) {
  std::vector<torch::Tensor> t{torch::full({1}, flag ? 1.0 : 0.0, torch::kFloat64)};
  all_reduce_sum(t, 8);
  return t[0].item<double>() > 0.0;
}

std::unique_ptr<Communicator> Communicator::create(const DistEnvironment& env,
                                                   const std::string& backend,
                                                   const torch::Device& device,
                                                   std::chrono::seconds timeout) {
  if (env.world_size == 1) return std::make_unique<SingleProcess>();
  const std::string chosen = backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : backend;
  if (chosen == "nccl" && !device.is_cuda()) {
    throw Error({"NCCL needs CUDA tensors", "dist.backend", "gloo on CPU",
                 "nccl with device " + device.str(), "set dist.backend: gloo (or auto)"});
  }
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(env.master_port);
  // Under torchrun's agent store every rank, rank 0 included, is a client.
  store_options.isServer = env.rank == 0 && !env.agent_store;
  store_options.numWorkers =
      env.agent_store ? std::nullopt : std::optional<std::size_t>(env.world_size);
  store_options.waitWorkers = !env.agent_store;
  store_options.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
  } catch (const std::exception& e) {
    throw Error({"rendezvous failed",
                 env.master_addr + ":" + std::to_string(env.master_port) + " (" + env.source + ")",
                 "all " + std::to_string(env.world_size) + " ranks to reach the store within " +
                     std::to_string(timeout.count()) + " s",
                 e.what(), "check MASTER_ADDR/MASTER_PORT and that every rank was started"});
  }
  // Our own key space, fresh per restart attempt.
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
      "/dde/attempt_" + std::to_string(env.restart_count), store);
  const auto rank = static_cast<int>(env.rank);
  const auto size = static_cast<int>(env.world_size);
  c10::intrusive_ptr<c10d::Backend> group;
  if (chosen == "gloo") {
    auto options = c10d::ProcessGroupGloo::Options::create(
        std::chrono::duration_cast<std::chrono::milliseconds>(timeout));
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    options->devices.push_back(ifname != nullptr
                                   ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                   : c10d::ProcessGroupGloo::createDefaultDevice());
    group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
  } else if (chosen == "nccl") {
#ifdef DDE_WITH_NCCL
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::duration_cast<std::chrono::milliseconds>(timeout);
    group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
#else
    throw Error({"this build has no NCCL", "dist.backend", "gloo", "nccl",
                 "rebuild with the CUDA toolkit present"});
#endif
  } else {
    throw Error({"unknown backend", "dist.backend", "auto, gloo or nccl", chosen, ""});
  }
  log::info("dist: rank {}/{} (local {}) via {} at {}:{}, backend {}", env.rank, env.world_size,
            env.local_rank, env.source, env.master_addr, env.master_port, chosen);
  return std::make_unique<ProcessGroupCommunicator>(group, chosen, env.rank, env.world_size,
                                                    timeout);
}

}  // namespace dde::dist
