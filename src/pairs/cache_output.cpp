#include "cache_output.hpp"

#include <optional>
#include <system_error>
#include <vector>

#include "dde/util/error.hpp"

namespace dde::pairs {
namespace fs = std::filesystem;

fs::path cache_out_path(const std::string& out_dir) {
  fs::path out = out_dir;
  if (!out.has_filename()) out = out.parent_path();
  return out;
}

namespace {

std::string what_is_there(const fs::path& path, const fs::file_status& link) {
  if (!fs::is_symlink(link))
    return fs::is_directory(link) ? "an existing folder" : "an existing file";
  std::error_code ec;
  const fs::file_status target = fs::status(path, ec);
  if (ec == std::errc::too_many_symbolic_link_levels) return "a symbolic link loop";
  if (!fs::exists(target)) return "a dangling symbolic link";
  return "a symbolic link to an existing path";
}

}  // namespace

void check_new_output(const fs::path& path, const std::string& flag) {
  const std::string where = flag + " " + path.string();
  std::error_code ec;
  const fs::file_status link = fs::symlink_status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) {
    throw Error({"cannot inspect the output path", where, "a new folder", ec.message(),
                 "check the path and the permissions of its folders"});
  }
  if (fs::exists(link)) {
    throw Error({"cache folder exists", where, "a new folder", what_is_there(path, link),
                 "remove it or choose another --out"});
  }
  const fs::path parent = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  if (!fs::is_directory(parent, ec)) {
    throw Error({"the output's folder does not exist", where, "an existing folder",
                 parent.string() + (ec ? ": " + ec.message() : ": not a folder"),
                 "create that folder first"});
  }
}

CacheOutput::CacheOutput(const std::string& out_dir, dist::Communicator& comm, torch::Device device)
    : out_(cache_out_path(out_dir)),
      staging_(out_.string() + ".staging"),
      rank0_(comm.rank() == 0) {
  std::optional<Error> refused;
  if (rank0_) {
    try {
      lock_ = std::make_unique<util::FileLock>(out_.string() + ".lock", "--out " + out_.string());
    } catch (const Error& e) {
      refused = e;
    }
  }
  std::vector<torch::Tensor> flag{
      torch::tensor({refused ? int64_t{1} : int64_t{0}}, torch::dtype(torch::kInt64)).to(device)};
  comm.all_reduce_sum(flag, 1 << 10);
  if (refused) throw *refused;
  if (flag[0].cpu().item<int64_t>() != 0) {
    throw Error({"rank 0 could not lock the cache folder", "--out " + out_.string(), "", "",
                 "see rank 0's message"});
  }
}

fs::path CacheOutput::begin_staging() {
  if (!rank0_) return staging_;
  check_new_output(out_, "--out");  // again, now that the lock is held
  std::error_code ec;
  fs::remove_all(staging_, ec);  // a crashed run's
  if (!ec) fs::create_directories(staging_, ec);
  if (ec) {
    throw Error({"cannot create the staging folder", staging_.string(), "a writable folder",
                 ec.message(), "check the permissions and free space of --out's folder"});
  }
  return staging_;
}

void CacheOutput::publish() {
  std::error_code ec;
  fs::rename(staging_, out_, ec);
  if (ec) {
    throw Error({"cannot move the finished cache into place",
                 staging_.string() + " -> " + out_.string(), "a rename within one folder",
                 ec.message(), "the complete cache stays in the staging folder: rename it"});
  }
}

}  // namespace dde::pairs
