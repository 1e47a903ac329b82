// dde_tokenize: the CLIP token ids of captions, as the pipeline's Python tokenizer gives them
// (docs/tokenizer.md).
//   dde_tokenize TOKENIZER_DIR [--max-length N] [--tokens] [--on-error stop|skip] < captions.txt
// One caption per line of stdin (lines end at '\n' only: a '\r' stays in its caption, where the
// clean-up makes it a space), one JSON array per line on stdout: max_length ids (BOS, the
// caption's tokens, EOS, padding), or with --tokens the caption's tokens as strings
// (CLIPTokenizer.tokenize). A line that is not UTF-8 is named on stderr with its line number and
// byte offset: --on-error stop (the default) ends there, after printing the lines before it;
// --on-error skip prints null in its place and goes on.
// Exit status: 0 every line tokenized; 1 an error (the tokenizer folder, a line too long, a bad
// line under stop); 2 usage; 3 done, but bad lines were skipped (counted on stderr).
#include <CLI/CLI.hpp>
#include <cstdint>
#include <exception>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dde/text/clip_tokenizer.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace {

constexpr int kExitSkipped = 3;

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string line = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) line += ", ";
    line += std::to_string(ids[i]);
  }
  return line + "]";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "dde_tokenize: CLIP token ids of captions (one per line of stdin), as the "
      "pipeline's Python CLIPTokenizer gives them"};
  std::string dir;
  int max_length = 0;
  bool tokens = false;
  std::string on_error = "stop";
  app.add_option("TOKENIZER_DIR", dir,
                 "a pipeline's tokenizer/ or tokenizer_2/ folder (vocab.json, merges.txt, ...)")
      ->required();
  app.add_option("--max-length", max_length,
                 "ids per caption (default: the folder's model_max_length, 77 for CLIP)")
      ->check(CLI::Range(2, 1 << 20));
  app.add_flag("--tokens", tokens, "print the tokens (strings) instead of padded ids");
  app.add_option("--on-error", on_error,
                 "a line that is not UTF-8: stop (default; exit 1) or skip (print null; exit 3)")
      ->check(CLI::IsMember({"stop", "skip"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  std::ios::sync_with_stdio(false);
  int64_t line_number = 0;
  int64_t skipped = 0;
  try {
    const auto tokenizer = dde::text::ClipTokenizer::load(dir);
    if (max_length == 0) max_length = tokenizer.max_length();
    if (max_length == 0 && !tokens) {
      throw dde::Error({"no model_max_length", dir + "/tokenizer_config.json",
                        "the tokenizer's length", "none", "pass --max-length (77 for CLIP)"});
    }
    std::string caption;
    while (dde::util::read_line(std::cin, caption, dde::util::kMaxCaptionBytes,
                                "stdin line " + std::to_string(line_number + 1))) {
      ++line_number;
      try {
        if (tokens) {
          std::cout << nlohmann::json(tokenizer.tokenize(caption)).dump() << '\n';
        } else {
          std::cout << ids_json(tokenizer.encode(caption, max_length)) << '\n';
        }
      } catch (const dde::text::InvalidUtf8Error& e) {
        std::cerr << "dde_tokenize: line " << line_number << ": " << e.what() << '\n';
        if (on_error == "stop") {
          std::cout.flush();
          return 1;
        }
        std::cout << "null\n";
        ++skipped;
      }
    }
    std::cout.flush();
    if (skipped > 0) {
      std::cerr << "dde_tokenize: " << skipped << " of " << line_number
                << " lines were not UTF-8 (printed as null)\n";
      return kExitSkipped;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << "dde_tokenize: error: " << e.what() << '\n';
  }
  return 1;
}
