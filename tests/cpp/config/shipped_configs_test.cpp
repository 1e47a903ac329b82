// Every config in configs/ loads and validates, and says what its comments claim.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "dde/config/config.hpp"

namespace dde::config {
namespace {

namespace fs = std::filesystem;

fs::path configs_dir() { return fs::path(DDE_SOURCE_DIR) / "configs"; }

TrainConfig load(const std::string& name) { return load_config((configs_dir() / name).string()); }

TEST(ShippedConfigs, EveryOneLoadsAndValidates) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(configs_dir())) {
    if (entry.path().extension() == ".yaml") {
      names.push_back(entry.path().filename().string());
    }
  }
  std::sort(names.begin(), names.end());
  const std::vector<std::string> expected = {
      "sd15_dde.yaml",        "sd15_dde_lora.yaml",   "sd15_dde_single.yaml", "sd15_dde_step.yaml",
      "sd15_dde_window.yaml", "sd15_discounted.yaml", "sd15_mapo.yaml",       "sd15_sft.yaml",
      "sd15_uniform.yaml",    "sdxl_dde.yaml",        "sdxl_dde_lora.yaml",   "tiny_dde.yaml",
      "tiny_sdxl_dde.yaml"};
  for (const auto& name : expected) {
    EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name << " missing";
  }
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const auto c = load(name);
    EXPECT_NO_THROW(validate(c));
    EXPECT_NO_THROW(validate_against_timesteps(c, 1000));
    EXPECT_EQ(c.run.output_dir, "runs/" + name.substr(0, name.size() - 5));
    EXPECT_EQ(load_config((configs_dir() / name).string(), {}), c);
  }
}

TEST(ShippedConfigs, Sd15DdeIsThePaperSetup) {
  const auto c = load("sd15_dde.yaml");
  EXPECT_EQ(c.model.manifest, "exports/sd15/manifest.json");
  EXPECT_EQ(c.data.index, "data/pickapic/index.json");
  EXPECT_EQ(c.method.name, "dde");
  EXPECT_EQ(c.method.beta, 5000.0);
  EXPECT_EQ(c.train.global_batch, 2048);
  EXPECT_EQ(c.train.micro_batch, 1);
  EXPECT_EQ(c.train.max_steps, 2000);
  EXPECT_EQ(c.optim.lr, 2.048e-5);
  EXPECT_EQ(c.optim.warmup_steps, 500);
  EXPECT_EQ(c.optim.beta1, 0.9);
  EXPECT_EQ(c.optim.beta2, 0.999);
  EXPECT_EQ(c.optim.weight_decay, 1e-2);
  EXPECT_EQ(c.optim.eps, 1e-8);
  EXPECT_EQ(c.optim.grad_clip, 1.0);
  EXPECT_EQ(c.checkpoint.every, 100);
  EXPECT_EQ(c.checkpoint.keep, 3);
  EXPECT_EQ(accumulation_steps(c, 8), 256);
  // Made for GPUs: bf16 autocast, bf16 frozen models, gradient checkpointing.
  EXPECT_EQ(c.train.precision, "bf16");
  EXPECT_EQ(c.model.frozen_dtype, "bf16");
  EXPECT_TRUE(c.train.gradient_checkpointing);
  // It lists every key with its default value, those aside.
  TrainConfig defaults;
  defaults.train.precision = "bf16";
  defaults.model.frozen_dtype = "bf16";
  defaults.train.gradient_checkpointing = true;
  defaults.run.output_dir = c.run.output_dir;
  defaults.model.manifest = c.model.manifest;
  defaults.data.index = c.data.index;
  EXPECT_EQ(c, defaults);
}

TEST(ShippedConfigs, Sd15VariantsDifferOnlyInTheirMethod) {
  const auto paper = load("sd15_dde.yaml");
  const struct {
    const char* file;
    const char* method;
  } variants[] = {{"sd15_uniform.yaml", "uniform"},
                  {"sd15_discounted.yaml", "discounted"},
                  {"sd15_dde_single.yaml", "dde_single"},
                  {"sd15_dde_step.yaml", "dde_step"},
                  {"sd15_sft.yaml", "sft"},
                  {"sd15_mapo.yaml", "mapo"},
                  {"sd15_dde_window.yaml", "dde"}};
  for (const auto& v : variants) {
    SCOPED_TRACE(v.file);
    auto c = load(v.file);
    EXPECT_EQ(c.method.name, v.method);
    if (std::string(v.file) == "sd15_dde_window.yaml") {
      EXPECT_EQ(c.method.t_lo, 200);
      EXPECT_EQ(c.method.t_hi, 700);
    }
    if (std::string(v.file) == "sd15_mapo.yaml") {  // MaPO's defaults, written out
      EXPECT_EQ(c.method.mapo_beta, 0.1);
      EXPECT_EQ(c.method.mapo_snr, 0.5);
    }
    c.run.output_dir = paper.run.output_dir;
    c.method = paper.method;
    EXPECT_EQ(c, paper);
  }
}

