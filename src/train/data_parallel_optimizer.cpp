#include "dde/train/data_parallel_optimizer.hpp"

#include <algorithm>
#include <cmath>

#include "dde/dist/shard_layout.hpp"
#include "dde/train/adamw.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::train {
namespace {

std::vector<torch::Tensor> defined_grads(const NamedTensors& params, size_t begin, size_t end) {
  std::vector<torch::Tensor> grads;
  for (size_t i = begin; i < end; ++i) {
    if (params[i].second.grad().defined()) grads.push_back(params[i].second.grad());
  }
  return grads;
}

// Every rank holds the whole optimizer: all-reduce, clip, update (the unsharded path).
class Replicated final : public DataParallelOptimizer {
 public:
  Replicated(NamedTensors params, const config::OptimConfig& optim, dist::Communicator& comm,
             int64_t bucket_bytes)
      : params_(params),
        optimizer_(make_optimizer(optim, std::move(params))),
        comm_(comm),
        bucket_bytes_(bucket_bytes) {}

  void reduce_gradients() override {
    std::vector<torch::Tensor> grads = defined_grads(params_, 0, params_.size());
    comm_.all_reduce_sum(grads, bucket_bytes_);
  }
  double clip_grad_norm(double max_norm) override {
    std::vector<torch::Tensor> tensors;
    for (const auto& [name, p] : params_) tensors.push_back(p);
    return train::clip_grad_norm(tensors, max_norm);
  }
  void step(double lr) override { optimizer_->step(lr); }
  void zero_grad() override { optimizer_->zero_grad(); }
  NamedTensors state() const override { return optimizer_->state(); }
  void load_state(const NamedTensors& state, const std::string& where) override {
    optimizer_->load_state(state, where);
  }
  bool sharded() const override { return false; }

 private:
  NamedTensors params_;
  std::unique_ptr<Optimizer> optimizer_;
  dist::Communicator& comm_;
  int64_t bucket_bytes_;
};

// ZeRO stage 1 over whole parameters (dist/shard_layout.hpp). Gradients and weights move in
// buckets of about `bucket_bytes` per rank: each is a reduce-scatter (or all-gather) of
// [world x chunk] elements, chunk of every rank's segment at a time, so no buffer the size of the
// model is allocated per step; the summed shard of this rank's gradients is allocated once.
class Sharded final : public DataParallelOptimizer {
 public:
  Sharded(NamedTensors params, const config::OptimConfig& optim, dist::Communicator& comm,
          int64_t bucket_bytes)
      : params_(std::move(params)), comm_(comm) {
    std::vector<int64_t> numels;
    for (const auto& [name, p] : params_) {
      if (p.scalar_type() != params_.front().second.scalar_type() ||
          p.device() != params_.front().second.device()) {
        throw Error({"optimizer sharding needs one dtype and device for all parameters",
                     "dist.shard_optimizer: " + name,
                     c10::str(params_.front().second.scalar_type(), " on ",
                              params_.front().second.device()),
                     c10::str(p.scalar_type(), " on ", p.device()),
                     "set dist.shard_optimizer: false"});
      }
      numels.push_back(p.numel());
    }
    layout_ = dist::partition_parameters(numels, comm_.world_size());
    const auto r = static_cast<size_t>(comm_.rank());
    begin_ = static_cast<size_t>(layout_.first[r]);
    end_ = static_cast<size_t>(layout_.end[r]);
    const NamedTensors owned(params_.begin() + static_cast<std::ptrdiff_t>(begin_),
                             params_.begin() + static_cast<std::ptrdiff_t>(end_));
    optimizer_ = make_optimizer(optim, owned);
    if (!params_.empty()) {
      const int64_t element = params_.front().second.element_size();
      chunk_ = std::clamp<int64_t>(bucket_bytes / (element * layout_.world_size), 1,
                                   std::max<int64_t>(1, layout_.segment));
    }
    log::info(
        "optimizer state sharded over {} ranks: rank {} updates parameters [{}, {}) of {}; "
        "buckets of {} elements per rank",
        comm_.world_size(), comm_.rank(), begin_, end_, params_.size(), chunk_);
  }

  void reduce_gradients() override {
    if (params_.empty()) return;
    torch::NoGradGuard no_grad;
    const int64_t world = layout_.world_size;
    if (!shard_.defined()) shard_ = torch::zeros({layout_.segment}, options());
    has_grad_.assign(params_.size(), false);
    for (size_t i = 0; i < params_.size(); ++i) has_grad_[i] = params_[i].second.grad().defined();
    for (int64_t c0 = 0; c0 < layout_.segment; c0 += chunk_) {
      const int64_t n = std::min(chunk_, layout_.segment - c0);
      // bucket [world x n]: rank r's gradients in [c0, c0 + n) of its segment, zero padding.
      torch::Tensor bucket = torch::zeros({world * n}, options());
      for (int64_t r = 0; r < world; ++r) {
        for_each_piece(r, c0, c0 + n, [&](size_t i, int64_t lo, int64_t hi) {
          if (!has_grad_[i]) return;
          bucket.slice(0, r * n + lo - c0, r * n + hi - c0)
              .copy_(flat_view(params_[i].second.grad(), i, lo, hi));
        });
      }
      shard_.slice(0, c0, c0 + n).copy_(comm_.reduce_scatter_sum(bucket));
      release_consumed_grads(c0 + n);
    }
    for (size_t i = begin_; i < end_; ++i) {
      torch::Tensor& p = params_[i].second;
      if (has_grad_[i]) p.mutable_grad() = own_slice(shard_, i).view(p.sizes());
    }
  }

