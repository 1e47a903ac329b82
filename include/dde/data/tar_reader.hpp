// Streaming reader of POSIX ustar archives (the shard format, docs/formats.md section 2).
// Members are visited in file order; a member's data is either read or skipped with a seek,
// so scanning the headers and small members of a shard never reads the JPEG bytes.
// Anything outside plain ustar regular files is an error that names the member and offset.
#pragma once

#include <cstdint>
#include <fstream>
#include <optional>
#include <string>

namespace dde::data {

inline constexpr int64_t kTarBlockSize = 512;

struct TarMember {
  std::string name;           // prefix + "/" + name when the ustar prefix field is used
  int64_t index = 0;          // 0-based position of the member in the archive
  int64_t header_offset = 0;  // byte offset of the 512-byte header
  int64_t data_offset = 0;    // byte offset of the first data byte
  int64_t size = 0;           // data bytes (without padding)
};

class TarReader {
 public:
  explicit TarReader(std::string path);

  // Header of the next member, or nullopt at the end-of-archive marker. Data of the previous
  // member that was not read is skipped.
  std::optional<TarMember> next();
  // Data of the member last returned by next(); at most once per member.
  std::string read_data();
  // Seeks past the data of the member last returned by next() without reading it.
  void skip_data();

  const std::string& path() const { return path_; }
  int64_t file_size() const { return file_size_; }

 private:
  std::string path_;
  std::ifstream file_;
  int64_t file_size_ = 0;
  int64_t next_header_offset_ = 0;  // where the header after the current member starts
  int64_t members_seen_ = 0;
  std::optional<TarMember> current_;
  bool data_consumed_ = true;
};

// Reads `size` bytes at `offset` of `file` (opened on `path`, named in errors); used to fetch
// a member's data located earlier by TarReader.
std::string read_file_range(std::ifstream& file, const std::string& path, int64_t offset,
                            int64_t size);

}  // namespace dde::data
