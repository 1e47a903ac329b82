// The pair path: what a batch of preference pairs becomes on its way to the per-pair errors,
// written once for the trainer, the held-out evaluator and (its encoding half) the cache encoder.
//   1. draws: each pair's t, eps and VAE posterior noise from the pair's own seed (util/seed.hpp),
//      so a pair gets the same draws whatever the batch, world size or resume point;
//   2. encode: images (VAE) or a latent cache's posterior moments, token ids (text encoders) or
//      cached embeddings, SDXL time ids -> latents and conditioning of [x_w; x_l];
//   3. errors: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the UNet's eps prediction, the
//      per-image mean squared error.
// docs/method.md §1-2 for the formulas, docs/architecture.md for where it sits.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dde/data/pair_loader.hpp"
#include "dde/models/conditioning.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/models/manifest.hpp"
#include "dde/objective/schedule.hpp"
#include "dde/objective/timestep_sampler.hpp"

namespace dde::pairs {

// model.frozen_dtype ("fp32" | "bf16") as the frozen encoders' weight dtype.
torch::ScalarType frozen_dtype(const std::string& name);

// data.resolution (0 = the manifest's), which the VAE's downsampling must divide.
int64_t resolve_resolution(int64_t configured, const models::Manifest& manifest);

// Per-image mean squared error over latent elements: [N, C, h, w] -> [N] (float32).
torch::Tensor per_image_mse(const torch::Tensor& prediction, const torch::Tensor& target);

// A training pair's draws, in this order from mix_seed(seed, pair id, 0): t (the method's
// sampler), eps, then the winner's and the loser's VAE posterior noise.
struct TrainingDraws {
  torch::Tensor t;          // [B] int64, CPU
  torch::Tensor eps;        // [B, C, h, w] float32, CPU: one per pair, shared by both sides
  torch::Tensor vae_noise;  // [2B, C, h, w] float32, CPU: winners then losers
};
TrainingDraws draw_training(const torch::Tensor& pair_ids, uint64_t seed,
                            objective::TimestepSampler& sampler,
                            const std::vector<int64_t>& latent_shape);

// A held-out pair's VAE noise from mix_seed(seed, pair id, 0) (winner then loser): [2B, C, h, w].
torch::Tensor draw_eval_vae_noise(const torch::Tensor& pair_ids, uint64_t seed,
                                  const std::vector<int64_t>& latent_shape);
// A held-out pair's eps at the evaluated timestep t, from mix_seed(seed, pair id, 1 + t):
// [B, C, h, w].
torch::Tensor draw_eval_eps(const torch::Tensor& pair_ids, uint64_t seed, int64_t t,
                            const std::vector<int64_t>& latent_shape);

// [x_w; x_l] ready for a UNet.
struct EncodedPairs {
  torch::Tensor latents;      // [2B, C, h, w] float32 on the device, x scaling factor
  models::Conditioning cond;  // 2B rows (SDXL: each side with its own time ids)
  torch::Tensor winner_time_ids, loser_time_ids;  // [B, 6] (SDXL), else undefined
};

// The UNet call of the caller (its model, precision and autocast): x, t -> eps.
using Predictor = std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t,
                                              const models::Conditioning& cond)>;

class PairPath {
 public:
  // `text` and `vae` may be null when every batch comes from a latent cache.
  PairPath(const models::Manifest& manifest, const objective::NoiseSchedule& schedule,
           const torch::Device& device, int64_t resolution, models::TextConditioner* text,
           models::LatentEncoder* vae);

  const std::vector<int64_t>& latent_shape() const { return latent_shape_; }  // [C, h, w]

  // Latents sampled from the VAE posterior with `vae_noise` ([2B, C, h, w]; images or cached
  // moments) and the conditioning (token ids or cached embeddings).
  EncodedPairs encode(const data::PairBatch& batch, const torch::Tensor& vae_noise) const;

  // Per-image errors ||predict(x_t, t) - eps||^2 / n of latents x0 noised with eps at t (each
  // [N, ...] / [N]; t int64 on the host: the schedule's tables are indexed there, no sync).
  torch::Tensor errors(const Predictor& predict, const torch::Tensor& x0, const torch::Tensor& eps,
                       const torch::Tensor& t, const models::Conditioning& cond) const;

 private:
  const models::Manifest* manifest_;
  const objective::NoiseSchedule* schedule_;
  torch::Device device_;
  int64_t resolution_;
  models::TextConditioner* text_;
  models::LatentEncoder* vae_;
  torch::Tensor pm1_table_;  // data::pm1_table() on the device: uint8 pixels -> [-1, 1]
  std::vector<int64_t> latent_shape_;
};

}  // namespace dde::pairs
