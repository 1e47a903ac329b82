// Hints for a misspelt name: the closest spelling, or the peers' name for one of our keys.
#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "field_table.hpp"

namespace dde::config::detail {

namespace {

// Levenshtein distance, one row at a time.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) {
    row[j] = j;
  }
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = SIZE_MAX;
  for (const auto& candidate : candidates) {
    const size_t d = edit_distance(word, candidate);
    if (d < best_distance) {
      best = candidate;
      best_distance = d;
    }
  }
  return best;
}

// Names users bring from the peers' scripts (diffusers' train_diffusion_dpo.py, Diffusion-DPO's
// train.py), mapped to ours: an unknown key that is one of them gets this hint, not the closest
// spelling of a key of the same section.
const std::map<std::string, std::string>& peer_synonyms() {
  static const std::map<std::string, std::string> m = {
      {"learning_rate", "optim.lr"},
      {"lr_warmup_steps", "optim.warmup_steps"},
      {"warmup", "optim.warmup_steps"},
      {"lr_scheduler", "optim.schedule (constant, cosine or linear)"},
      {"max_grad_norm", "optim.grad_clip"},
      {"adam_beta1", "optim.beta1"},
      {"adam_beta2", "optim.beta2"},
      {"adam_weight_decay", "optim.weight_decay"},
      {"adam_epsilon", "optim.eps"},
      {"use_adafactor", "optim.name: adafactor"},
      {"beta_dpo", "method.beta (diffusers' beta_dpo has no 1/2 factor: its 2500 is our 5000)"},
      {"max_train_steps", "train.max_steps"},
      {"train_batch_size", "train.micro_batch (per rank; train.global_batch is over all ranks)"},
      {"gradient_accumulation_steps",
       "train.global_batch (accumulation = global_batch / (micro_batch x ranks))"},
      {"mixed_precision", "train.precision (fp32 or bf16)"},
      {"checkpointing_steps", "checkpoint.every"},
      {"checkpoints_total_limit", "checkpoint.keep"},
      {"seed", "run.seed"},
      {"output_dir", "run.output_dir"},
      {"dataloader_num_workers", "data.workers"},
      {"no_hflip", "data.random_flip: false"},
      {"pretrained_model_name_or_path",
       "model.manifest (export the pipeline first: python -m dde_tools.export_models)"},
      {"dataset_name",
       "data.index (export the parquet first: python -m dde_tools.export_pickapic)"},
      {"report_to", "logging.* (metrics.jsonl; TensorBoard: see the README)"},
  };
  return m;
}

}  // namespace dde::config::detail
