#include "dde/train/validation_images.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <stb_image_write.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>

#include "dde/data/caption_tokenizer.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/pairs/caption_tokenizers.hpp"
#include "dde/pairs/pair_path.hpp"
#include "dde/text/utf8.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/input_limits.hpp"
#include "dde/util/log.hpp"

namespace dde::train {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kPerRow = 4;

bool ids_fit(const data::PairRecord& record, const models::Manifest& manifest) {
  if (record.problem || record.input_ids.size() != manifest.text_encoders.size()) return false;
  for (size_t i = 0; i < record.input_ids.size(); ++i) {
    if (static_cast<int64_t>(record.input_ids[i].size()) != manifest.text_encoders[i].max_length) {
      return false;
    }
  }
  return true;
}

torch::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return torch::tensor(ids, torch::kLong).unsqueeze(0);
}

// [uncond; cond] of one prompt: batch 2, as diffusers' pipelines stack them.
models::Conditioning prompt_conditioning(models::TextConditioner& text,
                                         const models::Manifest& manifest,
                                         const SamplePrompt& prompt, int64_t resolution) {
  std::vector<torch::Tensor> ids;
  for (size_t i = 0; i < manifest.text_encoders.size(); ++i) {
    ids.push_back(torch::cat(
        {ids_tensor(manifest.text_encoders[i].empty_prompt_ids), ids_tensor(prompt.input_ids[i])}));
  }
  models::Conditioning cond = text.encode(ids);
  if (manifest.added_cond) {  // original = target size, no crop (the pipelines' defaults)
    cond.time_ids = models::sdxl_time_ids(torch::full({2, 2}, resolution, torch::kLong),
                                          torch::zeros({2, 2}, torch::kLong), resolution)
                        .to(cond.text.device());
  }
  return cond;
}

models::Conditioning rows(const models::Conditioning& c, int64_t start, int64_t length) {
  models::Conditioning out;
  out.text = c.text.narrow(0, start, length);
  if (c.pooled.defined()) out.pooled = c.pooled.narrow(0, start, length);
  if (c.time_ids.defined()) out.time_ids = c.time_ids.narrow(0, start, length);
  return out;
}

void write_prompts_json(const std::string& path, const std::vector<SamplePrompt>& prompts,
                        const config::SampleConfig& options, const std::string& source) {
  nlohmann::json cells = nlohmann::json::array();
  for (size_t i = 0; i < prompts.size(); ++i) {
    cells.push_back({{"cell", i},
                     {"row", static_cast<int64_t>(i) / kPerRow},
                     {"column", static_cast<int64_t>(i) % kPerRow},
                     {"caption", prompts[i].caption},
                     {"input_ids", prompts[i].input_ids},
                     {"seed", options.seed + i}});
  }
  const nlohmann::json doc = {{"prompts_from", source},
                              {"steps", options.steps},
                              {"guidance", options.guidance},
                              {"scheduler", "DDIM, leading spacing, steps_offset 1, eta 0"},
                              {"cells", cells}};
  const std::string text = doc.dump(2) + "\n";
  util::write_file(path, {{text.data(), text.size()}});
}

}  // namespace

std::vector<SamplePrompt> read_sample_prompts(const std::string& index_path, int64_t count,
                                              const models::Manifest& manifest) {
  const data::ShardIndex index = data::ShardIndex::load(index_path);
  std::unique_ptr<data::CaptionTokenizer> captions;  // caption-only shards
  if (index.tokenizers.empty()) {
    captions = std::make_unique<data::CaptionTokenizer>(pairs::caption_tokenizer_specs(manifest));
  }
  std::vector<SamplePrompt> prompts;
  std::set<std::string> seen;
  for (const data::ShardInfo& shard : index.shards) {
    data::ShardPairReader reader(shard.path, data::ShardPairReader::Images::kSkip);
    while (static_cast<int64_t>(prompts.size()) < count) {
      std::optional<data::PairRecord> record = reader.next();
      if (!record) break;
      if (captions && !record->problem && record->input_ids.empty() &&
          !text::find_invalid_utf8(record->caption)) {
        record->input_ids = captions->encode(record->caption);
      }
      if (!ids_fit(*record, manifest) || !seen.insert(record->caption).second) continue;
      prompts.push_back({record->caption, record->input_ids});
    }
    if (static_cast<int64_t>(prompts.size()) == count) break;
  }
  if (prompts.empty()) {
    throw Error({"no prompt for the validation images", index_path,
                 "pairs with a caption and token ids for the model's " +
                     std::to_string(manifest.text_encoders.size()) + " text encoder(s)",
                 "none", "type the captions: eval.sample.prompts: [\"a red cube\", \"a cat\"]"});
  }
  if (static_cast<int64_t>(prompts.size()) < count) {
    log::warn("eval.sample.prompts = {}: the shards of {} hold {} distinct captions; using them",
              count, index_path, prompts.size());
  }
  return prompts;
}

