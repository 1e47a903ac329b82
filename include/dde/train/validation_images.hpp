// Validation images during training (eval.sample; config.hpp's SampleConfig): at step 0, every
// eval.sample.every steps and at the last step, rank 0 samples a fixed prompt set with the
// current policy (DDIM, classifier-free guidance against the empty caption, image i from the
// noise of seed + i, so the same seeds at every step show progress) and writes
//   run.output_dir/samples/step-NNNNNNNN.png  a grid, four images to a row, in prompt order
//   run.output_dir/samples/prompts.json       the captions and seeds of the grid's cells
// and, with logging.tensorboard, the grid as a TensorBoard image ("samples").
// The step-0 grid is diffusers' DDIM sampling of the base model
// (tests/e2e/test_validation_images.py).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/models/conditioning.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/models/manifest.hpp"
#include "dde/objective/schedule.hpp"
#include "dde/train/metrics_log.hpp"

namespace dde::train {

struct SamplePrompt {
  std::string caption;
  std::vector<std::vector<int64_t>> input_ids;  // one [L] list per text encoder
};

// The first `count` distinct captions of the shards of `index_path` (fewer if the shards hold
// fewer), skipping pairs whose metadata is broken or whose ids do not fit the manifest's text
// encoders. Throws dde::Error when none is usable.
std::vector<SamplePrompt> read_sample_prompts(const std::string& index_path, int64_t count,
                                              const models::Manifest& manifest);

// The captions of eval.sample.prompts in its list or file form: the list, or the file's lines
// (a trailing \r dropped, blank lines skipped; at most 64, 1 MiB). Throws dde::Error.
std::vector<std::string> typed_captions(const config::PromptList& prompts);

// Typed captions tokenized in C++ for every text encoder of the manifest (its tokenizer folders,
// data::CaptionTokenizer). A caption that is not UTF-8 is a dde::Error naming it.
std::vector<SamplePrompt> tokenize_typed_prompts(const config::PromptList& prompts,
                                                 const models::Manifest& manifest);

// The UNet call of the trainer (its autocast and precision): x [B, C, h, w], t [B] -> eps.
using NoisePredictor = std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t,
                                                   const models::Conditioning& cond)>;

class ValidationImages {
 public:
  // Encodes the prompts once (with `text`, or frozen encoders loaded for that and released
  // when `text` is null) and loads the VAE decoder.
  ValidationImages(const config::TrainConfig& config, const models::Manifest& manifest,
                   const torch::Device& device, int64_t resolution, models::TextConditioner* text);
  bool due(int64_t step) const;
  // Samples, writes the grid (and prompts.json once) and hands it to TensorBoard via `metrics`
  // (may be null). Returns the grid's path.
  std::string write(int64_t step, const NoisePredictor& predict, MetricsLog* metrics);
  // The images [N, H, W, 3] uint8 (CPU), as diffusers' numpy_to_pil makes them.
  torch::Tensor sample(const NoisePredictor& predict);

 private:
  config::SampleConfig options_;
  int64_t max_steps_;
  std::string dir_;
  torch::Device device_;
  bool sdxl_;
  std::vector<int64_t> latent_shape_;  // [1, C, h, w]
  objective::NoiseSchedule schedule_;
  std::vector<SamplePrompt> prompts_;
  std::vector<models::Conditioning> cond_;  // per prompt: [uncond; cond], batch 2
  models::LatentDecoder decoder_;
};

// Images [N, H, W, 3] uint8 -> one [rows x H, per_row x W, 3] uint8 grid, row-major, the cells
// after the last image black.
torch::Tensor image_grid(const torch::Tensor& images, int64_t per_row);
// An RGB image [H, W, 3] uint8 as PNG bytes.
std::string encode_png(const torch::Tensor& rgb);

}  // namespace dde::train
