#include "dde/util/file_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <string>

#include "dde/util/error.hpp"

namespace dde::util {
namespace {

std::string host_name() {
  std::array<char, 256> name{};
  if (gethostname(name.data(), name.size() - 1) != 0) return "?";
  return name.data();
}

// What the holder wrote ("pid 1234 on host-a"), at most one short line.
std::string holder_of(int fd) {
  std::array<char, 128> text{};
  const ssize_t n = pread(fd, text.data(), text.size() - 1, 0);
  std::string s = n > 0 ? std::string(text.data(), static_cast<size_t>(n)) : std::string();
  const size_t end = s.find('\n');
  if (end != std::string::npos) s.resize(end);
  return s.empty() ? "a process that has not yet written its pid" : s;
}

}  // namespace

FileLock::FileLock(const std::string& path, const std::string& what_for) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    const int code = errno;
    throw Error({"cannot create the lock file", path + " (for " + what_for + ")",
                 "a writable folder", std::strerror(code),
                 "check that the output's parent folder exists and is writable"});
  }
  if (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int code = errno;
    const std::string holder = code == EWOULDBLOCK ? holder_of(fd_) : std::strerror(code);
    ::close(fd_);
    fd_ = -1;
    throw Error({"another process is writing this output", what_for, "no other writer",
                 code == EWOULDBLOCK ? "locked by " + holder + " (lock file " + path + ")" : holder,
                 "wait for it to finish, or choose another output; the lock is released when "
                 "that process ends"});
  }
  const std::string me = "pid " + std::to_string(getpid()) + " on " + host_name() + "\n";
  // The lock holds without the note too; a refused process then names no pid.
  [[maybe_unused]] const bool noted =
      ftruncate(fd_, 0) == 0 && pwrite(fd_, me.data(), me.size(), 0) >= 0;
}

FileLock::~FileLock() {
  if (fd_ < 0) return;
  // Removed while still locked: a process that opened the old file locks an unlinked inode and
  // then finds the finished output, which it refuses on its own.
  ::unlink(path_.c_str());
  flock(fd_, LOCK_UN);
  ::close(fd_);
}

}  // namespace dde::util