std::vector<std::string> typed_captions(const config::PromptList& prompts) {
  if (prompts.file.empty()) return prompts.texts;
  const std::string text =
      util::read_text_file(prompts.file, util::kMaxConfigFileBytes, "eval.sample.prompts file",
                           "keep the captions to watch: at most 64");
  std::vector<std::string> out;
  size_t line_start = 0;
  int64_t line = 0;
  while (line_start < text.size()) {
    size_t end = text.find('\n', line_start);
    if (end == std::string::npos) end = text.size();
    std::string caption = text.substr(line_start, end - line_start);
    line_start = end + 1;
    ++line;
    if (!caption.empty() && caption.back() == '\r') caption.pop_back();   // CRLF files
    if (caption.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines
    if (out.size() == 64) {
      throw Error({"too many captions in the eval.sample.prompts file",
                   fmt::format("{}:{}", prompts.file, line), "at most 64 (one image each)", "more",
                   "keep the captions to watch"});
    }
    out.push_back(std::move(caption));
  }
  if (out.empty()) {
    throw Error({"no caption in the eval.sample.prompts file", prompts.file, "one caption per line",
                 "only blank lines",
                 "write the captions one per line, or give a count (eval.sample.prompts: 8)"});
  }
  return out;
}

std::vector<SamplePrompt> tokenize_typed_prompts(const config::PromptList& prompts,
                                                 const models::Manifest& manifest) {
  const std::vector<std::string> texts = typed_captions(prompts);
  const data::CaptionTokenizer tokenizer(pairs::caption_tokenizer_specs(manifest));
  std::vector<SamplePrompt> out;
  for (size_t i = 0; i < texts.size(); ++i) {
    try {
      out.push_back({texts[i], tokenizer.encode(texts[i])});
    } catch (const text::InvalidUtf8Error& e) {
      throw Error({"a validation caption is not UTF-8",
                   prompts.file.empty() ? fmt::format("eval.sample.prompts[{}]", i)
                                        : fmt::format("{}: caption {}", prompts.file, i + 1),
                   "UTF-8 text",
                   fmt::format("bytes {} at byte {}", text::hex_bytes(texts[i], e.byte_offset()),
                               e.byte_offset()),
                   "save the file as UTF-8"});
    }
  }
  return out;
}

ValidationImages::ValidationImages(const config::TrainConfig& config,
                                   const models::Manifest& manifest, const torch::Device& device,
                                   int64_t resolution, models::TextConditioner* text)
    : options_(config.sample),
      max_steps_(config.train.max_steps),
      dir_((fs::path(config.run.output_dir) / "samples").string()),
      device_(device),
      sdxl_(manifest.added_cond.has_value()),
      latent_shape_({1, manifest.latent_channels, resolution / manifest.latent_downsample,
                     resolution / manifest.latent_downsample}),
      schedule_(objective::NoiseSchedule::scaled_linear(manifest.num_train_timesteps,
                                                        manifest.beta_start, manifest.beta_end)),
      decoder_(manifest, device, pairs::frozen_dtype(config.model.frozen_dtype)) {
  objective::ddim_timesteps(schedule_.num_timesteps, options_.steps);  // checks the step count
  std::string source = config.data.eval_index.empty() ? config.data.index : config.data.eval_index;
  if (options_.prompts.typed()) {
    prompts_ = tokenize_typed_prompts(options_.prompts, manifest);
    source = options_.prompts.file.empty() ? "eval.sample.prompts" : options_.prompts.file;
  } else {
    prompts_ = read_sample_prompts(source, options_.prompts.count, manifest);
  }
  std::unique_ptr<models::TextConditioner> own;
  if (text == nullptr) {  // a latent cache without held-out pairs: encode once, then release
    own = std::make_unique<models::TextConditioner>(manifest, device,
                                                    pairs::frozen_dtype(config.model.frozen_dtype));
    text = own.get();
  }
  for (const SamplePrompt& prompt : prompts_) {
    cond_.push_back(prompt_conditioning(*text, manifest, prompt, resolution));
  }
  std::error_code ec;
  fs::create_directories(dir_, ec);
  write_prompts_json((fs::path(dir_) / "prompts.json").string(), prompts_, options_, source);
  log::info("validation images: {} prompts from {}, DDIM {} steps, guidance {}, every {} steps",
            prompts_.size(), source, options_.steps, options_.guidance, options_.every);
}

bool ValidationImages::due(int64_t step) const {
  return options_.every > 0 && (step == 0 || step % options_.every == 0 || step == max_steps_);
}

torch::Tensor ValidationImages::sample(const NoisePredictor& predict) {
  torch::NoGradGuard no_grad;
  const bool guided = options_.guidance > 1.0;  // diffusers: do_classifier_free_guidance
  const std::vector<int64_t> timesteps =
      objective::ddim_timesteps(schedule_.num_timesteps, options_.steps);
  const int64_t ratio = schedule_.num_timesteps / options_.steps;
  std::vector<torch::Tensor> images;
  for (size_t i = 0; i < prompts_.size(); ++i) {
    at::Generator gen = at::detail::createCPUGenerator(options_.seed + i);
    torch::Tensor x = torch::randn(latent_shape_, gen, torch::kFloat32).to(device_);
    const models::Conditioning cond = guided ? cond_[i] : rows(cond_[i], 1, 1);
    for (const int64_t t : timesteps) {
      const torch::Tensor input = guided ? torch::cat({x, x}) : x;
      const torch::Tensor tt = torch::full({input.size(0)}, t, torch::kLong).to(device_);
      torch::Tensor eps = predict(input, tt, cond).to(torch::kFloat32);
      if (guided) {
        const auto halves = eps.chunk(2);
        eps = halves[0] + options_.guidance * (halves[1] - halves[0]);
      }
      x = objective::ddim_step(schedule_, x, eps, t, t - ratio);
    }
    const torch::Tensor image = decoder_.decode(x);  // [1, 3, H, W] in [-1, 1]
    // diffusers: (x / 2 + 0.5).clamp(0, 1), then numpy_to_pil's (x * 255).round()
    images.push_back((image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch::kUInt8).cpu());
  }
  return torch::cat(images).permute({0, 2, 3, 1}).contiguous();
}

std::string ValidationImages::write(int64_t step, const NoisePredictor& predict,
                                    MetricsLog* metrics) {
  const torch::Tensor grid = image_grid(sample(predict), kPerRow);
  const std::string png = encode_png(grid);
  std::string path = (fs::path(dir_) / fmt::format("step-{:08d}.png", step)).string();
  util::write_file(path + ".tmp", {{png.data(), png.size()}});
  fs::rename(path + ".tmp", path);
  if (metrics != nullptr) metrics->add_image("samples", png, grid.size(0), grid.size(1), step);
  return path;
}

torch::Tensor image_grid(const torch::Tensor& images, int64_t per_row) {
  if (images.dim() != 4 || images.size(3) != 3 || images.scalar_type() != torch::kUInt8 ||
      images.size(0) < 1 || per_row < 1) {
    throw Error({"bad images for a grid", "image_grid", "[N >= 1, H, W, 3] uint8",
                 c10::str(images.sizes(), " ", images.scalar_type()), "internal error"});
  }
  const int64_t n = images.size(0), h = images.size(1), w = images.size(2);
  const int64_t columns = std::min(n, per_row);
  const int64_t grid_rows = (n + columns - 1) / columns;
  torch::Tensor grid = torch::zeros({grid_rows * h, columns * w, 3}, torch::kUInt8);
  for (int64_t i = 0; i < n; ++i) {
    grid.narrow(0, (i / columns) * h, h).narrow(1, (i % columns) * w, w).copy_(images[i]);
  }
  return grid;
}

std::string encode_png(const torch::Tensor& rgb) {
  const torch::Tensor image = rgb.to(torch::kCPU).contiguous();
  if (image.dim() != 3 || image.size(2) != 3 || image.scalar_type() != torch::kUInt8) {
    throw Error({"bad image for PNG", "encode_png", "[H, W, 3] uint8",
                 c10::str(image.sizes(), " ", image.scalar_type()), "internal error"});
  }
  std::string out;
  const auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                               static_cast<size_t>(size));
  };
  const int w = static_cast<int>(image.size(1));
  if (stbi_write_png_to_func(append, &out, w, static_cast<int>(image.size(0)), 3,
                             image.data_ptr<uint8_t>(), w * 3) == 0) {
    throw Error({"PNG encoding failed", "encode_png", "a PNG", "stb_image_write failed", ""});
  }
  return out;
}

}  // namespace dde::train