  double clip_grad_norm(double max_norm) override {
    const std::vector<torch::Tensor> grads = defined_grads(params_, begin_, end_);
    // Sum of squares of this rank's gradients, summed over ranks: the global norm squared.
    std::vector<torch::Tensor> reduced{grad_norm_squared(grads, options())};
    comm_.all_reduce_sum(reduced, /*bucket_bytes=*/8);
    const double total_norm = std::sqrt(reduced[0].item<double>());
    scale_to_max_norm(grads, total_norm, max_norm);
    return total_norm;
  }

  void step(double lr) override {
    optimizer_->step(lr);
    if (params_.empty()) return;
    torch::NoGradGuard no_grad;
    const int64_t world = layout_.world_size;
    const int64_t me = comm_.rank();
    for (int64_t c0 = 0; c0 < layout_.segment; c0 += chunk_) {
      const int64_t n = std::min(chunk_, layout_.segment - c0);
      torch::Tensor mine = torch::zeros({n}, options());
      for_each_piece(me, c0, c0 + n, [&](size_t i, int64_t lo, int64_t hi) {
        mine.slice(0, lo - c0, hi - c0).copy_(flat_view(params_[i].second, i, lo, hi));
      });
      const torch::Tensor all = comm_.all_gather_flat(mine);  // [world x n]
      for (int64_t r = 0; r < world; ++r) {
        if (r == me) continue;
        for_each_piece(r, c0, c0 + n, [&](size_t i, int64_t lo, int64_t hi) {
          flat_view(params_[i].second, i, lo, hi)
              .copy_(all.slice(0, r * n + lo - c0, r * n + hi - c0));
        });
      }
    }
  }

  void zero_grad() override {
    optimizer_->zero_grad();
    drop_grads(params_);  // the full gradients of the parameters this rank does not own
  }
  NamedTensors state() const override { return optimizer_->state(); }
  void load_state(const NamedTensors& state, const std::string& where) override {
    optimizer_->load_state(state, where);
  }
  bool sharded() const override { return true; }

 private:
  torch::TensorOptions options() const {
    const torch::Tensor& p = params_.front().second;
    return torch::TensorOptions().dtype(p.scalar_type()).device(p.device());
  }
  // Parameter i's elements inside a [segment] buffer of its owner.
  torch::Tensor own_slice(const torch::Tensor& segment, size_t i) const {
    return segment.slice(0, layout_.offset[i], layout_.offset[i] + params_[i].second.numel());
  }
  // f(i, lo, hi) for every parameter i of `rank` with elements at [lo, hi) of the rank's segment
  // inside [c0, c1).
  template <typename F>
  void for_each_piece(int64_t rank, int64_t c0, int64_t c1, F&& f) const {
    const auto r = static_cast<size_t>(rank);
    for (auto i = static_cast<size_t>(layout_.first[r]); i < static_cast<size_t>(layout_.end[r]);
         ++i) {
      const int64_t lo = std::max(c0, layout_.offset[i]);
      const int64_t hi = std::min(c1, layout_.offset[i] + params_[i].second.numel());
      if (lo < hi) f(i, lo, hi);
    }
  }
  // Elements [lo, hi) (segment coordinates) of parameter i's tensor `t`, as a writable view.
  torch::Tensor flat_view(const torch::Tensor& t, size_t i, int64_t lo, int64_t hi) const {
    return t.view({-1}).slice(0, lo - layout_.offset[i], hi - layout_.offset[i]);
  }
  // Gradients of other ranks' parameters lying wholly below `done` (segment coordinates) were
  // reduced: drop them, so the full set of gradients is not held beside the shard.
  void release_consumed_grads(int64_t done) {
    for (int64_t r = 0; r < layout_.world_size; ++r) {
      if (r == comm_.rank()) continue;
      const auto ru = static_cast<size_t>(r);
      for (auto i = static_cast<size_t>(layout_.first[ru]);
           i < static_cast<size_t>(layout_.end[ru]); ++i) {
        torch::Tensor& p = params_[i].second;
        if (layout_.offset[i] + p.numel() <= done && p.grad().defined()) {
          p.mutable_grad() = torch::Tensor();
        }
      }
    }
  }

  NamedTensors params_;
  dist::Communicator& comm_;
  dist::ShardLayout layout_;
  size_t begin_ = 0, end_ = 0;  // this rank's parameters
  std::unique_ptr<Optimizer> optimizer_;
  std::vector<bool> has_grad_;
  int64_t chunk_ = 1;    // elements per rank in one bucket
  torch::Tensor shard_;  // [segment]: the summed gradients of this rank's parameters (kept)
};

}  // namespace

std::unique_ptr<DataParallelOptimizer> DataParallelOptimizer::create(
    NamedTensors params, const config::OptimConfig& optim, bool shard, dist::Communicator& comm,
    int64_t bucket_bytes) {
  if (shard) return std::make_unique<Sharded>(std::move(params), optim, comm, bucket_bytes);
  return std::make_unique<Replicated>(std::move(params), optim, comm, bucket_bytes);
}

}  // namespace dde::train
