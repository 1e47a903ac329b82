#include "dde/models/manifest.hpp"

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::models {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  const json& at(const json& node, const std::string& key, const std::string& field) const {
    if (!node.is_object() || !node.contains(key)) {
      fail("missing field", field, "present", "absent");
    }
    return node.at(key);
  }
  std::string string_at(const json& node, const std::string& key, const std::string& field) const {
    const json& v = at(node, key, field);
    if (!v.is_string()) fail("wrong type", field, "a string", v.dump());
    return v.get<std::string>();
  }
  int64_t positive_int_at(const json& node, const std::string& key,
                          const std::string& field) const {
    const json& v = at(node, key, field);
    if (!v.is_number_integer() || v.get<int64_t>() <= 0)
      fail("bad value", field, "a positive integer", v.dump());
    return v.get<int64_t>();
  }
  double positive_number_at(const json& node, const std::string& key,
                            const std::string& field) const {
    const json& v = at(node, key, field);
    if (!v.is_number() || v.get<double>() <= 0.0)
      fail("bad value", field, "a positive number", v.dump());
    return v.get<double>();
  }
  std::string file_at(const json& node, const std::string& key, const std::string& field,
                      const fs::path& dir) const {
    const fs::path file = dir / string_at(node, key, field);
    if (!fs::is_regular_file(file)) {
      fail("component file not found", field, "an existing file", file.string());
    }
    return file.string();
  }
  [[noreturn]] void fail(const std::string& what, const std::string& field,
                         const std::string& expected, const std::string& actual) const {
    throw Error({what, path_ + ": " + field, expected, actual,
                 "re-export the model with `python -m dde_tools.export_models` (docs/formats.md)"});
  }

 private:
  std::string path_;
};

UNetBlockKind block_kind(const Reader& r, const std::string& kind, const std::string& field) {
  static const std::map<std::string, UNetBlockKind> kinds = {{"input", UNetBlockKind::kInput},
                                                             {"down", UNetBlockKind::kDown},
                                                             {"mid", UNetBlockKind::kMid},
                                                             {"up", UNetBlockKind::kUp},
                                                             {"output", UNetBlockKind::kOutput}};
  const auto it = kinds.find(kind);
  if (it == kinds.end()) {
    r.fail("unknown UNet block kind", field, "input, down, mid, up or output", kind);
  }
  return it->second;
}

bool bool_at(const Reader& r, const json& node, const std::string& key, const std::string& field) {
  const json& v = r.at(node, key, field);
  if (!v.is_boolean()) r.fail("wrong type", field, "a boolean", v.dump());
  return v.get<bool>();
}

std::vector<std::pair<std::string, std::string>> read_param_rules(const Reader& r, const json& b,
                                                                  const std::string& f) {
  const json& rules = r.at(b, "params", f + ".params");
  if (!rules.is_array() || rules.empty()) {
    r.fail("bad parameter prefix rules", f + ".params", "a non-empty array", rules.dump());
  }
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t k = 0; k < rules.size(); ++k) {
    const std::string g = f + ".params[" + std::to_string(k) + "]";
    out.emplace_back(r.string_at(rules[k], "prefix", g + ".prefix"),
                     r.string_at(rules[k], "diffusers", g + ".diffusers"));
  }
  return out;
}

