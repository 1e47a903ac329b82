// dde_encode_cache: encodes the shards of a training config's data.index once with the frozen VAE
// and text encoders of its model.manifest, into a latent cache that data.cache trains from.
//   dde_encode_cache --config FILE [--set key=value ...] --out DIR [--dtype fp32|bf16|fp16]
//                    [--batch PAIRS]
// Exit status: 0 done, 1 error (message logged), 2 usage.
#include <CLI/CLI.hpp>
#include <exception>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/pairs/cache_encoder.hpp"
#include "dde/util/error.hpp"
#include "dde/util/exception_report.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/log.hpp"

int main(int argc, char** argv) {
  dde::util::ignore_file_size_signal();  // a file over `ulimit -f` is a named write error
  CLI::App app{"dde_encode_cache: the latent cache of a training config's shards"};
  std::string config_path;
  std::vector<std::string> overrides;
  dde::pairs::CacheEncodeOptions options;
  app.add_option("--config", config_path, "YAML training config (model.*, data.*, run.device)")
      ->required();
  app.add_option("--set", overrides, "override a config value (repeatable)");
  app.add_option("--out", options.out_dir, "cache folder to create (must not exist)")->required();
  app.add_option("--dtype", options.dtype, "stored dtype: fp32 (default) | bf16 | fp16")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  app.add_option("--batch", options.batch,
                 "pairs per encoder call (default 4; 4 images each, decoded in parallel)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    const dde::config::TrainConfig config = dde::config::load_config(config_path, overrides);
    const dde::pairs::CacheEncodeReport r = dde::pairs::encode_latent_cache(config, options);
    dde::log::info("latent cache {}: {} shards, {} pairs ({} bad), {} bytes, {} bytes per pair",
                   r.index_path, r.shards, r.pairs, r.bad_pairs, r.bytes, r.bytes_per_pair);
    dde::log::flush();
    return 0;
  } catch (const dde::Error& e) {
    dde::log::error("{}", e.what());
  } catch (const std::exception& e) {
    dde::log::error("{}", dde::util::describe_exception(e));
  }
  dde::log::flush();
  return 1;
}
