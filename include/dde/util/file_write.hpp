// Writes a file with POSIX calls, so that a failure names its cause: no space left (ENOSPC), the
// file-size limit (EFBIG: `ulimit -f`, or the filesystem's largest file), a quota, a read-only
// filesystem, a permission. The process ignores SIGXFSZ (ignore_file_size_signal), so going over
// the size limit is this error and not a silent kill.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace dde::util {

// The bytes of each part, in order, to `path` (created or truncated). Throws dde::Error.
void write_file(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts);

// What errno `code` means for a write, and what to do (for Error's actual and hint).
std::pair<std::string, std::string> describe_write_errno(int code);

// SIGXFSZ's default action kills the process without a word; ignored, the write fails with EFBIG.
void ignore_file_size_signal();

}  // namespace dde::util
