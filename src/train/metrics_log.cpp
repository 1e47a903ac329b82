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

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
}

}  // namespace dde::train
