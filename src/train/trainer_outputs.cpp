#include <fmt/format.h>

#include <filesystem>
#include <string>
#include <vector>

#include "dde/data/image_tensor.hpp"
#include "dde/dist/bad_pair_rows.hpp"
#include "dde/util/log.hpp"
#include "trainer_impl.hpp"

// What the trainer writes besides checkpoints and step records: per-pair records, bad pairs, and
// the debug dump of a micro-batch.
namespace dde::train {
namespace {
namespace fs = std::filesystem;
}  // namespace

// Everything an independent recomputation needs (tests/e2e/test_forward_parity.py), in
// run.output_dir/debug/; from a cache, the posterior moments in place of the images.
void Trainer::Impl::dump_micro_batch(const data::PairBatch& batch,
                                     const pairs::TrainingDraws& draws,
                                     const pairs::EncodedPairs& encoded,
                                     const objective::PairErrors& errors) const {
  const bool cached = batch.winner_moments.defined();
  const auto image = [&](const torch::Tensor& pixels) {
    return data::to_pm1(pixels, data::pm1_table());  // as the VAE took them
  };
  checkpoint::NamedTensors d{
      {cached ? "winner_moments" : "winner", cached ? batch.winner_moments : image(batch.winner)},
      {cached ? "loser_moments" : "loser", cached ? batch.loser_moments : image(batch.loser)},
      {"pair_ids", batch.pair_ids},
      {"t", draws.t},
      {"eps", draws.eps},
      {"vae_noise", draws.vae_noise},
      {"e_policy_w", errors.policy_w},
      {"e_policy_l", errors.policy_l}};
  for (size_t i = 0; i < batch.input_ids.size(); ++i) {
    d.emplace_back("input_ids_" + std::to_string(i), batch.input_ids[i]);
  }
  if (errors.ref_w.defined()) {
    d.emplace_back("e_ref_w", errors.ref_w);
    d.emplace_back("e_ref_l", errors.ref_l);
  }
  if (manifest.added_cond) {
    d.emplace_back("time_ids_w", encoded.winner_time_ids);
    d.emplace_back("time_ids_l", encoded.loser_time_ids);
  }
  const fs::path dir = fs::path(cfg.run.output_dir) / "debug";
  fs::create_directories(dir);
  for (auto& [name, tensor] : d) tensor = tensor.detach();
  const fs::path file =
      dir / fmt::format("step-{:08d}-rank-{:05d}.safetensors", step + 1, comm->rank());
  checkpoint::save_safetensors(file.string(), d, {{"step", std::to_string(step + 1)}});
  log::info("dumped micro-batch 0 of step {} to {}", step + 1, file.string());
}

// Every rank's skipped pairs of this step to rank 0, one metrics record each. `in_step` is
// the global count (all-reduced), so every rank takes the same branch.
void Trainer::Impl::report_bad_pairs(int64_t total, int64_t in_step,
                                     const std::vector<data::BadPair>& local) {
  if (in_step == 0) return;
  // The rows cross as a device tensor, as every collective's input (NCCL takes no host tensor).
  const torch::Tensor rows =
      comm->all_gather(to_device(dist::bad_pair_rows(local, comm->rank(), in_step)));
  if (!is_main()) return;
  for (const dist::RankedBadPair& b : dist::bad_pairs_from_rows(rows)) {
    ++bad_pairs_by_reason[b.pair.reason];
    metrics->write({{"kind", "bad_pair"},
                    {"step", step + 1},
                    {"rank", b.rank},
                    {"pair_id", b.pair.pair_id},
                    {"reason", b.pair.reason},
                    {"shard", b.pair.shard},
                    {"key", b.pair.key}});
  }
  log::warn("step {}: {} bad pairs skipped ({} in the run, limit data.max_bad_pairs = {})",
            step + 1, in_step, total, cfg.data.max_bad_pairs);
}

void Trainer::Impl::write_pair_records(const torch::Tensor& all_rows) {
  // all_rows: [world * n, kPairColumns], rank r's rows at [r * n, (r + 1) * n).
  const int64_t per_rank = all_rows.size(0) / comm->world_size();
  const torch::Tensor rows = all_rows.contiguous();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    metrics->write(pair_record(rows[i].data_ptr<double>(), step, i / per_rank));
  }
}

}  // namespace dde::train
