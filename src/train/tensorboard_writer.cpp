#include "dde/train/tensorboard_writer.hpp"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "dde/util/error.hpp"

namespace dde::train {
namespace {

std::array<uint32_t, 256> crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1U) != 0 ? 0x82F63B78U ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

// Protobuf wire format, the few pieces an Event needs.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
template <typename T>
void fixed(std::string& out, T v) {  // little-endian, as on every platform we build for
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));
  out.append(bytes, sizeof(T));
}
void length_delimited(std::string& out, uint32_t field, const std::string& payload) {
  varint(out, (field << 3) | 2);
  varint(out, payload.size());
  out += payload;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string event_header(double wall_time, int64_t step) {
  std::string e;
  varint(e, (1 << 3) | 1);  // wall_time: double
  fixed(e, wall_time);
  varint(e, (2 << 3) | 0);  // step: int64
  varint(e, static_cast<uint64_t>(step));
  return e;
}

}  // namespace

uint32_t crc32c(const std::string& bytes) {
  static const std::array<uint32_t, 256> table = crc_table();
  uint32_t c = 0xFFFFFFFFU;
  for (const char ch : bytes) c = table[(c ^ static_cast<uint8_t>(ch)) & 0xFFU] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

uint32_t masked_crc32c(const std::string& bytes) {
  const uint32_t c = crc32c(bytes);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8U;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  char host[256] = "host";
  gethostname(host, sizeof(host) - 1);
  const auto seconds = static_cast<int64_t>(now_seconds());
  path_ = (std::filesystem::path(dir) /
           ("events.out.tfevents." + std::to_string(seconds) + "." + host + ".dde"))
              .string();
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) {
    throw Error({"cannot write TensorBoard events", path_, "a writable file",
                 ec ? ec.message() : std::string("open failed"),
                 "check the run folder, or set logging.tensorboard: false"});
  }
  std::string e = event_header(now_seconds(), 0);
  length_delimited(e, 3, "brain.Event:2");  // file_version
  write_record(e);
  flush();
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  std::string v;
  length_delimited(v, 1, tag);  // Summary.Value.tag
  varint(v, (2 << 3) | 5);      // simple_value: float
  fixed(v, static_cast<float>(value));
  std::string summary;
  length_delimited(summary, 1, v);  // Summary.value
  std::string e = event_header(now_seconds(), step);
  length_delimited(e, 5, summary);  // Event.summary
  write_record(e);
}

void TensorBoardWriter::add_image(const std::string& tag, const std::string& png, int64_t height,
                                  int64_t width, int64_t step) {
  std::string image;
  varint(image, (1 << 3) | 0);  // Summary.Image.height
  varint(image, static_cast<uint64_t>(height));
  varint(image, (2 << 3) | 0);  // width
  varint(image, static_cast<uint64_t>(width));
  varint(image, (3 << 3) | 0);  // colorspace: 3 = RGB
  varint(image, 3);
  length_delimited(image, 4, png);  // encoded_image_string
  std::string v;
  length_delimited(v, 1, tag);    // Summary.Value.tag
  length_delimited(v, 4, image);  // Summary.Value.image
  std::string summary;
  length_delimited(summary, 1, v);
  std::string e = event_header(now_seconds(), step);
  length_delimited(e, 5, summary);
  write_record(e);
  flush();
}

void TensorBoardWriter::write_record(const std::string& event) {
  std::string header;
  fixed(header, static_cast<uint64_t>(event.size()));
  std::string frame = header;
  fixed(frame, masked_crc32c(header));
  frame += event;
  fixed(frame, masked_crc32c(event));
  out_.write(frame.data(), static_cast<std::streamsize>(frame.size()));
}

void TensorBoardWriter::flush() { out_.flush(); }

}  // namespace dde::train
