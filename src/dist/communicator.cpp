#include "dde/dist/communicator.hpp"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DDE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <utility>

#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::dist {
namespace {

// A world of one process without a process group.
class SingleProcess final : public Communicator {
 public:
  explicit SingleProcess(const torch::Device& device) : Communicator(device) {}
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return 1; }
  std::string backend() const override { return "none"; }

 private:
  void do_barrier(std::optional<std::chrono::seconds> /*timeout*/) override {}
  void do_broadcast(std::vector<torch::Tensor>& /*tensors*/, int64_t /*root*/) override {}
  void do_all_reduce_sum(std::vector<torch::Tensor>& /*tensors*/,
                         int64_t /*bucket_bytes*/) override {}
  torch::Tensor do_all_gather(const torch::Tensor& tensor) override { return tensor; }
  torch::Tensor do_reduce_scatter_sum(const torch::Tensor& flat) override { return flat; }
  torch::Tensor do_all_gather_flat(const torch::Tensor& shard) override { return shard; }
};

class ProcessGroupCommunicator final : public Communicator {
 public:
  ProcessGroupCommunicator(c10::intrusive_ptr<c10d::Backend> group, std::string backend,
                           const torch::Device& device, int64_t rank, int64_t world_size,
                           std::chrono::seconds timeout)
      : Communicator(device),
        group_(std::move(group)),
        backend_(std::move(backend)),
        rank_(rank),
        world_size_(world_size),
        timeout_(timeout),
        stage_through_host_(backend_ == "gloo" && !device.is_cpu() && !device.is_cuda()) {}

  int64_t rank() const override { return rank_; }
  int64_t world_size() const override { return world_size_; }
  std::string backend() const override { return backend_; }

 private:
  void do_barrier(std::optional<std::chrono::seconds> timeout) override {
    const std::chrono::seconds limit = timeout.value_or(timeout_);
    if (backend_ == "nccl") {
      // NCCL's barrier takes no timeout of its own: a one-element all-reduce with the wait's.
      c10d::AllreduceOptions options;
      options.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(limit);
      std::vector<torch::Tensor> one{torch::zeros({1}, torch::TensorOptions().device(device()))};
      run(
          "barrier", [&] { return group_->allreduce(one, options); }, limit);
      return;
    }
    c10d::BarrierOptions options;
    options.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(limit);
    run(
        "barrier", [&] { return group_->barrier(options); }, limit);
  }
  void do_broadcast(std::vector<torch::Tensor>& tensors, int64_t root) override {
    for (torch::Tensor& t : tensors) {
      std::vector<torch::Tensor> one{to_wire(t)};
      c10d::BroadcastOptions options;
      options.rootRank = root;
      run("broadcast", [&] { return group_->broadcast(one, options); });
      if (stage_through_host_) t.copy_(one[0]);
    }
  }

