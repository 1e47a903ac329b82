// TensorBoard event files (logging.tensorboard): scalars written as TensorBoard's own writer
// writes them, so `tensorboard --logdir RUN` shows the curves live. The format: TFRecord framing
// (length, masked CRC-32C of the length, an Event protobuf, its masked CRC-32C) of Event messages
// {wall_time, step, summary {value {tag, simple_value}}}; the first record is the file version.
// Tested against the tensorboard package's own reader (tests/e2e/test_tensorboard.py).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace dde::train {

class TensorBoardWriter {
 public:
  // A new events.out.tfevents.<seconds>.<host>.dde file in `dir` (created if needed).
  explicit TensorBoardWriter(const std::string& dir);
  void add_scalar(const std::string& tag, double value, int64_t step);
  // An RGB image (Summary.Image: height, width, colorspace 3, the encoded PNG).
  void add_image(const std::string& tag, const std::string& png, int64_t height, int64_t width,
                 int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

// CRC-32C (Castagnoli), as TFRecord frames use it, and its masked form.
uint32_t crc32c(const std::string& bytes);
uint32_t masked_crc32c(const std::string& bytes);

}  // namespace dde::train
