// Position and state: where the stream stands after the batches next() returned, the bad
// pairs it skipped, and the exact resume of load_state (pair_loader.hpp).
#include <fmt/format.h>

#include <mutex>
#include <utility>
#include <vector>

#include "dde/data/pair_loader.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"
#include "pair_loader_impl.hpp"

namespace dde::data {

// The position after `sample`: its successor in the epoch, or the start of the next epoch.
PairLoaderState PairLoader::Impl::position_after(const PairSample& sample) const {
  return sample.local_index + 1 == share ? PairLoaderState{sample.epoch + 1, 0, 0}
                                         : PairLoaderState{sample.epoch, sample.local_index + 1, 0};
}

// A bad pair: its place in the order is consumed, so a resume skips it again. Called with the
// mutex held; `skipped_in_row` counts this one.
void PairLoader::Impl::skip_bad(PairSample& sample, int64_t skipped_in_row) {
  position = position_after(sample);
  ++counters.bad_pairs;
  log::warn("data: skipped bad pair ({}): {}", sample.bad->reason, sample.bad->message);
  bad_pairs.push_back(std::move(*sample.bad));
  if (skipped_in_row >= share) {
    throw Error({"every pair of an epoch is bad", options.index_path,
                 fmt::format("at most {} bad pairs in a row (this rank's epoch)", share),
                 std::to_string(skipped_in_row),
                 "the data cannot be trained on: check the export (see the skipped pairs "
                 "in the log)"});
  }
}

// The counters and the position after a batch of `samples`. Called with the mutex held.
void PairLoader::Impl::count_returned(const std::vector<PairSample>& samples) {
  for (const PairSample& sample : samples) {
    if (sample.epoch > last_counted_epoch) {
      counters.ties_skipped += epoch_ties;
      last_counted_epoch = sample.epoch;
    }
  }
  counters.pairs_yielded += static_cast<int64_t>(samples.size());
  position = position_after(samples.back());
}

PairLoaderState PairLoader::state() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  PairLoaderState state = impl_->position;
  state.bad_pairs = impl_->counters.bad_pairs;
  return state;
}

std::vector<BadPair> PairLoader::take_bad_pairs() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  std::vector<BadPair> out;
  out.swap(impl_->bad_pairs);
  return out;
}

void PairLoader::load_state(const PairLoaderState& state) {
  Impl& d = *impl_;
  if (state.epoch < 0 || state.pairs_consumed < 0 || state.pairs_consumed > d.share ||
      state.bad_pairs < 0) {
    throw Error(
        {"bad data loader state", "PairLoaderState",
         fmt::format("epoch >= 0 and pairs_consumed in [0, {}] (pairs per epoch of this rank)",
                     d.share),
         fmt::format("epoch={} pairs_consumed={} bad_pairs={}", state.epoch, state.pairs_consumed,
                     state.bad_pairs),
         "resume with the shards, seed, keep_ties and world size of the run that saved it"});
  }
  const PairLoaderState from =
      state.pairs_consumed == d.share ? PairLoaderState{state.epoch + 1, 0, 0} : state;
  d.stop();
  {
    std::lock_guard<std::mutex> lock(d.mutex);
    d.position = from;
    d.last_counted_epoch = from.epoch - 1;
    d.failure = nullptr;
    d.counters.bad_pairs = state.bad_pairs;
    d.bad_pairs.clear();
  }
  d.start(from);
}

double PairLoader::worker_cpu_seconds() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->worker_cpu_seconds;
}

double PairLoader::wait_seconds() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->wait_seconds;
}

PairLoader::Counters PairLoader::counters() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->counters;
}

int64_t PairLoader::pairs_per_epoch() const { return impl_->share; }

}  // namespace dde::data