// The units must run as input, down..., mid, up..., output, and the up units must pop exactly
// the skips that the input and down units pushed.
std::vector<UNetBlockInfo> read_unet_blocks(const Reader& r, const json& blocks,
                                            const fs::path& dir) {
  if (!blocks.is_array() || blocks.size() < 3) {
    r.fail("bad UNet block list", "unet.blocks", "an array: input, down..., mid, up..., output",
           blocks.dump().substr(0, 200));
  }
  std::vector<UNetBlockInfo> out;
  int64_t stack = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const json& b = blocks[i];
    const std::string f = "unet.blocks[" + std::to_string(i) + "]";
    UNetBlockInfo info;
    info.name = r.string_at(b, "name", f + ".name");
    info.kind = block_kind(r, r.string_at(b, "kind", f + ".kind"), f + ".kind");
    info.file = r.file_at(b, "file", f + ".file", dir);
    info.params = read_param_rules(r, b, f);
    const json& pops = r.at(b, "pops", f + ".pops");
    if (!pops.is_number_integer() || pops.get<int64_t>() < 0) {
      r.fail("bad value", f + ".pops", "an integer >= 0", pops.dump());
    }
    info.pops = pops.get<int64_t>();
    info.push_output = bool_at(r, b, "push_output", f + ".push_output");
    info.takes_size = bool_at(r, b, "takes_size", f + ".takes_size");

    const bool first = i == 0;
    const bool last = i + 1 == blocks.size();
    const UNetBlockKind previous = first ? UNetBlockKind::kInput : out.back().kind;
    bool order_ok = first == (info.kind == UNetBlockKind::kInput) &&
                    last == (info.kind == UNetBlockKind::kOutput);
    if (info.kind == UNetBlockKind::kDown) order_ok = order_ok && previous <= UNetBlockKind::kDown;
    if (info.kind == UNetBlockKind::kMid) order_ok = order_ok && previous == UNetBlockKind::kDown;
    if (info.kind == UNetBlockKind::kUp) order_ok = order_ok && previous >= UNetBlockKind::kMid;
    if (info.kind == UNetBlockKind::kOutput) order_ok = order_ok && previous == UNetBlockKind::kUp;
    if (!order_ok) {
      r.fail("UNet blocks out of order", f + ".kind", "input, down..., mid, up..., output",
             b.at("kind").dump());
    }
    stack -= info.pops;
    if (stack < (info.takes_size ? 1 : 0)) {
      r.fail("UNet unit pops more skips than were pushed", f + ".pops",
             "at most " + std::to_string(stack + info.pops - (info.takes_size ? 1 : 0)),
             std::to_string(info.pops));
    }
    if (info.push_output) stack += 1;
    out.push_back(std::move(info));
  }
  if (stack != 0) {
    r.fail("UNet skip connections do not balance", "unet.blocks",
           "every skip pushed by the down units popped by the up units",
           std::to_string(stack) + " left over");
  }
  return out;
}

json parse_manifest_file(const std::string& path) {
  std::error_code ec;
  const std::string absolute = fs::absolute(path, ec).lexically_normal().string();
  if (fs::is_directory(path, ec)) {
    throw Error({"a folder where a file is expected", path + " (" + absolute + ")",
                 "the export's manifest.json", "a folder",
                 "point model.manifest at " + (fs::path(absolute) / "manifest.json").string()});
  }
  if (!fs::is_regular_file(path, ec)) {
    throw Error(
        {"cannot open manifest", path + " (" + absolute + ")", "a readable manifest.json",
         fs::exists(path, ec) ? "unreadable" : "no such file",
         "export the pipeline first: python -m dde_tools.export_models --pipeline DIR --out DIR"});
  }
  const std::string text = util::read_text_file(path, util::kMaxManifestBytes, "manifest");
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error({"manifest is not valid JSON", path, "JSON", e.what(), "re-export the model"});
  }
  return root;
}

// format, version, family and resolution.
void read_manifest_header(const Reader& r, const json& root, Manifest& m) {
  if (r.string_at(root, "format", "format") != "dde-manifest") {
    r.fail("not a dde manifest", "format", "\"dde-manifest\"", root.at("format").dump());
  }
  const json& version = r.at(root, "version", "version");
  if (version.is_number_integer() && version.get<int64_t>() == 1) {
    r.fail("manifest version 1 holds the UNet as one traced graph, which cannot be checkpointed",
           "version", "2 (the UNet as separately traced blocks)", "1");
  }
  if (!version.is_number_integer() || version.get<int64_t>() != Manifest::kVersion) {
    r.fail("unsupported manifest version", "version", std::to_string(Manifest::kVersion),
           version.dump());
  }
  const std::string family = r.string_at(root, "family", "family");
  if (family == "sd15") {
    m.family = Family::kSd15;
  } else if (family == "sdxl") {
    m.family = Family::kSdxl;
  } else {
    r.fail("unknown model family", "family", "\"sd15\" or \"sdxl\"", family);
  }
  m.resolution = r.positive_int_at(root, "resolution", "resolution");
}

