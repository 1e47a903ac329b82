// ClipTokenizer::load: the four files of a tokenizer folder, read as
// CLIPTokenizer.from_pretrained reads them (transformers 4.57: tokenization_clip.py and
// tokenization_utils_base.py's _from_pretrained), and checked: a malformed file names itself.
#include <unicode/utf8.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dde/text/clip_tokenizer.hpp"
#include "dde/text/text_cleanup.hpp"
#include "dde/text/utf8.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::text {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kCopyAgain =
    "copy the folder again from the pipeline (its tokenizer/ or tokenizer_2/)";
// CLIPTokenizer reads merges.txt's lines [1, 49152 - 256 - 2 + 1): the header, then at most the
// 48,894 merges of CLIP's 49,408-token vocabulary (256 bytes twice, the merges, 2 specials).
constexpr std::size_t kMaxMerges = 49152 - 256 - 2;
// model_max_length above this is transformers' "no limit" (it writes 1e30).
constexpr int64_t kMaxModelLength = 1 << 20;

// The 1-based line of byte `offset` in `text`.
std::size_t line_of(std::string_view text, std::size_t offset) {
  return 1 + static_cast<std::size_t>(std::count(text.begin(), text.begin() + offset, '\n'));
}

std::string read_utf8_file(const fs::path& path, const std::string& what) {
  std::string text =
      util::read_text_file(path.string(), util::kMaxTokenizerFileBytes, what,
                           "a CLIP tokenizer file is a few MB: " + std::string(kCopyAgain));
  if (const auto bad = find_invalid_utf8(text)) {
    throw Error({what + " is not UTF-8",
                 path.string() + ":" + std::to_string(line_of(text, *bad)) + " (byte " +
                     std::to_string(*bad) + ")",
                 "UTF-8 text", hex_bytes(text, *bad), kCopyAgain});
  }
  return text;
}

json read_json_file(const fs::path& path, const std::string& what) {
  const std::string text = read_utf8_file(path, what);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error({what + " is not valid JSON",
                 path.string() + " (byte " + std::to_string(e.byte) + ")", "JSON", e.what(),
                 kCopyAgain});
  }
}

// vocab.json: {token: id}.
std::unordered_map<std::string, int32_t> read_vocab(const fs::path& path) {
  const json vocab = read_json_file(path, "vocab.json");
  if (!vocab.is_object() || vocab.empty()) {
    throw Error({"vocab.json is not a vocabulary", path.string(), "a JSON object of token -> id",
                 vocab.is_object() ? "an empty object" : vocab.type_name(), kCopyAgain});
  }
  std::unordered_map<std::string, int32_t> ids;
  ids.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw Error({"vocab.json has a bad id", path.string() + ": token " + json(token).dump(),
                   "an integer id in [0, 2^31)", id.dump(), kCopyAgain});
    }
    ids.emplace(token, id.get<int32_t>());
  }
  return ids;
}

// The words of one merges.txt line, split at runs of whitespace (Python's str.split()).
std::vector<std::string_view> split_on_space(std::string_view line) {
  std::vector<std::string_view> words;
  const auto* data = reinterpret_cast<const uint8_t*>(line.data());
  const auto length = static_cast<int32_t>(line.size());
  int32_t i = 0;
  int32_t word_start = -1;
  while (i < length) {
    const int32_t at = i;
    UChar32 c = 0;
    U8_NEXT(data, i, length, c);
    const bool space = is_python_space(static_cast<char32_t>(c));
    if (!space && word_start < 0) word_start = at;
    if (space && word_start >= 0) {
      words.push_back(line.substr(word_start, at - word_start));
      word_start = -1;
    }
  }
  if (word_start >= 0) words.push_back(line.substr(word_start));
  return words;
}