TEST(ShippedConfigs, SdxlDde) {
  const auto c = load("sdxl_dde.yaml");
  EXPECT_EQ(c.model.manifest, "exports/sdxl/manifest.json");
  EXPECT_EQ(c.train.max_steps, 1500);
  EXPECT_EQ(c.optim.warmup_steps, 200);
  EXPECT_EQ(c.data.resolution, 1024);
  EXPECT_EQ(c.train.precision, "bf16");
  EXPECT_EQ(c.model.frozen_dtype, "bf16");
  EXPECT_TRUE(c.train.gradient_checkpointing);
  EXPECT_EQ(c.optim.name, "adafactor");  // the reference's SDXL launcher
  EXPECT_EQ(c.optim.grad_clip, 0.0);     // which does not clip with Adafactor
  EXPECT_EQ(c.train.global_batch, 2048);
}

// One GPU: LoRA at diffusers' DPO example's values, bf16 autocast and gradient checkpointing.
TEST(ShippedConfigs, LoraConfigsFitOneGpu) {
  for (const std::string family : {"sd15", "sdxl"}) {
    SCOPED_TRACE(family);
    const auto c = load(family + "_dde_lora.yaml");
    EXPECT_EQ(c.model.manifest, "exports/" + family + "/manifest.json");
    EXPECT_EQ(c.lora.rank, 8);
    EXPECT_EQ(c.lora.alpha, 8.0);
    EXPECT_EQ(c.lora.targets, (std::vector<std::string>{"to_q", "to_k", "to_v", "to_out.0"}));
    EXPECT_EQ(c.model.reference_manifest, "");
    EXPECT_EQ(c.method.name, "dde");
    EXPECT_EQ(c.train.precision, "bf16");
    EXPECT_TRUE(c.train.gradient_checkpointing);
    EXPECT_EQ(accumulation_steps(c, 1), family == "sd15" ? 4 : 16);  // one rank
    EXPECT_EQ(c.data.resolution, family == "sd15" ? 0 : 1024);
  }
}

TEST(ShippedConfigs, TinyConfigs) {
  for (const std::string family : {"sd15", "sdxl"}) {
    const auto c = load(family == "sd15" ? "tiny_dde.yaml" : "tiny_sdxl_dde.yaml");
    SCOPED_TRACE(family);
    EXPECT_EQ(c.model.manifest, "fixtures/export/" + family + "/manifest.json");
    EXPECT_EQ(c.data.index, "fixtures/shards/" + family + "/index.json");
    EXPECT_EQ(c.train.global_batch, 4);
    EXPECT_EQ(c.train.micro_batch, 2);
    EXPECT_EQ(c.train.max_steps, 400);
    EXPECT_EQ(c.data.eval_index, "fixtures/shards/" + family + "_eval/index.json");
    EXPECT_EQ(c.eval.every, 40);
    EXPECT_EQ(c.optim.lr, 3e-4);
    EXPECT_EQ(c.optim.warmup_steps, 2);
    EXPECT_EQ(c.method.beta, 5000.0);
    EXPECT_EQ(c.checkpoint.every, 10);
    EXPECT_EQ(c.checkpoint.keep, 2);
    EXPECT_EQ(c.data.workers, 2);
    EXPECT_EQ(c.data.shuffle_buffer, 16);
    EXPECT_EQ(c.run.seed, 0u);
  }
  // Tests change the tiny runs through overrides.
  const auto c = load_config((configs_dir() / "tiny_dde.yaml").string(),
                             {"method.name=uniform", "train.max_steps=3", "run.output_dir=/tmp/x"});
  EXPECT_EQ(c.method.name, "uniform");
  EXPECT_EQ(c.train.max_steps, 3);
}

}  // namespace
}  // namespace dde::config