// The VAE's latent space and the noise schedule.
void read_manifest_latent_schedule(const Reader& r, const json& root, Manifest& m) {
  const json& latent = r.at(root, "latent", "latent");
  m.latent_channels = r.positive_int_at(latent, "channels", "latent.channels");
  m.latent_downsample = r.positive_int_at(latent, "downsample", "latent.downsample");
  m.scaling_factor = r.positive_number_at(latent, "scaling_factor", "latent.scaling_factor");
  if (m.resolution % m.latent_downsample != 0) {
    r.fail("resolution not divisible by the VAE downsampling", "resolution",
           "a multiple of " + std::to_string(m.latent_downsample), std::to_string(m.resolution));
  }

  const json& schedule = r.at(root, "schedule", "schedule");
  m.num_train_timesteps =
      r.positive_int_at(schedule, "num_train_timesteps", "schedule.num_train_timesteps");
  m.beta_start = r.positive_number_at(schedule, "beta_start", "schedule.beta_start");
  m.beta_end = r.positive_number_at(schedule, "beta_end", "schedule.beta_end");
  const std::string beta_schedule =
      r.string_at(schedule, "beta_schedule", "schedule.beta_schedule");
  if (beta_schedule != "scaled_linear") {
    r.fail("unsupported noise schedule", "schedule.beta_schedule", "\"scaled_linear\"",
           beta_schedule);
  }
  const std::string prediction =
      r.string_at(schedule, "prediction_type", "schedule.prediction_type");
  if (prediction != "epsilon") {
    r.fail("unsupported prediction type", "schedule.prediction_type", "\"epsilon\"", prediction);
  }
}

void read_manifest_unet(const Reader& r, const json& root, const fs::path& dir, Manifest& m) {
  const json& unet = r.at(root, "unet", "unet");
  m.unet_blocks = read_unet_blocks(r, r.at(unet, "blocks", "unet.blocks"), dir);
  m.cross_attention_dim =
      r.positive_int_at(unet, "cross_attention_dim", "unet.cross_attention_dim");
  m.unet_config_json = r.at(unet, "config", "unet.config").dump(2);
  const json& added = r.at(unet, "added_cond", "unet.added_cond");
  if (!added.is_null()) {
    m.added_cond = AddedConditioning{
        r.positive_int_at(added, "text_embeds_dim", "unet.added_cond.text_embeds_dim"),
        r.positive_int_at(added, "time_ids_dim", "unet.added_cond.time_ids_dim")};
  }
  if ((m.family == Family::kSdxl) != m.added_cond.has_value()) {
    r.fail("added conditioning does not fit the family", "unet.added_cond",
           m.family == Family::kSdxl ? "an object for sdxl" : "null for sd15", added.dump());
  }
}

TextEncoderInfo read_text_encoder(const Reader& r, const json& e, const std::string& f,
                                  const fs::path& dir) {
  TextEncoderInfo info;
  info.name = r.string_at(e, "name", f + ".name");
  info.file = r.file_at(e, "file", f + ".file", dir);
  info.hidden_output = r.string_at(e, "hidden_output", f + ".hidden_output");
  if (info.hidden_output != "last" && info.hidden_output != "penultimate") {
    r.fail("unknown hidden output", f + ".hidden_output", "\"last\" or \"penultimate\"",
           info.hidden_output);
  }
  info.hidden_size = r.positive_int_at(e, "hidden_size", f + ".hidden_size");
  info.pooled_size = r.positive_int_at(e, "pooled_size", f + ".pooled_size");
  info.max_length = r.positive_int_at(e, "max_length", f + ".max_length");
  info.vocab_sha256 = r.string_at(e, "vocab_sha256", f + ".vocab_sha256");
  const json& empty = r.at(e, "empty_prompt_ids", f + ".empty_prompt_ids");
  if (!empty.is_array() || static_cast<int64_t>(empty.size()) != info.max_length) {
    r.fail("bad empty prompt ids", f + ".empty_prompt_ids",
           std::to_string(info.max_length) + " token ids", empty.dump());
  }
  info.empty_prompt_ids = empty.get<std::vector<int64_t>>();
  // The tokenizer folder the export copied next to the manifest; exports before it have none
  // (typed prompts and caption-only shards then ask for a re-export).
  const auto tokenizer = e.find("tokenizer");
  if (tokenizer != e.end() && !tokenizer->is_null()) {
    info.tokenizer_dir = (dir / r.string_at(e, "tokenizer", f + ".tokenizer")).string();
  }
  return info;
}

