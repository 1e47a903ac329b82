#include "dde/data/tar_reader.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <utility>

#include "dde/data/data_error.hpp"
#include "dde/util/error.hpp"

namespace dde::data {
namespace {

// ustar header layout (POSIX.1-1988): offsets and lengths of the fields we read.
constexpr int kNameOffset = 0, kNameLength = 100;
constexpr int kSizeOffset = 124, kSizeLength = 12;
constexpr int kChecksumOffset = 148, kChecksumLength = 8;
constexpr int kTypeflagOffset = 156;
constexpr int kMagicOffset = 257;  // "ustar\0" then version "00"
constexpr int kPrefixOffset = 345, kPrefixLength = 155;

constexpr const char* kHint = "re-export the shards with dde_tools.export_pickapic (plain ustar)";

using Block = std::array<unsigned char, kTarBlockSize>;

std::string field_string(const Block& block, int offset, int length) {
  const char* begin = reinterpret_cast<const char*>(block.data()) + offset;
  return std::string(begin, strnlen(begin, static_cast<size_t>(length)));
}

// Octal number field: optional leading spaces, octal digits, then NUL or space padding.
std::optional<int64_t> parse_octal(const Block& block, int offset, int length) {
  int i = offset;
  const int end = offset + length;
  while (i < end && block[i] == ' ') {
    ++i;
  }
  int64_t value = 0;
  int digits = 0;
  for (; i < end && block[i] >= '0' && block[i] <= '7'; ++i, ++digits) {
    value = value * 8 + (block[i] - '0');
  }
  for (; i < end; ++i) {
    if (block[i] != ' ' && block[i] != '\0') {
      return std::nullopt;
    }
  }
  if (digits == 0) {
    return std::nullopt;
  }
  return value;
}

std::string printable_field(const Block& block, int offset, int length) {
  std::string out;
  for (int i = offset; i < offset + length; ++i) {
    const unsigned char c = block[i];
    if (c >= 32 && c < 127) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  return out;
}

std::string typeflag_name(char flag) {
  switch (flag) {
    case '1':
      return "hard link";
    case '2':
      return "symbolic link";
    case '3':
      return "character device";
    case '4':
      return "block device";
    case '5':
      return "directory";
    case '6':
      return "FIFO";
    case '7':
      return "contiguous file";
    case 'x':
      return "pax extended header";
    case 'g':
      return "pax global header";
    case 'L':
      return "GNU long name";
    case 'K':
      return "GNU long link name";
    default:
      return "unknown type";
  }
}

bool is_zero_block(const Block& block) {
  return std::all_of(block.begin(), block.end(), [](unsigned char c) { return c == 0; });
}

std::string tar_member_where(const std::string& path, const TarMember& member) {
  return fmt::format("{}: member {} '{}' at offset {}", path, member.index,
                     escape_preview(member.name, 100), member.header_offset);
}

// The member a header at `offset` describes, but its size.
TarMember header_member(const Block& block, int64_t index, int64_t offset) {
  TarMember member;
  member.index = index;
  member.header_offset = offset;
  member.data_offset = offset + kTarBlockSize;
  member.name = field_string(block, kNameOffset, kNameLength);
  const std::string prefix = field_string(block, kPrefixOffset, kPrefixLength);
  if (!prefix.empty()) {
    member.name = prefix + "/" + member.name;
  }
  return member;
}

// The header's checksum, magic and type: a regular file of a POSIX ustar archive.
void check_tar_header(const Block& block, const std::string& path, const TarMember& member) {
  const std::optional<int64_t> stored_checksum =
      parse_octal(block, kChecksumOffset, kChecksumLength);
  int64_t unsigned_sum = 0;
  int64_t signed_sum = 0;  // some old writers summed signed chars
  for (int i = 0; i < kTarBlockSize; ++i) {
    const bool in_field = i >= kChecksumOffset && i < kChecksumOffset + kChecksumLength;
    const unsigned char c = in_field ? ' ' : block[i];
    unsigned_sum += c;
    signed_sum += static_cast<signed char>(c);
  }
  if (!stored_checksum || (*stored_checksum != unsigned_sum && *stored_checksum != signed_sum)) {
    throw Error({"tar header checksum mismatch", tar_member_where(path, member),
                 fmt::format("{}", unsigned_sum),
                 stored_checksum
                     ? fmt::format("{}", *stored_checksum)
                     : "'" + printable_field(block, kChecksumOffset, kChecksumLength) + "'",
                 "the shard is corrupt: " + std::string(kHint)});
  }
  if (std::memcmp(block.data() + kMagicOffset,
                  "ustar\0"
                  "00",
                  8) != 0) {
    throw Error({"not a POSIX ustar header", tar_member_where(path, member),
                 "magic 'ustar\\x00' version '00'",
                 "'" + printable_field(block, kMagicOffset, 8) + "'", kHint});
  }
  const char typeflag = static_cast<char>(block[kTypeflagOffset]);
  if (typeflag != '0' && typeflag != '\0') {
    throw Error({"tar member is not a regular file", tar_member_where(path, member),
                 "typeflag '0' (regular file)",
                 fmt::format("typeflag '{}' ({})", typeflag, typeflag_name(typeflag)), kHint});
  }
}

// The member's size field, checked against the end of the file.
int64_t tar_member_size(const Block& block, const std::string& path, const TarMember& member,
                        int64_t file_size) {
  if (block[kSizeOffset] & 0x80) {
    throw Error({"unsupported tar size encoding", tar_member_where(path, member), "octal size",
                 "GNU base-256 size", kHint});
  }
  const std::optional<int64_t> size = parse_octal(block, kSizeOffset, kSizeLength);
  if (!size) {
    throw Error({"bad tar size field", tar_member_where(path, member), "octal digits",
                 "'" + printable_field(block, kSizeOffset, kSizeLength) + "'", kHint});
  }
  if (member.data_offset + *size > file_size) {
    throw Error({"tar file truncated inside a member", tar_member_where(path, member),
                 fmt::format("{} data bytes from offset {}", *size, member.data_offset),
                 fmt::format("file ends at offset {}", file_size), kHint});
  }
  return *size;
}

}  // namespace

TarReader::TarReader(std::string path) : path_(std::move(path)) {
  file_.open(path_, std::ios::binary);
  if (!file_) {
    throw Error({"cannot open tar file", path_, "", std::strerror(errno),
                 "check the path and permissions"});
  }
  file_.seekg(0, std::ios::end);
  file_size_ = static_cast<int64_t>(file_.tellg());
  file_.seekg(0, std::ios::beg);
}

std::optional<TarMember> TarReader::next() {
  current_.reset();
  data_consumed_ = true;
  const int64_t offset = next_header_offset_;
  if (offset == file_size_) {
    throw Error({"tar file truncated",
                 fmt::format("{}: offset {} (after {} members)", path_, offset, members_seen_),
                 "a header or the end-of-archive marker", "end of file", kHint});
  }
  if (offset + kTarBlockSize > file_size_) {
    throw Error({"tar file truncated inside a header", fmt::format("{}: offset {}", path_, offset),
                 fmt::format("{} header bytes", kTarBlockSize),
                 fmt::format("{} bytes", file_size_ - offset), kHint});
  }
  Block block{};
  file_.clear();
  file_.seekg(offset);
  file_.read(reinterpret_cast<char*>(block.data()), kTarBlockSize);
  if (file_.gcount() != kTarBlockSize) {
    throw Error({"cannot read tar header", fmt::format("{}: offset {}", path_, offset), "",
                 "short read", ""});
  }
  if (is_zero_block(block)) {
    return std::nullopt;  // end-of-archive marker (a second zero block follows)
  }

  TarMember member = header_member(block, members_seen_, offset);
  check_tar_header(block, path_, member);
  member.size = tar_member_size(block, path_, member, file_size_);
  const int64_t padded = (member.size + kTarBlockSize - 1) / kTarBlockSize * kTarBlockSize;
  next_header_offset_ = member.data_offset + padded;
  ++members_seen_;
  current_ = member;
  data_consumed_ = false;
  return member;
}

std::string TarReader::read_data() {
  if (!current_ || data_consumed_) {
    throw Error({"tar member data requested twice or before next()", path_, "", "",
                 "this is a bug in the caller"});
  }
  data_consumed_ = true;
  return read_file_range(file_, path_, current_->data_offset, current_->size);
}

void TarReader::skip_data() {
  // next() always seeks to next_header_offset_, so skipping is only bookkeeping.
  data_consumed_ = true;
}

std::string read_file_range(std::ifstream& file, const std::string& path, int64_t offset,
                            int64_t size) {
  std::string data(static_cast<size_t>(size), '\0');
  file.clear();
  file.seekg(offset);
  file.read(data.data(), size);
  if (!file || file.gcount() != size) {
    throw Error({"cannot read file range", fmt::format("{}: offset {}", path, offset),
                 fmt::format("{} bytes", size), fmt::format("{} bytes", file.gcount()),
                 "the file was truncated or changed while training"});
  }
  return data;
}

}  // namespace dde::data
