// Runs the C++ per-block UNet of a manifest on inputs from a safetensors file, for
// tests/python/test_unet_blocks.py (parity with diffusers' UNet2DConditionModel forward).
// Inputs: x [B,C,h,w] f32, t [B] i64, text [B,L,D] f32 (+ pooled [B,P], time_ids [B,6] for
// sdxl). Output: eps (f32) in --output; with --backward also the gradient of sum(eps * x) for
// every parameter, under its diffusers name with a "grad." prefix.
#include <CLI/CLI.hpp>
#include <iostream>

#include "dde/checkpoint/safetensors.hpp"
#include "dde/models/autocast.hpp"
#include "dde/models/manifest.hpp"
#include "dde/models/unet.hpp"
#include "dde/util/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"dde per-block UNet probe"};
  std::string manifest_path, input, output, frozen_dtype = "fp32";
  bool checkpointing = false, backward = false, bf16 = false;
  app.add_option("--manifest", manifest_path, "manifest.json of an export")->required();
  app.add_option("--input", input, "safetensors with x, t, text[, pooled, time_ids]")->required();
  app.add_option("--output", output, "safetensors to write eps (and gradients) to")->required();
  app.add_option("--frozen-dtype", frozen_dtype, "fp32 | bf16 weights (frozen model)");
  app.add_flag("--checkpointing", checkpointing, "recompute blocks in backward");
  app.add_flag("--backward", backward, "also write parameter gradients of sum(eps * x)");
  app.add_flag("--bf16", bf16, "run under bf16 autocast");
  CLI11_PARSE(app, argc, argv);
  try {
    const dde::models::Manifest manifest = dde::models::load_manifest(manifest_path);
    dde::models::UNetOptions options;
    options.trainable = backward;
    options.gradient_checkpointing = checkpointing;
    options.dtype = frozen_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
    dde::models::UNet unet(manifest, torch::kCPU, options);
    std::map<std::string, torch::Tensor> in;
    for (auto& [name, tensor] : dde::checkpoint::load_safetensors(input).tensors) in[name] = tensor;
    dde::models::Conditioning cond;
    cond.text = in.at("text");
    if (in.count("pooled") != 0) cond.pooled = in.at("pooled");
    if (in.count("time_ids") != 0) cond.time_ids = in.at("time_ids");
    torch::Tensor eps;
    {
      torch::AutoGradMode grad(backward);
      const dde::models::AutocastScope autocast(torch::kCPU, bf16);
      eps = unet.predict_noise(in.at("x"), in.at("t"), cond);
    }
    dde::checkpoint::NamedTensors out{{"eps", eps.detach().to(torch::kFloat32)}};
    if (backward) {
      (eps.to(torch::kFloat32) * in.at("x")).sum().backward();
      for (const auto& [name, p] : unet.named_parameters()) {
        out.emplace_back("grad." + name, p.grad().defined() ? p.grad() : torch::zeros_like(p));
      }
    }
    dde::checkpoint::save_safetensors(output, out);
  } catch (const std::exception& e) {
    std::cerr << "dde_unet_probe: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
