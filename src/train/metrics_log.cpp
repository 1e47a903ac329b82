#include "dde/train/metrics_log.hpp"

#include <filesystem>
#include <sstream>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/util/error.hpp"

namespace dde::train {

MetricsLog::MetricsLog(std::string path, int64_t keep_through_step) : path_(std::move(path)) {
  if (keep_through_step >= 0 && std::filesystem::exists(path_)) {
    std::istringstream in(checkpoint::read_text_file(path_));
    std::string kept;
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded()) break;  // a line cut by a crash ends the usable log
      const int64_t step = record.value("step", int64_t{0});
      // The resumed run evaluates its first step again (top of the loop): drop that eval record.
      const bool redone = step == keep_through_step && record.value("kind", "") == "eval";
      if (step <= keep_through_step && !redone) kept += line + "\n";
    }
    checkpoint::write_file_atomic(path_, kept);
    out_.open(path_, std::ios::app);
  } else {
    out_.open(path_, std::ios::trunc);
  }
  if (!out_)
    throw Error(
        {"cannot open metrics log", path_, "a writable file", "", "check the run directory"});
}

void MetricsLog::enable_tensorboard(const std::string& dir) {
  tensorboard_ = std::make_unique<TensorBoardWriter>(dir);
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
  if (!tensorboard_) return;
  const std::string kind = record.value("kind", "");
  if (kind != "step" && kind != "eval") return;
  const int64_t step = record.value("step", int64_t{0});
  const std::string prefix = kind == "step" ? "train/" : "eval/";
  for (const auto& [key, value] : record.items()) {
    if (key != "step" && value.is_number()) {
      tensorboard_->add_scalar(prefix + key, value.get<double>(), step);
    }
  }
  if (kind == "eval" && record.contains("t_bins") && record.contains("implicit_acc_by_t")) {
    const auto& bins = record["t_bins"];
    const auto& acc = record["implicit_acc_by_t"];
    for (size_t j = 0; j < bins.size() && j < acc.size(); ++j) {
      tensorboard_->add_scalar("eval/implicit_acc_t" + std::to_string(bins[j].get<int64_t>()),
                               acc[j].get<double>(), step);
    }
  }
  tensorboard_->flush();
}

}  // namespace dde::train
