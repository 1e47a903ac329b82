// The cache encoder's output folder (private to src/pairs): it must name nothing yet; rank 0
// holds a lock beside it from start-up (a second encoder on the same --out is refused at once,
// naming the first) and writes into CACHE.staging, renamed into place when complete.
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <string>

#include "dde/dist/communicator.hpp"
#include "dde/util/file_lock.hpp"

namespace dde::pairs {

// "CACHE/" -> "CACHE": the staging folder and the lock sit beside it.
std::filesystem::path cache_out_path(const std::string& out_dir);

// `path` must name nothing (not even a dangling symbolic link or a link loop) in a folder that
// exists; else an Error naming `flag`, the path and what is there.
void check_new_output(const std::filesystem::path& path, const std::string& flag);

class CacheOutput {
 public:
  // Rank 0 takes the lock; every rank learns whether it got it (else the others would wait in
  // the next barrier until the timeout).
  CacheOutput(const std::string& out_dir, dist::Communicator& comm, torch::Device device);
  // Rank 0: checks the path again under the lock and makes an empty staging folder; every rank
  // gets its path.
  std::filesystem::path begin_staging();
  // Rank 0: the finished staging folder becomes --out.
  void publish();

 private:
  std::filesystem::path out_, staging_;
  std::unique_ptr<util::FileLock> lock_;
  bool rank0_ = false;
};

}  // namespace dde::pairs
