#include "dde/util/file_write.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "dde/util/error.hpp"

namespace dde::util {

std::pair<std::string, std::string> describe_write_errno(int code) {
  switch (code) {
    case ENOSPC:
      return {"no space left on the device (ENOSPC)", "free disk space or choose another folder"};
    case EFBIG:
      return {"the file-size limit was reached (EFBIG)",
              "raise the limit (ulimit -f, or the job's file-size limit) or use a filesystem that "
              "holds files this large"};
    case EDQUOT:
      return {"the disk quota is exhausted (EDQUOT)", "free space in your quota"};
    case EROFS:
      return {"the filesystem is read-only (EROFS)", "choose a writable folder"};
    case EACCES:
    case EPERM:
      return {std::string("permission denied (") + std::strerror(code) + ")",
              "check the folder's owner and permissions, or choose another folder"};
    default:
      return {std::strerror(code), "check the folder and the disk"};
  }
}

void write_file(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    const auto [actual, hint] = describe_write_errno(errno);
    throw Error({"cannot create file", path, "a writable path", actual, hint});
  }
  size_t total = 0;
  for (const auto& [data, size] : parts) {
    const auto* p = static_cast<const char*>(data);
    size_t left = size;
    while (left > 0) {
      const ssize_t n = ::write(fd, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int code = n < 0 ? errno : ENOSPC;
        ::close(fd);
        const auto [actual, hint] = describe_write_errno(code);
        throw Error({"write failed", path,
                     std::to_string(total + left) + " more bytes written (" +
                         std::to_string(total) + " were)",
                     actual, hint});
      }
      p += n;
      left -= static_cast<size_t>(n);
      total += static_cast<size_t>(n);
    }
  }
  if (::close(fd) != 0) {
    const auto [actual, hint] = describe_write_errno(errno);
    throw Error({"write failed on close", path, "all bytes on disk", actual, hint});
  }
}

void ignore_file_size_signal() { std::signal(SIGXFSZ, SIG_IGN); }

}  // namespace dde::util
