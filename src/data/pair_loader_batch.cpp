// Batching: next() takes the workers' samples in the order of the sequence (skipping bad
// pairs) and collates them into a PairBatch.
#include <algorithm>
#include <chrono>
#include <exception>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "dde/data/pair_loader.hpp"
#include "dde/data/shard_index.hpp"
#include "pair_loader_impl.hpp"

namespace dde::data {
namespace {

// torch::stack, into page-locked memory when `pin`: the trainer's non-blocking copy to the GPU
// then goes by DMA without a staging copy or a host wait.
torch::Tensor collate_pinned(const std::vector<torch::Tensor>& samples, bool pin) {
  if (!pin) return torch::stack(samples);
  std::vector<int64_t> shape = samples.front().sizes().vec();
  shape.insert(shape.begin(), static_cast<int64_t>(samples.size()));
  torch::Tensor out = torch::empty(
      shape, torch::TensorOptions().dtype(samples.front().dtype()).pinned_memory(true));
  return torch::stack_out(out, samples, 0);
}

// The [B, 2] geometry tensors and pair ids of `samples`.
void fill_pair_geometry(PairBatch& out,
                        const std::vector<pair_loader_detail::PairSample>& samples) {
  const auto batch = static_cast<int64_t>(samples.size());
  out.caption_dropped = torch::empty({batch}, torch::kBool);
  out.winner_original_hw = torch::empty({batch, 2}, torch::kInt64);
  out.winner_crop_tl = torch::empty({batch, 2}, torch::kInt64);
  out.loser_original_hw = torch::empty({batch, 2}, torch::kInt64);
  out.loser_crop_tl = torch::empty({batch, 2}, torch::kInt64);
  out.pair_ids = torch::empty({batch}, torch::kInt64);
  auto pair_ids = out.pair_ids.accessor<int64_t, 1>();
  auto dropped = out.caption_dropped.accessor<bool, 1>();
  auto winner_hw = out.winner_original_hw.accessor<int64_t, 2>();
  auto winner_tl = out.winner_crop_tl.accessor<int64_t, 2>();
  auto loser_hw = out.loser_original_hw.accessor<int64_t, 2>();
  auto loser_tl = out.loser_crop_tl.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    const pair_loader_detail::PairSample& s = samples[static_cast<size_t>(b)];
    pair_ids[b] = (s.epoch << 32) | s.global_index;
    dropped[b] = s.caption_dropped;
    winner_hw[b][0] = s.winner.original_h;
    winner_hw[b][1] = s.winner.original_w;
    winner_tl[b][0] = s.winner.crop_top;
    winner_tl[b][1] = s.winner.crop_left;
    loser_hw[b][0] = s.loser.original_h;
    loser_hw[b][1] = s.loser.original_w;
    loser_tl[b][0] = s.loser.crop_top;
    loser_tl[b][1] = s.loser.crop_left;
  }
}

}  // namespace

PairBatch PairLoader::next() {
  Impl& d = *impl_;
  if (d.failure) {
    std::rethrow_exception(d.failure);
  }
  std::vector<Impl::PairSample> samples;
  try {
    samples = d.take_samples();
  } catch (...) {
    d.failure = std::current_exception();
    throw;
  }
  return d.assemble(samples);
}

// The next batch_size good samples in sequence order; the bad ones between are skipped.
std::vector<PairLoader::Impl::PairSample> PairLoader::Impl::take_samples() {
  const int64_t batch = options.batch_size;
  std::vector<PairSample> samples;
  samples.reserve(static_cast<size_t>(batch));
  std::unique_lock<std::mutex> lock(mutex);
  int64_t skipped_in_row = 0;
  while (static_cast<int64_t>(samples.size()) < batch) {
    PairSample sample = take_sample(lock);
    if (sample.error) {
      std::rethrow_exception(sample.error);
    }
    if (sample.bad) {
      skip_bad(sample, ++skipped_in_row);
      continue;
    }
    skipped_in_row = 0;
    samples.push_back(std::move(sample));
  }
  count_returned(samples);
  return samples;
}

// Waits for the sample at the next position (timing the wait); rethrows the sequencer's error
// once it will produce no more.
PairLoader::Impl::PairSample PairLoader::Impl::take_sample(std::unique_lock<std::mutex>& lock) {
  const int64_t pos = consumed;
  const auto ready = [&] { return done.count(pos) > 0 || (sequencer_error && produced <= pos); };
  if (!ready()) {
    const auto begin = std::chrono::steady_clock::now();
    consumer_cv.wait(lock, ready);
    wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  }
  const auto it = done.find(pos);
  if (it == done.end()) {
    std::rethrow_exception(sequencer_error);
  }
  PairSample sample = std::move(it->second);
  done.erase(it);
  ++consumed;
  sequencer_cv.notify_one();
  return sample;
}

PairBatch PairLoader::Impl::assemble(std::vector<PairSample>& samples) const {
  const auto batch = static_cast<int64_t>(samples.size());
  PairBatch out;
  fill_pair_geometry(out, samples);
  std::vector<torch::Tensor> winners, losers, texts, pooled;
  for (const TokenizerInfo& tokenizer : index.tokenizers) {
    out.input_ids.push_back(torch::empty({batch, tokenizer.max_length}, torch::kInt64));
  }
  for (int64_t b = 0; b < batch; ++b) {
    PairSample& s = samples[static_cast<size_t>(b)];
    winners.push_back(cache ? s.winner_moments : s.winner.pixels);
    losers.push_back(cache ? s.loser_moments : s.loser.pixels);
    if (cache) texts.push_back(s.text);
    if (s.pooled.defined()) pooled.push_back(s.pooled);
    const std::vector<std::vector<int64_t>>& ids = s.input_ids ? *s.input_ids : s.record_ids;
    for (size_t t = 0; t < out.input_ids.size(); ++t) {
      std::copy(ids[t].begin(), ids[t].end(), out.input_ids[t][b].data_ptr<int64_t>());
    }
    out.keys.push_back(std::move(s.key));
    out.captions.push_back(std::move(s.caption));
  }
  const bool pin = options.pin_memory;
  (cache ? out.winner_moments : out.winner) = collate_pinned(winners, pin);
  (cache ? out.loser_moments : out.loser) = collate_pinned(losers, pin);
  if (cache) out.text_hidden = collate_pinned(texts, pin);
  if (!pooled.empty()) out.text_pooled = collate_pinned(pooled, pin);
  return out;
}

}  // namespace dde::data
