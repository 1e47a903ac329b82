// Reading whole files and length-prefixed parts of our own formats with a size limit checked
// before anything is allocated (limits: dde/util/input_limits.hpp).
#pragma once

#include <cstdint>
#include <istream>
#include <string>

namespace dde::util {

// Throws dde::Error "<what> too large (<where>): expected at most <limit> bytes, got <size> bytes"
// when size > max_bytes.
void check_size(int64_t size, int64_t max_bytes, const std::string& what, const std::string& where,
                const std::string& hint = "");

// The bytes of `path` (a regular file), its size checked against `max_bytes` from the filesystem
// before reading; `what` names the file in errors ("shard index", "checkpoint JSON", ...), `hint`
// says what to do when it is too large.
std::string read_text_file(const std::string& path, int64_t max_bytes, const std::string& what,
                           const std::string& hint = "");

// The next line of `in` (without '\n') into `line`; false at the end of the stream. A line longer
// than max_bytes is a dde::Error naming `where`, the limit and the size read so far.
bool read_line(std::istream& in, std::string& line, int64_t max_bytes, const std::string& where);

}  // namespace dde::util
