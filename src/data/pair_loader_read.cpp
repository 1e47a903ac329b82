// Reading: the ordering of pair_loader.hpp. The shards in a seeded order, their pairs through
// one seeded shuffle buffer, pair i of an epoch to rank i % world_size; only the KEY.json
// members are read, the images are spans for the workers.
#include <fmt/format.h>

#include <algorithm>
#include <mutex>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "dde/data/data_error.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"
#include "pair_loader_impl.hpp"

namespace dde::data {
namespace {

// The epoch's shard order: a seeded Fisher-Yates shuffle of 0..shards-1.
std::vector<size_t> shuffled_shard_order(uint64_t seed, uint64_t epoch, size_t shards) {
  std::vector<size_t> order(shards);
  std::iota(order.begin(), order.end(), 0);
  pair_loader_detail::Rng shard_rng(
      pair_loader_detail::hash_seed({seed, epoch, pair_loader_detail::kShardOrder}));
  for (size_t i = order.size(); i > 1; --i) {
    std::swap(order[i - 1], order[shard_rng.below(i)]);
  }
  return order;
}

}  // namespace

// One epoch of the ordering, from this rank's pair `skip` on. Each step returns false once the
// loader stops.
class PairLoader::Impl::EpochSequencer {
 public:
  EpochSequencer(Impl& loader, int64_t epoch, int64_t skip)
      : d_(loader),
        epoch_(epoch),
        skip_(skip),
        limit_(loader.share * loader.options.world_size),
        capacity_(static_cast<size_t>(
            std::min<int64_t>(loader.options.shuffle_buffer, loader.epoch_pairs))),
        buffer_rng_(
            pair_loader_detail::hash_seed({loader.options.seed, static_cast<uint64_t>(epoch),
                                           pair_loader_detail::kShuffleBuffer})) {
    buffer_.reserve(capacity_);
  }

  bool run() {
    for (const size_t s : shuffled_shard_order(d_.options.seed, static_cast<uint64_t>(epoch_),
                                               d_.index.shards.size())) {
      if (!read_shard(s)) return false;
    }
    return drain();
  }

 private:
  // The shard's pairs into the buffer; once it is full, each new pair swaps out a random one.
  bool read_shard(size_t s) {
    const ShardInfo& shard = d_.index.shards[s];
    ShardPairReader reader(shard.path, ShardPairReader::Images::kSkip);
    int64_t ties = 0, unreadable = 0;  // unreadable: bad metadata, tie or not unknown
    while (std::optional<PairRecord> record = reader.next()) {
      if (d_.stopping) {
        return false;
      }
      unreadable += record->problem ? 1 : 0;
      if (!record->problem && record->is_tie()) {
        ++ties;
        if (!d_.options.keep_ties) {
          continue;
        }
      }
      if (buffer_.size() < capacity_) {
        buffer_.emplace_back(s, std::move(*record));
        continue;
      }
      ShardPair item(s, std::move(*record));
      std::swap(item, buffer_[buffer_rng_.below(capacity_)]);
      if (!route(std::move(item))) {
        return false;
      }
    }
    if (reader.pairs_read() != shard.pairs || ties > shard.ties || ties + unreadable < shard.ties) {
      throw Error({"shard does not match index.json", shard.path,
                   fmt::format("{} pairs, {} ties (index.json)", shard.pairs, shard.ties),
                   fmt::format("{} pairs, {} ties", reader.pairs_read(), ties), kReexportHint});
    }
    return true;
  }

  // The end of the epoch: the buffer's pairs in a random order.
  bool drain() {
    while (!buffer_.empty()) {
      std::swap(buffer_[buffer_rng_.below(buffer_.size())], buffer_.back());
      ShardPair item = std::move(buffer_.back());
      buffer_.pop_back();
      if (!route(std::move(item))) {
        return false;
      }
    }
    return true;
  }

  // Global pair i goes to rank i % world; the pairs past limit_ and those consumed before a
  // resume are dropped.
  bool route(ShardPair&& item) {
    const int64_t world = d_.options.world_size;
    const int64_t i = global_++;
    if (i >= limit_ || i % world != d_.options.rank || i / world < skip_) {
      return true;
    }
    return d_.emit(PairTask{0, epoch_, i / world, i, item.first, std::move(item.second)});
  }

  Impl& d_;
  const int64_t epoch_, skip_;
  const int64_t limit_;  // global pairs used per epoch
  const size_t capacity_;
  pair_loader_detail::Rng buffer_rng_;
  std::vector<ShardPair> buffer_;
  int64_t global_ = 0;
};

// Emits this rank's pairs from `from` on, forever.
void PairLoader::Impl::run_sequencer(PairLoaderState from) {
  try {
    int64_t skip = from.pairs_consumed;
    for (int64_t epoch = from.epoch;; ++epoch, skip = 0) {
      if (!EpochSequencer(*this, epoch, skip).run()) {
        return;
      }
    }
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      sequencer_error = std::current_exception();
    }
    consumer_cv.notify_all();
  }
}

bool PairLoader::Impl::emit(PairTask task) {
  std::unique_lock<std::mutex> lock(mutex);
  sequencer_cv.wait(lock, [&] { return stopping || produced < consumed + window; });
  if (stopping) {
    return false;
  }
  task.position = produced++;
  tasks.push_back(std::move(task));
  worker_cv.notify_one();
  return true;
}

}  // namespace dde::data
