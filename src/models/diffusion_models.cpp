#include "dde/models/diffusion_models.hpp"

#include "dde/models/autocast.hpp"
#include "dde/models/torchscript.hpp"
#include "dde/util/error.hpp"

namespace dde::models {

Conditioning Conditioning::repeat_for_pair(const torch::Tensor& loser_time_ids) const {
  Conditioning out;
  out.text = torch::cat({text, text}, 0);
  if (pooled.defined()) out.pooled = torch::cat({pooled, pooled}, 0);
  if (time_ids.defined()) out.time_ids = torch::cat({time_ids, loser_time_ids}, 0);
  return out;
}

TextConditioner::TextConditioner(const Manifest& manifest, const torch::Device& device,
                                 torch::ScalarType dtype)
    : manifest_(&manifest), device_(device), bf16_(dtype == torch::kBFloat16) {
  for (const TextEncoderInfo& info : manifest.text_encoders) {
    torch::jit::Module m = load_component(info.file, device, info.name, dtype);
    set_trainable(m, false);
    encoders_.push_back(std::move(m));
  }
}

Conditioning TextConditioner::encode(const std::vector<torch::Tensor>& input_ids) {
  const auto& infos = manifest_->text_encoders;
  if (input_ids.size() != infos.size()) {
    throw Error({"wrong number of token-id tensors", "text conditioning",
                 std::to_string(infos.size()) + " (one per text encoder)",
                 std::to_string(input_ids.size()),
                 "export the shards with one --tokenizer per text encoder of the model"});
  }
  torch::NoGradGuard no_grad;
  const AutocastScope autocast(device_.type(), bf16_);
  std::vector<torch::Tensor> hidden;
  Conditioning cond;
  for (size_t i = 0; i < infos.size(); ++i) {
    const torch::Tensor& ids = input_ids[i];
    if (ids.dim() != 2 || ids.size(1) != infos[i].max_length) {
      throw Error({"token ids have the wrong shape", infos[i].name,
                   "[B, " + std::to_string(infos[i].max_length) + "]", c10::str(ids.sizes()), ""});
    }
    // forward(input_ids [B, L]) -> (hidden [B, L, D], pooled [B, P])
    auto out =
        encoders_[i].forward({ids.to(device_, torch::kLong, /*non_blocking=*/true)}).toTuple();
    hidden.push_back(out->elements()[0].toTensor().to(torch::kFloat32));
    if (manifest_->pooled_from && *manifest_->pooled_from == infos[i].name) {
      cond.pooled = out->elements()[1].toTensor().to(torch::kFloat32);
    }
  }
  cond.text = hidden.size() == 1 ? hidden[0] : torch::cat(hidden, -1);
  return cond;
}

LatentEncoder::LatentEncoder(const Manifest& manifest, const torch::Device& device,
                             torch::ScalarType dtype)
    : scaling_factor_(manifest.scaling_factor),
      device_(device),
      bf16_(dtype == torch::kBFloat16),
      encoder_(load_component(manifest.vae_encoder_file, device, "VAE encoder", dtype)) {
  set_trainable(encoder_, false);
}

std::pair<torch::Tensor, torch::Tensor> LatentEncoder::moments(const torch::Tensor& images) {
  torch::NoGradGuard no_grad;
  const AutocastScope autocast(device_.type(), bf16_);
  // forward(image [B,3,H,W]) -> (mean, logvar), each [B, C, h, w]
  auto out = encoder_.forward({images.to(device_, /*non_blocking=*/true)}).toTuple();
  return {out->elements()[0].toTensor().to(torch::kFloat32),
          out->elements()[1].toTensor().to(torch::kFloat32)};
}

torch::Tensor LatentEncoder::encode(const torch::Tensor& images, const torch::Tensor& noise) {
  const auto [mean, logvar] = moments(images);
  return sample_latents(mean, logvar, noise, scaling_factor_);
}

LatentDecoder::LatentDecoder(const Manifest& manifest, const torch::Device& device,
                             torch::ScalarType dtype)
    : scaling_factor_(manifest.scaling_factor),
      device_(device),
      bf16_(dtype == torch::kBFloat16),
      decoder_(load_component(manifest.vae_decoder_file, device, "VAE decoder", dtype)) {
  set_trainable(decoder_, false);
}

torch::Tensor LatentDecoder::decode(const torch::Tensor& latents) {
  torch::NoGradGuard no_grad;
  const AutocastScope autocast(device_.type(), bf16_);
  // forward(latents / scaling_factor [B,C,h,w]) -> image [B,3,H,W] (docs/formats.md §1)
  const torch::Tensor z =
      latents.to(device_, torch::kFloat32, /*non_blocking=*/true) / scaling_factor_;
  return decoder_.forward({z}).toTensor().to(torch::kFloat32);
}

torch::Tensor sample_latents(const torch::Tensor& mean, const torch::Tensor& logvar,
                             const torch::Tensor& noise, double scaling_factor) {
  if (noise.sizes() != mean.sizes() || logvar.sizes() != mean.sizes()) {
    throw Error({"VAE posterior and noise shapes differ", "sample_latents",
                 "mean, logvar and noise of one shape " + c10::str(mean.sizes()),
                 "logvar " + c10::str(logvar.sizes()) + ", noise " + c10::str(noise.sizes()),
                 "internal error: latent shape differs from the manifest's"});
  }
  torch::NoGradGuard no_grad;
  // diffusers DiagonalGaussianDistribution.sample(): mean + std * eps
  return (mean +
          torch::exp(0.5 * logvar) * noise.to(mean.device(), mean.dtype(), /*non_blocking=*/true)) *
         scaling_factor;
}

}  // namespace dde::models
