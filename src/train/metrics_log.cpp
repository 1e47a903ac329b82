#include "dde/train/metrics_log.hpp"

#include <filesystem>
#include <fstream>

#include "dde/checkpoint/checkpoint_store.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::train {

MetricsLog::MetricsLog(std::string path, int64_t keep_through_step) : path_(std::move(path)) {
  if (keep_through_step >= 0 && std::filesystem::exists(path_)) {
    std::ifstream in(path_, std::ios::binary);
    if (!in) throw Error({"cannot read metrics log", path_, "a readable file", "", ""});
    std::string kept;
    std::string line;
    // Line by line, each bounded: a damaged log cannot make the resume allocate its size.
    while (util::read_line(in, line, util::kMaxMetricsLineBytes, path_)) {
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
  if (kind == "step" && record.contains("t_bins") && record["t_bins"].is_object()) {
    // train/<figure>_bin<k>: the step's misranked fraction, credit and z in bin k of 10 over t.
    for (const auto& [figure, values] : record["t_bins"].items()) {
      if (figure == "pairs" || !values.is_array()) continue;
      for (size_t k = 0; k < values.size(); ++k) {
        if (values[k].is_number()) {
          tensorboard_->add_scalar("train/" + figure + "_bin" + std::to_string(k),
                                   values[k].get<double>(), step);
        }
      }
    }
  }
  if (kind == "eval" && record.contains("t_bins")) {
    const auto& bins = record["t_bins"];
    const std::string suffix = "_by_t";
    for (const auto& [key, values] : record.items()) {
      if (!values.is_array() || key.size() <= suffix.size() ||
          key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) {
        continue;
      }
      const std::string figure = key.substr(0, key.size() - suffix.size());
      for (size_t j = 0; j < bins.size() && j < values.size(); ++j) {
        if (!values[j].is_number()) continue;  // null where a bin has no pair
        tensorboard_->add_scalar("eval/" + figure + "_t" + std::to_string(bins[j].get<int64_t>()),
                                 values[j].get<double>(), step);
      }
    }
  }
  tensorboard_->flush();
}

void MetricsLog::add_image(const std::string& tag, const std::string& png, int64_t height,
                           int64_t width, int64_t step) {
  if (tensorboard_) tensorboard_->add_image(tag, png, height, width, step);
}

}  // namespace dde::train