// merges.txt: "#version: 0.2", then one "first second" per line, most frequent first.
// CLIPTokenizer reads it as text (universal newlines), strips it, and ranks the merges of
// lines [1, 1 + kMaxMerges) in order (a repeated merge keeps its later rank, as a dict does).
std::unordered_map<std::string, int32_t> read_merges(
    const fs::path& path, const std::unordered_map<std::string, int32_t>& vocab) {
  const std::string raw = read_utf8_file(path, "merges.txt");
  std::string text;  // "\r\n" and "\r" read as "\n", as Python's text mode does
  text.reserve(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == '\r' && i + 1 < raw.size() && raw[i + 1] == '\n') continue;
    text.push_back(raw[i] == '\r' ? '\n' : raw[i]);
  }
  const std::string_view body = python_strip(text, true, true);
  if (body.empty()) {
    throw Error({"merges.txt is empty", path.string(), "a \"#version\" line, then the merges",
                 "no text", kCopyAgain});
  }
  const std::size_t first_line = line_of(text, static_cast<std::size_t>(body.data() - text.data()));
  std::unordered_map<std::string, int32_t> ranks;
  std::size_t start = 0;
  for (std::size_t index = 0; start <= body.size() && index <= kMaxMerges; ++index) {
    std::size_t end = body.find('\n', start);
    if (end == std::string_view::npos) end = body.size();
    const std::string_view line = body.substr(start, end - start);
    start = end + 1;
    if (index == 0) continue;  // the "#version" header
    const std::string where = path.string() + ":" + std::to_string(first_line + index);
    const std::vector<std::string_view> symbols = split_on_space(line);
    if (symbols.size() != 2) {
      throw Error({"merges.txt has a line that is not a merge", where,
                   "two symbols separated by a space", json(std::string(line)).dump(), kCopyAgain});
    }
    const std::string merged = std::string(symbols[0]) + std::string(symbols[1]);
    if (vocab.count(merged) == 0) {
      throw Error({"merges.txt and vocab.json are not a pair", where,
                   "vocab.json to hold the merge's result " + json(merged).dump(), "no such token",
                   "use the vocab.json and merges.txt of one tokenizer folder; " +
                       std::string(kCopyAgain)});
    }
    ranks[std::string(symbols[0]) + " " + std::string(symbols[1])] =
        static_cast<int32_t>(index - 1);
  }
  return ranks;
}

std::optional<json> read_optional_json(const fs::path& path, const std::string& what) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::nullopt;
  json value = read_json_file(path, what);
  if (!value.is_object()) {
    throw Error({what + " is not a JSON object", path.string(), "an object", value.type_name(),
                 kCopyAgain});
  }
  return value;
}

bool flag(const json& entry, const char* key, const std::string& where) {
  if (!entry.contains(key) || entry[key].is_null()) return false;
  if (!entry[key].is_boolean()) {
    throw Error({std::string("bad ") + key, where, "true or false", entry[key].dump(), kCopyAgain});
  }
  return entry[key].get<bool>();
}

// An AddedToken as transformers serialises it: "content", or {"content": ..., "lstrip": ...}.
AddedToken parse_added_token(const json& value, const std::string& where) {
  AddedToken token;
  if (value.is_string()) {
    token.content = value.get<std::string>();
    return token;
  }
  if (!value.is_object() || !value.contains("content") || !value["content"].is_string()) {
    throw Error(
        {"bad token", where, "a string or {\"content\": string, ...}", value.dump(), kCopyAgain});
  }
  token.content = value["content"].get<std::string>();
  token.lstrip = flag(value, "lstrip", where);
  token.rstrip = flag(value, "rstrip", where);
  if (flag(value, "single_word", where)) {
    throw Error({"single_word added tokens are not supported", where,
                 "\"single_word\": false (CLIP's tokens)", "true",
                 "tokenize with the Python tokenizer, or report the pipeline"});
  }
  return token;
}

}  // namespace

InvalidUtf8Error::InvalidUtf8Error(std::string_view caption, std::size_t byte_offset)
    : Error({"caption is not UTF-8",
             "byte " + std::to_string(byte_offset) + " of " + std::to_string(caption.size()),
             "UTF-8 text", hex_bytes(caption, byte_offset),
             "re-encode the caption as UTF-8, or drop it"}),
      byte_offset_(byte_offset) {}

