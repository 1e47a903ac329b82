// Checkpoint directories under <run>/checkpoints/, written atomically:
//   1. stage(step) makes an empty `.staging-step-NNNNNNNN/`;
//   2. every writer (rank 0 the shared state, each rank its own) fills it;
//   3. commit(step) writes the COMPLETE marker, fsyncs, renames the directory to
//      `step-NNNNNNNN/` in one rename(2), then prunes to the newest `keep`.
// A crash at any point leaves the previous complete checkpoint untouched, and a
// directory without its marker is never resumed from.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dde::checkpoint {

class CheckpointStore {
 public:
  static constexpr const char* kCompleteMarker = "COMPLETE";

  CheckpointStore(std::string root, int64_t keep);

  std::string stage(int64_t step) const;
  std::string staging_dir(int64_t step) const;  // where stage(step) puts it (for other ranks)
  std::string commit(int64_t step) const;
  // Newest complete checkpoint directory, if any.
  std::optional<std::string> latest_complete() const;
  std::vector<std::string> complete_checkpoints() const;  // oldest first
  // Removes staging leftovers of a crashed run (called before training starts).
  void remove_stale_staging() const;
  const std::string& root() const { return root_; }

  static std::string step_dir_name(int64_t step);

 private:
  std::string root_;
  int64_t keep_;
};

// Writes `text` to `path` through a temporary file, fsync and rename.
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace dde::checkpoint
