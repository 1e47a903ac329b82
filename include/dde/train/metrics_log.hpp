// metrics.jsonl: one JSON object per line, appended and flushed as training goes.
// On resume the records of steps after the checkpoint are dropped first, so a resumed
// run's file equals an uninterrupted run's (timing fields aside).
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "dde/train/tensorboard_writer.hpp"

namespace dde::train {

class MetricsLog {
 public:
  // keep_through_step < 0: start a new file; otherwise keep records with step <= it, except the
  // held-out evaluation (kind "eval") of that step, which the resumed run writes again.
  MetricsLog(std::string path, int64_t keep_through_step);
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }
  // Also writes the numbers of every step and eval record as TensorBoard scalars into `dir`
  // (train/<key>, eval/<key>, and per t bin of an eval record eval/<figure>_t<t> for each of
  // its <figure>_by_t lists: implicit accuracy, loss, delta, misranked, credit, z; and per
  // bin k of a step record's t_bins train/<figure>_bin<k>: misranked, credit, z).
  void enable_tensorboard(const std::string& dir);
  // A PNG to TensorBoard (nothing without enable_tensorboard): the validation grids.
  void add_image(const std::string& tag, const std::string& png, int64_t height, int64_t width,
                 int64_t step);

 private:
  std::string path_;
  std::ofstream out_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
};

}  // namespace dde::train
