#include "dde/checkpoint/checkpoint_store.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "dde/util/error.hpp"
#include "dde/util/file_write.hpp"

namespace dde::checkpoint {
namespace {

namespace fs = std::filesystem;
constexpr const char* kStepPrefix = "step-";
constexpr const char* kStagingPrefix = ".staging-";

void fsync_path(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void fsync_tree(const fs::path& dir) {
  for (const auto& entry : fs::recursive_directory_iterator(dir)) fsync_path(entry.path());
  fsync_path(dir);
}

std::optional<int64_t> parse_step(const std::string& name) {
  if (name.rfind(kStepPrefix, 0) != 0) return std::nullopt;
  const std::string digits = name.substr(std::string(kStepPrefix).size());
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return std::nullopt;
  return std::stoll(digits);
}

}  // namespace

CheckpointStore::CheckpointStore(std::string root, int64_t keep)
    : root_(std::move(root)), keep_(keep) {
  std::error_code ec;
  fs::create_directories(root_, ec);
  if (ec)
    throw Error(
        {"cannot create checkpoint directory", root_, "a writable directory", ec.message(), ""});
}

std::string CheckpointStore::step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%s%08lld", kStepPrefix, static_cast<long long>(step));
  return buf;
}

std::string CheckpointStore::staging_dir(int64_t step) const {
  return (fs::path(root_) / (std::string(kStagingPrefix) + step_dir_name(step))).string();
}

std::string CheckpointStore::stage(int64_t step) const {
  const fs::path staging = staging_dir(step);
  fs::remove_all(staging);
  fs::create_directories(staging);
  return staging.string();
}

std::string CheckpointStore::commit(int64_t step) const {
  const fs::path staging = staging_dir(step);
  const fs::path final_dir = fs::path(root_) / step_dir_name(step);
  if (!fs::is_directory(staging)) {
    throw Error({"nothing staged to commit", staging.string(), "a staged checkpoint", "none",
                 "internal error"});
  }
  {
    std::ofstream marker(staging / kCompleteMarker);
    marker << step << "\n";
  }
  fsync_tree(staging);
  if (fs::exists(final_dir)) {
    // Re-saving a step (after a resume from it): move the old one aside first.
    const fs::path old =
        fs::path(root_) / (std::string(kStagingPrefix) + "old-" + step_dir_name(step));
    fs::remove_all(old);
    fs::rename(final_dir, old);
    fs::rename(staging, final_dir);
    fs::remove_all(old);
  } else {
    fs::rename(staging, final_dir);
  }
  fsync_path(root_);
  const std::vector<std::string> all = complete_checkpoints();
  for (size_t i = 0; i + static_cast<size_t>(keep_) < all.size(); ++i) fs::remove_all(all[i]);
  return final_dir.string();
}

std::vector<std::string> CheckpointStore::complete_checkpoints() const {
  std::vector<std::pair<int64_t, std::string>> found;
  if (!fs::is_directory(root_)) return {};
  for (const auto& entry : fs::directory_iterator(root_)) {
    const auto step = parse_step(entry.path().filename().string());
    if (step && entry.is_directory() && fs::is_regular_file(entry.path() / kCompleteMarker)) {
      found.emplace_back(*step, entry.path().string());
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  out.reserve(found.size());
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::optional<std::string> CheckpointStore::latest_complete() const {
  const auto all = complete_checkpoints();
  if (all.empty()) return std::nullopt;
  return all.back();
}

void CheckpointStore::remove_stale_staging() const {
  if (!fs::is_directory(root_)) return;
  for (const auto& entry : fs::directory_iterator(root_)) {
    if (entry.path().filename().string().rfind(kStagingPrefix, 0) == 0)
      fs::remove_all(entry.path());
  }
}

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  util::write_file(tmp, {{text.data(), text.size()}});  // names ENOSPC, EFBIG, ...
  fsync_path(tmp);
  fs::rename(tmp, path);
}

}  // namespace dde::checkpoint