ClipTokenizer ClipTokenizer::load(const std::string& dir) {
  const fs::path root(dir);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    throw Error({"not a tokenizer folder", dir, "a folder with vocab.json and merges.txt",
                 ec ? ec.message() : "no such folder",
                 "pass a pipeline's tokenizer/ or tokenizer_2/ folder (or an export's copy)"});
  }
  ClipTokenizer tokenizer;
  tokenizer.dir_ = dir;
  tokenizer.vocab_ = read_vocab(root / "vocab.json");
  tokenizer.merge_ranks_ = read_merges(root / "merges.txt", tokenizer.vocab_);

  // tokenizer_config.json; without added_tokens_decoder (the older format) the special tokens
  // of special_tokens_map.json take precedence over its own (_from_pretrained).
  const fs::path config_path = root / "tokenizer_config.json";
  const fs::path map_path = root / "special_tokens_map.json";
  json config = read_optional_json(config_path, "tokenizer_config.json").value_or(json::object());
  std::unordered_map<std::string, std::string> source;  // key -> the file it came from
  for (const auto& item : config.items()) source[item.key()] = config_path.string();
  if (config.contains("added_tokens_decoder")) {
    const json& decoder = config["added_tokens_decoder"];
    const std::string where = config_path.string() + ": added_tokens_decoder";
    if (!decoder.is_object()) {
      throw Error({"bad added_tokens_decoder", where, "an object of id -> token",
                   decoder.type_name(), kCopyAgain});
    }
    for (const auto& [id_text, entry] : decoder.items()) {
      AddedToken token = parse_added_token(entry, where + "." + id_text);
      std::size_t parsed = 0;
      int64_t id = -1;
      try {
        id = std::stoll(id_text, &parsed);
      } catch (const std::exception&) {
        parsed = 0;
      }
      if (parsed != id_text.size() || id < 0 || id > std::numeric_limits<int32_t>::max()) {
        throw Error(
            {"bad added token id", where, "an integer id", json(id_text).dump(), kCopyAgain});
      }
      token.id = static_cast<int32_t>(id);
      tokenizer.added_tokens_.push_back(std::move(token));
    }
  } else if (const auto map = read_optional_json(map_path, "special_tokens_map.json")) {
    for (const auto& item : map->items()) {
      config[item.key()] = item.value();
      source[item.key()] = map_path.string();
    }
  }

  // The special tokens (CLIPTokenizer's defaults where neither file names one) are added
  // tokens too, with their vocabulary ids when not among added_tokens_decoder.
  const auto add_special = [&](const json& value, const std::string& where) -> std::string {
    AddedToken token = parse_added_token(value, where);
    const auto same = [&token](const AddedToken& t) { return t.content == token.content; };
    if (std::none_of(tokenizer.added_tokens_.begin(), tokenizer.added_tokens_.end(), same)) {
      const auto found = tokenizer.vocab_.find(token.content);
      if (found == tokenizer.vocab_.end()) {
        throw Error({"special token not in vocab.json", where, "a token of vocab.json",
                     json(token.content).dump(), kCopyAgain});
      }
      token.id = found->second;
      tokenizer.added_tokens_.push_back(token);
    }
    return token.content;
  };
  const auto special = [&](const char* key, const char* fallback) -> std::string {
    if (!config.contains(key)) return add_special(json(fallback), std::string("default ") + key);
    const std::string where = source[key] + ": " + key;
    if (config[key].is_null()) {
      throw Error({std::string("no ") + key, where, "a token (CLIP pads, and needs BOS and EOS)",
                   "null", kCopyAgain});
    }
    return add_special(config[key], where);
  };
  const std::string unk = special("unk_token", "<|endoftext|>");
  const std::string bos = special("bos_token", "<|startoftext|>");
  const std::string eos = special("eos_token", "<|endoftext|>");
  const std::string pad = special("pad_token", "<|endoftext|>");
  if (config.contains("additional_special_tokens") &&
      !config["additional_special_tokens"].is_null()) {
    const json& extra = config["additional_special_tokens"];
    const std::string where = source["additional_special_tokens"] + ": additional_special_tokens";
    if (!extra.is_array()) {
      throw Error({"bad additional_special_tokens", where, "a list of tokens", extra.type_name(),
                   kCopyAgain});
    }
    for (const json& value : extra) add_special(value, where);
  }
  tokenizer.unk_id_ = tokenizer.token_id(unk);  // an added token: resolved before unk_id_ is used
  tokenizer.bos_id_ = tokenizer.token_id(bos);
  tokenizer.eos_id_ = tokenizer.token_id(eos);
  tokenizer.pad_id_ = tokenizer.token_id(pad);

  if (config.contains("model_max_length") && !config["model_max_length"].is_null()) {
    const json& length = config["model_max_length"];
    const std::string where = source["model_max_length"] + ": model_max_length";
    if (!length.is_number() || length.get<double>() < 2) {
      throw Error(
          {"bad model_max_length", where, "a number of tokens >= 2", length.dump(), kCopyAgain});
    }
    if (length.is_number_integer() && length.get<int64_t>() <= kMaxModelLength) {
      tokenizer.max_length_ = static_cast<int>(length.get<int64_t>());
    }
  }
  return tokenizer;
}

}  // namespace dde::text