void read_manifest_text_encoders(const Reader& r, const json& root, const fs::path& dir,
                                 Manifest& m) {
  const json& encoders = r.at(root, "text_encoders", "text_encoders");
  if (!encoders.is_array() || encoders.empty()) {
    r.fail("no text encoders", "text_encoders", "a non-empty array", encoders.dump());
  }
  for (size_t i = 0; i < encoders.size(); ++i) {
    m.text_encoders.push_back(
        read_text_encoder(r, encoders[i], "text_encoders[" + std::to_string(i) + "]", dir));
  }
}

// The concatenated text embedding (its width against the encoders and the UNet) and the
// encoder whose pooled output feeds sdxl's added conditioning.
void read_manifest_text_embedding(const Reader& r, const json& root, Manifest& m) {
  const json& embedding = r.at(root, "text_embedding", "text_embedding");
  const int64_t dim = r.positive_int_at(embedding, "dim", "text_embedding.dim");
  int64_t concat_dim = 0;
  for (const TextEncoderInfo& e : m.text_encoders) concat_dim += e.hidden_size;
  if (dim != concat_dim || dim != m.cross_attention_dim) {
    r.fail("text embedding width does not add up", "text_embedding.dim",
           "sum of encoder hidden sizes = unet.cross_attention_dim = " +
               std::to_string(m.cross_attention_dim),
           std::to_string(dim) + " (encoders sum to " + std::to_string(concat_dim) + ")");
  }
  const json& pooled = r.at(embedding, "pooled_from", "text_embedding.pooled_from");
  if (!pooled.is_null()) {
    m.pooled_from = pooled.get<std::string>();
    bool found = false;
    for (const TextEncoderInfo& e : m.text_encoders) {
      if (e.name == *m.pooled_from) {
        found = true;
        if (m.added_cond && e.pooled_size != m.added_cond->text_embeds_dim) {
          r.fail("pooled width does not match the UNet", "text_embedding.pooled_from",
                 std::to_string(m.added_cond->text_embeds_dim), std::to_string(e.pooled_size));
        }
      }
    }
    if (!found)
      r.fail("pooled_from names no text encoder", "text_embedding.pooled_from", "an encoder name",
             *m.pooled_from);
  }
  if (m.added_cond && !m.pooled_from) {
    r.fail("sdxl needs a pooled embedding", "text_embedding.pooled_from", "an encoder name",
           "null");
  }
}

// Optional (export_models writes it since the latent cache was pinned to its encoders): the
// sha256 of each component file, by file name.
std::map<std::string, std::string> read_manifest_sha256(const Reader& r, const json& root) {
  std::map<std::string, std::string> out;
  if (!root.contains("sha256")) return out;
  const json& files = root.at("sha256");
  if (!files.is_object()) r.fail("wrong type", "sha256", "an object {file: sha256}", files.dump());
  for (const auto& [file, hash] : files.items()) {
    const bool hex =
        hash.is_string() && hash.get<std::string>().size() == 64 &&
        hash.get<std::string>().find_first_not_of("0123456789abcdef") == std::string::npos;
    if (!hex) r.fail("bad sha256", "sha256." + file, "64 lowercase hex digits", hash.dump());
    out[file] = hash.get<std::string>();
  }
  return out;
}

}  // namespace

const char* family_name(Family family) { return family == Family::kSd15 ? "sd15" : "sdxl"; }

Manifest load_manifest(const std::string& path) {
  const json root = parse_manifest_file(path);
  const Reader r(path);
  const fs::path dir = fs::absolute(fs::path(path)).parent_path();
  Manifest m;
  m.path = path;
  m.directory = dir.string();
  read_manifest_header(r, root, m);
  read_manifest_latent_schedule(r, root, m);
  read_manifest_unet(r, root, dir, m);
  read_manifest_text_encoders(r, root, dir, m);
  read_manifest_text_embedding(r, root, m);
  const json& vae = r.at(root, "vae", "vae");
  m.vae_encoder_file = r.file_at(vae, "encoder", "vae.encoder", dir);
  m.vae_decoder_file = r.file_at(vae, "decoder", "vae.decoder", dir);
  m.file_sha256 = read_manifest_sha256(r, root);
  return m;
}

}  // namespace dde::models
