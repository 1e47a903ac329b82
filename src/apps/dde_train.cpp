// dde_train: fine-tunes a Stable Diffusion UNet on preference pairs (DDE and baselines).
//   dde_train --config FILE [--set key=value ...] [--resume | --overwrite] [--dry-run]
//   dde_train --config-reference   (every config key as markdown: docs/config.md)
// Exit status: 0 done, 1 error (message logged), 2 usage, 3 stopped by SIGTERM/SIGUSR1/SIGINT
// after checkpointing the last complete step (requeue and --resume).
#include <CLI/CLI.hpp>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/train/stop_signal.hpp"
#include "dde/train/trainer.hpp"
#include "dde/util/error.hpp"
#include "dde/util/exception_report.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/log.hpp"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

// --config-reference prints docs/config.md and exits 0. A callback, as --version's: it runs before
// --config's requirement is checked.
void add_config_reference_flag(CLI::App& app) {
  app.add_flag_callback(
      "--config-reference",
      [] {
        std::cout << dde::config::config_reference_markdown();
        throw CLI::Success();
      },
      "print every config key (type, default, allowed values) as markdown and exit");
}

}  // namespace

int main(int argc, char** argv) {
  // First thing: a preemption signal that arrives while the models load must not kill the rank.
  dde::train::install_stop_signal_handlers();
  dde::util::ignore_file_size_signal();  // a file over `ulimit -f` is a named write error
  CLI::App app{
      "dde_train: preference fine-tuning of Stable Diffusion by Denoised Distribution Estimation"};
  std::string config_path;
  std::vector<std::string> overrides;
  dde::train::StartOptions start;
  bool dry_run = false;
  app.add_option("--config", config_path, "YAML training config (see configs/)")->required();
  app.add_option("--set", overrides,
                 "override a config value, e.g. --set optim.lr=1e-5 (repeatable)");
  CLI::Option* resume = app.add_flag(
      "--resume", start.resume, "continue from the newest complete checkpoint in run.output_dir");
  app.add_flag("--overwrite", start.overwrite,
               "start afresh in a run.output_dir that holds checkpoints: deletes its checkpoints/ "
               "and metrics.jsonl first (without it, or --resume, such a folder is refused)")
      ->excludes(resume);
  app.add_flag("--dry-run", dry_run, "validate the config, print it and exit");
  add_config_reference_flag(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }

  try {
    dde::config::TrainConfig config = dde::config::load_config(config_path, overrides);
    dde::config::check_input_files(config);  // every named input exists (with --dry-run too)
    if (dry_run) {
      dde::log::info("config {} is valid and its input files exist:\n{}", config_path,
                     dde::config::to_yaml(config));
      return kExitOk;
    }
    dde::train::check_output_dir(config, start);  // before the models load: fail fast
    dde::train::Trainer trainer(std::move(config), start);
    const dde::train::TrainOutcome outcome = trainer.run();
    if (outcome.preempted) {
      dde::log::flush();
      return dde::train::kExitRequeue;
    }
    dde::log::info("done: {} steps ({} skipped); last checkpoint {}", outcome.steps_done,
                   outcome.skipped_steps, outcome.last_checkpoint);
    dde::log::flush();
    return kExitOk;
  } catch (const dde::Error& e) {
    dde::log::error("{}", e.what());
  } catch (const std::exception& e) {
    dde::log::error("{}", dde::util::describe_exception(e));
  }
  dde::log::flush();
  return kExitError;
}
