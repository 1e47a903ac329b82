// The manifest written by scripts/dde_tools/export_models.py (docs/formats.md, section 1):
// the contract between the Python export and the C++ loader.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dde::models {

enum class Family { kSd15, kSdxl };

struct TextEncoderInfo {
  std::string name;           // "text_encoder", "text_encoder_2"
  std::string file;           // absolute path of the TorchScript file
  std::string hidden_output;  // "last" | "penultimate"
  int64_t hidden_size = 0;
  int64_t pooled_size = 0;
  int64_t max_length = 0;
  std::string vocab_sha256;
  std::vector<int64_t> empty_prompt_ids;  // ids of "" (caption dropout)
  std::string tokenizer_dir;  // absolute path of its CLIP tokenizer folder; "" in old exports
};

// One separately traced unit of the UNet (scripts/dde_tools/unet_blocks.py), in execution
// order: the input head, one unit per resnet (+ attention) and per down/upsampler, the mid
// block, the output head.
enum class UNetBlockKind { kInput, kDown, kMid, kUp, kOutput };

struct UNetBlockInfo {
  std::string name;  // "input", "down_blocks.0.1", "down_blocks.0.downsample", "mid_block", ...
  UNetBlockKind kind = UNetBlockKind::kInput;
  std::string file;  // absolute path of the TorchScript file
  // (traced-name prefix, diffusers prefix): a parameter named prefix + rest is the diffusers
  // state-dict entry diffusers + rest.
  std::vector<std::pair<std::string, std::string>> params;
  int64_t pops = 0;          // skips popped from the stack (inputs after encoder_hidden_states)
  bool push_output = false;  // the unit's output is pushed as a skip
  bool takes_size = false;   // also takes the next skip on the stack as size_like
};

struct AddedConditioning {  // SDXL "text_time"
  int64_t text_embeds_dim = 0;
  int64_t time_ids_dim = 0;
};

struct Manifest {
  static constexpr int64_t kVersion = 2;  // 2: per-block UNet (1 held it as one graph)
  std::string path;                       // where it was read from
  std::string directory;                  // component files are resolved against it
  Family family = Family::kSd15;
  int64_t resolution = 0;
  int64_t latent_channels = 0;
  int64_t latent_downsample = 0;
  double scaling_factor = 0.0;
  int64_t num_train_timesteps = 0;
  double beta_start = 0.0;
  double beta_end = 0.0;
  std::vector<UNetBlockInfo> unet_blocks;  // input, down..., mid, up..., output
  std::string unet_config_json;  // the diffusers unet/config.json, verbatim (for checkpoints)
  int64_t cross_attention_dim = 0;
  std::optional<AddedConditioning> added_cond;
  std::vector<TextEncoderInfo> text_encoders;
  std::optional<std::string> pooled_from;  // name of the encoder whose pooled output feeds the UNet
  std::string vae_encoder_file;
  std::string vae_decoder_file;
  // sha256 of component files by file name ("vae_encoder.pt"), as recorded at export; empty for
  // a manifest exported before it was recorded.
  std::map<std::string, std::string> file_sha256;
};

// Reads and validates; every problem is a dde::Error naming the manifest and the field.
Manifest load_manifest(const std::string& path);

const char* family_name(Family family);

}  // namespace dde::models