  void do_all_reduce_sum(std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) override {
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
      std::vector<torch::Tensor> bucket{to_wire(torch::cat(flat_parts))};
      run("all_reduce", [&] { return group_->allreduce(bucket); });
      int64_t offset = 0;
      for (size_t i = begin; i < end; ++i) {
        const int64_t n = tensors[i].numel();
        tensors[i].copy_(bucket[0].slice(0, offset, offset + n).view_as(tensors[i]));
        offset += n;
      }
      begin = end;
    }
  }

  torch::Tensor do_all_gather(const torch::Tensor& tensor) override {
    std::vector<torch::Tensor> input{to_wire(tensor.contiguous())};
    std::vector<std::vector<torch::Tensor>> outputs(1);
    for (int64_t r = 0; r < world_size_; ++r) outputs[0].push_back(torch::empty_like(input[0]));
    run("all_gather", [&] { return group_->allgather(outputs, input); });
    return from_wire(torch::cat(outputs[0], 0));
  }
  torch::Tensor do_reduce_scatter_sum(const torch::Tensor& flat) override {
    if (flat.dim() != 1 || flat.numel() % world_size_ != 0) {
      throw Error({"bad input to reduce_scatter", "rank " + std::to_string(rank_),
                   "a flat tensor whose size is a multiple of the world size " +
                       std::to_string(world_size_),
                   c10::str(flat.sizes()), "this is a bug in the caller"});
    }
    torch::Tensor input = to_wire(flat.contiguous());
    torch::Tensor output = torch::empty({flat.numel() / world_size_}, input.options());
    c10d::ReduceScatterOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    run("reduce_scatter", [&] { return group_->_reduce_scatter_base(output, input, options); });
    return from_wire(output);
  }

  torch::Tensor do_all_gather_flat(const torch::Tensor& shard) override {
    torch::Tensor input = to_wire(shard.contiguous());
    torch::Tensor output = torch::empty({shard.numel() * world_size_}, input.options());
    run("all_gather", [&] { return group_->_allgather_base(output, input); });
    return from_wire(output);
  }

  // Issues a collective and waits for it; whatever c10d throws (c10::Error, DistBackendError,
  // a Gloo timeout) becomes a dde::Error. NCCL's wait() only makes the current CUDA stream wait
  // for NCCL's: with a timeout it would block the host until the kernel ends, so NCCL gets none
  // (its watchdog enforces dist.timeout_s). Gloo runs on the host and waits with the timeout.
  template <typename Issue>
  void run(const char* what, Issue&& issue,
           std::optional<std::chrono::seconds> timeout = std::nullopt) const {
    const std::chrono::seconds limit = timeout.value_or(timeout_);
    try {
      const c10::intrusive_ptr<c10d::Work> work = issue();
      if (backend_ == "nccl") {
        work->wait();
      } else {
        work->wait(std::chrono::duration_cast<std::chrono::milliseconds>(limit));
      }
    } catch (const std::exception& e) {
      throw Error({std::string("collective failed: ") + what,
                   "rank " + std::to_string(rank_) + " of " + std::to_string(world_size_) + " (" +
                       backend_ + " on " + device().str() + ")",
                   "every rank alive and taking part (waiting at most " +
                       std::to_string(limit.count()) + " s: dist.timeout_s" +
                       (timeout ? ", checkpoint.timeout_s for checkpoint writes" : "") + ")",
                   e.what(),
                   "a peer died or hung, or the backend failed: check every rank's log (NCCL: "
                   "rerun with NCCL_DEBUG=INFO); resume with --resume"});
    }
  }

  // Gloo moves host (and CUDA) tensors only: another accelerator's (a PrivateUse1 backend, the
  // tests' fake device) cross through host copies. The device check before them stays strict.
  torch::Tensor to_wire(const torch::Tensor& t) const {
    return stage_through_host_ ? t.to(torch::kCPU) : t;
  }
  torch::Tensor from_wire(const torch::Tensor& t) const {
    return stage_through_host_ ? t.to(device()) : t;
  }

  c10::intrusive_ptr<c10d::Backend> group_;
  std::string backend_;
  int64_t rank_;
  int64_t world_size_;
  std::chrono::seconds timeout_;
  bool stage_through_host_;
};

c10::intrusive_ptr<c10d::Store> connect_store(const DistEnvironment& env,
                                              std::chrono::seconds timeout) {
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
  return c10::make_intrusive<c10d::PrefixStore>("/dde/attempt_" + std::to_string(env.restart_count),
                                                store);
}

#ifdef DDE_WITH_NCCL
// NCCL's error handling, set explicitly (a variable the user exported wins; README "Distributed
// training"): on a collective error or a timeout, the watchdog aborts the communicators and the
// error is raised by the next wait or synchronisation, where run() turns it into our message,
// instead of tearing the process down (mode 1, TearDown) with a watchdog abort. No flight-recorder
// dump on timeout (it writes files next to every rank's working directory).
void set_nccl_error_handling() {
  for (const auto& [name, value] :
       {std::pair<const char*, const char*>{"TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"},
        {"TORCH_NCCL_BLOCKING_WAIT", "0"},
        {"TORCH_NCCL_DUMP_ON_TIMEOUT", "0"}}) {
    setenv(name, value, /*overwrite=*/0);
    log::info("dist: {}={}", name, std::getenv(name));
  }
}
#endif

c10::intrusive_ptr<c10d::Backend> make_group(const std::string& chosen,
                                             const c10::intrusive_ptr<c10d::Store>& store,
                                             const DistEnvironment& env,
                                             const torch::Device& device,
                                             std::chrono::seconds timeout) {
  const auto rank = static_cast<int>(env.rank);
  const auto size = static_cast<int>(env.world_size);
  if (chosen == "gloo") {
    auto options = c10d::ProcessGroupGloo::Options::create(
        std::chrono::duration_cast<std::chrono::milliseconds>(timeout));
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    options->devices.push_back(ifname != nullptr
                                   ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                   : c10d::ProcessGroupGloo::createDefaultDevice());
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
  }
#ifdef DDE_WITH_NCCL
  set_nccl_error_handling();
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = std::chrono::duration_cast<std::chrono::milliseconds>(timeout);
  auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
  // The rank's one GPU: communicators are created for it, not guessed from the rank.
  group->setBoundDeviceId(device);
  return group;
#else
  (void)device;
  throw Error({"this build has no NCCL", "dist.backend", "gloo", "nccl",
               "rebuild with the CUDA toolkit and the nvidia-nccl wheel present"});
#endif
}

