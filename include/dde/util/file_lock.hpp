// An exclusive advisory lock on a file next to an output, so that two processes never write the
// same output: the second is refused at once, naming the first (its pid and host, which the holder
// writes into the lock file). flock(2) locks are released by the kernel when the holder dies, so a
// crashed run leaves at most a stale file, never a stale lock.
#pragma once

#include <string>

namespace dde::util {

class FileLock {
 public:
  // Creates `path` if needed and locks it, or throws dde::Error: `what_for` names the output
  // ("--out CACHE"), and the message the process that holds it.
  FileLock(const std::string& path, const std::string& what_for);
  ~FileLock();  // unlocks and removes the file
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace dde::util
