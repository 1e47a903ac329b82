#include "dde/models/diffusion_models.hpp"

#include <map>

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

TextConditioner::TextConditioner(const Manifest& manifest, const torch::Device& device)
    : manifest_(&manifest), device_(device) {
  for (const TextEncoderInfo& info : manifest.text_encoders) {
    torch::jit::Module m = load_component(info.file, device, info.name);
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
    hidden.push_back(out->elements()[0].toTensor());
    if (manifest_->pooled_from && *manifest_->pooled_from == infos[i].name) {
      cond.pooled = out->elements()[1].toTensor();
    }
  }
  cond.text = hidden.size() == 1 ? hidden[0] : torch::cat(hidden, -1);
  return cond;
}

LatentEncoder::LatentEncoder(const Manifest& manifest, const torch::Device& device)
    : scaling_factor_(manifest.scaling_factor),
      device_(device),
      encoder_(load_component(manifest.vae_encoder_file, device, "VAE encoder")) {
  set_trainable(encoder_, false);
}

torch::Tensor LatentEncoder::encode(const torch::Tensor& images, const torch::Tensor& noise) {
  torch::NoGradGuard no_grad;
  // forward(image [B,3,H,W]) -> (mean, logvar), each [B, C, h, w]
  auto out = encoder_.forward({images.to(device_, /*non_blocking=*/true)}).toTuple();
  const torch::Tensor mean = out->elements()[0].toTensor();
  const torch::Tensor logvar = out->elements()[1].toTensor();
  if (noise.sizes() != mean.sizes()) {
    throw Error({"VAE noise has the wrong shape", "LatentEncoder::encode", c10::str(mean.sizes()),
                 c10::str(noise.sizes()),
                 "internal error: latent shape differs from the manifest's"});
  }
  // diffusers DiagonalGaussianDistribution.sample(): mean + std * eps
  return (mean +
          torch::exp(0.5 * logvar) * noise.to(mean.device(), mean.dtype(), /*non_blocking=*/true)) *
         scaling_factor_;
}

UNet::UNet(const Manifest& manifest, const torch::Device& device, bool trainable)
    : sdxl_(manifest.added_cond.has_value()),
      device_(device),
      module_(load_component(manifest.unet_file, device, "UNet")) {
  set_trainable(module_, trainable);
  const std::string& prefix = manifest.unet_param_prefix;
  for (const auto& item : module_.named_parameters(/*recurse=*/true)) {
    if (item.name.rfind(prefix, 0) != 0) {
      throw Error({"UNet parameter without the manifest's prefix",
                   manifest.unet_file + ": " + item.name, "names starting with \"" + prefix + "\"",
                   item.name, "re-export the model"});
    }
    params_.emplace_back(item.name.substr(prefix.size()), item.value);
  }
}

torch::Tensor UNet::predict_noise(const torch::Tensor& x, const torch::Tensor& t,
                                  const Conditioning& cond) {
  std::vector<torch::jit::IValue> inputs{x, t.to(device_, torch::kLong, /*non_blocking=*/true),
                                         cond.text};
  if (sdxl_) {
    if (!cond.pooled.defined() || !cond.time_ids.defined()) {
      throw Error({"sdxl UNet needs pooled text embeddings and time ids", "UNet::predict_noise",
                   "both defined", "missing", ""});
    }
    inputs.emplace_back(cond.pooled);
    inputs.emplace_back(cond.time_ids.to(device_, torch::kFloat32, /*non_blocking=*/true));
  }
  return module_.forward(inputs).toTensor();
}

std::vector<torch::Tensor> UNet::parameters() const {
  std::vector<torch::Tensor> out;
  out.reserve(params_.size());
  for (const auto& [name, p] : params_) out.push_back(p);
  return out;
}

void UNet::load_parameters(const std::vector<std::pair<std::string, torch::Tensor>>& values,
                           const std::string& where) {
  std::map<std::string, torch::Tensor> by_name(values.begin(), values.end());
  if (by_name.size() != params_.size()) {
    throw Error({"parameter count mismatch", where,
                 std::to_string(params_.size()) + " UNet tensors", std::to_string(by_name.size()),
                 "was the checkpoint made from another model?"});
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : params_) {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      throw Error({"parameter missing", where + ": " + name, "present", "absent",
                   "was the checkpoint made from another model?"});
    }
    if (it->second.sizes() != p.sizes() || it->second.scalar_type() != p.scalar_type()) {
      throw Error({"parameter shape or dtype mismatch", where + ": " + name,
                   c10::str(p.sizes(), " ", p.scalar_type()),
                   c10::str(it->second.sizes(), " ", it->second.scalar_type()), ""});
    }
    p.copy_(it->second);
  }
}

}  // namespace dde::models