std::string choose_backend(const std::string& backend, const torch::Device& device) {
  std::string chosen = backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : backend;
  if (chosen != "gloo" && chosen != "nccl") {
    throw Error({"unknown backend", "dist.backend", "auto, gloo or nccl", chosen, ""});
  }
  if (chosen == "nccl" && !device.is_cuda()) {
    throw Error({"NCCL needs CUDA tensors", "dist.backend", "gloo on CPU",
                 "nccl with device " + device.str(), "set dist.backend: gloo (or auto)"});
  }
  return chosen;
}

}  // namespace

void Communicator::check_on_device(const torch::Tensor& tensor, const char* collective,
                                   size_t index) const {
  if (tensor.defined() && tensor.device() == device_) return;
  throw Error({"tensor on the wrong device for a collective",
               std::string(collective) + ": tensor " + std::to_string(index) + " (" + backend() +
                   " communicator)",
               "a tensor on " + device_.str() + ", the communicator's device",
               tensor.defined() ? "a tensor on " + tensor.device().str() : "an undefined tensor",
               "keep it on the training device (comm.device()) or move it there first"});
}

void Communicator::broadcast(std::vector<torch::Tensor>& tensors, int64_t root) {
  for (size_t i = 0; i < tensors.size(); ++i) check_on_device(tensors[i], "broadcast", i);
  do_broadcast(tensors, root);
}

void Communicator::all_reduce_sum(std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) {
  for (size_t i = 0; i < tensors.size(); ++i) check_on_device(tensors[i], "all_reduce_sum", i);
  do_all_reduce_sum(tensors, bucket_bytes);
}

torch::Tensor Communicator::all_gather(const torch::Tensor& tensor) {
  check_on_device(tensor, "all_gather", 0);
  return do_all_gather(tensor);
}

torch::Tensor Communicator::reduce_scatter_sum(const torch::Tensor& flat) {
  check_on_device(flat, "reduce_scatter_sum", 0);
  return do_reduce_scatter_sum(flat);
}

torch::Tensor Communicator::all_gather_flat(const torch::Tensor& shard) {
  check_on_device(shard, "all_gather_flat", 0);
  return do_all_gather_flat(shard);
}

bool Communicator::any(bool flag) {
  if (backend() == "none") return flag;
  std::vector<torch::Tensor> t{
      torch::full({1}, flag ? 1.0 : 0.0, torch::dtype(torch::kFloat64).device(device_))};
  all_reduce_sum(t, 8);
  return t[0].item<double>() > 0.0;
}

std::unique_ptr<Communicator> Communicator::create(const DistEnvironment& env,
                                                   const std::string& backend,
                                                   const torch::Device& device,
                                                   std::chrono::seconds timeout,
                                                   bool force_process_group) {
  if (device.is_cuda() && !device.has_index()) {
    throw Error({"communicator device without an index", "Communicator::create",
                 "cuda:N (the rank's own GPU)", device.str(),
                 "select the device from LOCAL_RANK first (dist::select_device)"});
  }
  if (env.world_size == 1 && !force_process_group) return std::make_unique<SingleProcess>(device);
  const std::string chosen = choose_backend(backend, device);
  DistEnvironment store_env = env;
  // No launcher (a forced world of one): a free port, so concurrent single runs never collide.
  if (env.source == "single") store_env.master_port = 0;
  const c10::intrusive_ptr<c10d::Store> store = connect_store(store_env, timeout);
  c10::intrusive_ptr<c10d::Backend> group;
  try {
    group = make_group(chosen, store, env, device, timeout);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error({"process group failed to start", "dist.backend " + chosen + " on " + device.str(),
                 "a working " + chosen + " process group", e.what(),
                 "check the launcher's environment and the devices each rank sees"});
  }
  log::info("dist: rank {}/{} (local {}) via {} at {}:{}, backend {} on {}", env.rank,
            env.world_size, env.local_rank, env.source, store_env.master_addr,
            store_env.master_port == 0 ? std::string("(free port)")
                                       : std::to_string(store_env.master_port),
            chosen, device.str());
  return std::make_unique<ProcessGroupCommunicator>(group, chosen, device, env.rank, env.world_size,
                                                    timeout);
}

}  // namespace dde::dist
