#include "dde/pairs/pair_path.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <string>
#include <utility>

#include "dde/data/image_tensor.hpp"
#include "dde/util/error.hpp"
#include "dde/util/seed.hpp"
#include "dde/util/transfer.hpp"

namespace dde::pairs {
namespace {

at::Generator pair_generator(uint64_t seed, int64_t pair_id, uint64_t stream) {
  return at::make_generator<at::CPUGeneratorImpl>(mix_seed(seed, pair_id, stream));
}

}  // namespace

torch::ScalarType frozen_dtype(const std::string& name) {
  return name == "bf16" ? torch::kBFloat16 : torch::kFloat32;
}

int64_t resolve_resolution(int64_t configured, const models::Manifest& manifest) {
  const int64_t resolution = configured > 0 ? configured : manifest.resolution;
  if (resolution % manifest.latent_downsample != 0) {
    throw Error({"resolution not divisible by the VAE downsampling", "data.resolution",
                 "a multiple of " + std::to_string(manifest.latent_downsample),
                 std::to_string(resolution), ""});
  }
  return resolution;
}

torch::Tensor per_image_mse(const torch::Tensor& prediction, const torch::Tensor& target) {
  return (prediction.to(torch::kFloat32) - target).pow(2).flatten(1).mean(1);
}

TrainingDraws draw_training(const torch::Tensor& pair_ids, uint64_t seed,
                            objective::TimestepSampler& sampler,
                            const std::vector<int64_t>& latent_shape) {
  std::vector<torch::Tensor> ts, eps, vae_w, vae_l;
  for (int64_t i = 0; i < pair_ids.size(0); ++i) {
    at::Generator g = pair_generator(seed, pair_ids[i].item<int64_t>(), 0);
    ts.push_back(sampler.sample(1, g));
    eps.push_back(at::randn(latent_shape, g, torch::kFloat32));
    vae_w.push_back(at::randn(latent_shape, g, torch::kFloat32));
    vae_l.push_back(at::randn(latent_shape, g, torch::kFloat32));
  }
  return {torch::cat(ts), torch::stack(eps),
          torch::cat({torch::stack(vae_w), torch::stack(vae_l)}, 0)};
}

torch::Tensor draw_eval_vae_noise(const torch::Tensor& pair_ids, uint64_t seed,
                                  const std::vector<int64_t>& latent_shape) {
  std::vector<torch::Tensor> noise_w, noise_l;
  for (int64_t i = 0; i < pair_ids.size(0); ++i) {
    at::Generator g = pair_generator(seed, pair_ids[i].item<int64_t>(), 0);
    noise_w.push_back(at::randn(latent_shape, g, torch::kFloat32));
    noise_l.push_back(at::randn(latent_shape, g, torch::kFloat32));
  }
  return torch::cat({torch::stack(noise_w), torch::stack(noise_l)}, 0);
}

torch::Tensor draw_eval_eps(const torch::Tensor& pair_ids, uint64_t seed, int64_t t,
                            const std::vector<int64_t>& latent_shape) {
  std::vector<torch::Tensor> eps;
  for (int64_t i = 0; i < pair_ids.size(0); ++i) {
    at::Generator g =
        pair_generator(seed, pair_ids[i].item<int64_t>(), 1 + static_cast<uint64_t>(t));
    eps.push_back(at::randn(latent_shape, g, torch::kFloat32));
  }
  return torch::stack(eps);
}

PairPath::PairPath(const models::Manifest& manifest, const objective::NoiseSchedule& schedule,
                   const torch::Device& device, int64_t resolution, models::TextConditioner* text,
                   models::LatentEncoder* vae)
    : manifest_(&manifest),
      schedule_(&schedule),
      device_(device),
      resolution_(resolution),
      text_(text),
      vae_(vae),
      pm1_table_(data::pm1_table().to(device)),
      latent_shape_({manifest.latent_channels, resolution / manifest.latent_downsample,
                     resolution / manifest.latent_downsample}) {}

EncodedPairs PairPath::encode(const data::PairBatch& batch, const torch::Tensor& vae_noise) const {
  // Host -> device without blocking the host: a DMA from the loader's pinned batches.
  const auto to_device = [&](const torch::Tensor& x) { return util::to_device_async(x, device_); };
  EncodedPairs out;
  models::Conditioning cond;
  if (batch.winner_moments.defined()) {  // a latent cache: [2B, 2 (mean, logvar), C, h, w]
    const torch::Tensor m =
        torch::cat({to_device(batch.winner_moments), to_device(batch.loser_moments)}, 0);
    out.latents = models::sample_latents(m.select(1, 0), m.select(1, 1), vae_noise,
                                         manifest_->scaling_factor);
    cond.text = to_device(batch.text_hidden);
    if (batch.text_pooled.defined()) cond.pooled = to_device(batch.text_pooled);
  } else {
    if (vae_ == nullptr || text_ == nullptr) {
      throw Error({"pairs without the encoders", "pair path", "a latent cache's batch",
                   "images and token ids", "internal error: the encoders were not loaded"});
    }
    // One VAE call for both sides: [x_w; x_l], [2B, 3, H, W] -> latents [2B, C, h, w].
    const torch::Tensor pixels = torch::cat({to_device(batch.winner), to_device(batch.loser)}, 0);
    out.latents = vae_->encode(data::to_pm1(pixels, pm1_table_), vae_noise);
    cond = text_->encode(batch.input_ids);
  }
  if (manifest_->added_cond) {
    out.winner_time_ids = to_device(
        models::sdxl_time_ids(batch.winner_original_hw, batch.winner_crop_tl, resolution_));
    out.loser_time_ids =
        to_device(models::sdxl_time_ids(batch.loser_original_hw, batch.loser_crop_tl, resolution_));
    cond.time_ids = out.winner_time_ids;
  }
  out.cond = cond.repeat_for_pair(out.loser_time_ids);
  return out;
}

torch::Tensor PairPath::errors(const Predictor& predict, const torch::Tensor& x0,
                               const torch::Tensor& eps, const torch::Tensor& t,
                               const models::Conditioning& cond) const {
  const torch::Tensor x_t = objective::add_noise(*schedule_, x0, eps, t);
  return per_image_mse(predict(x_t, t, cond), eps);
}

}  // namespace dde::pairs
