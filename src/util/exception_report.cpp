#include "dde/util/exception_report.hpp"

#include <c10/util/Exception.h>

#include <filesystem>
#include <new>
#include <string>

#include "dde/util/error.hpp"

namespace dde::util {

std::string describe_exception(const std::exception& e) {
  if (const auto* fs_error = dynamic_cast<const std::filesystem::filesystem_error*>(&e)) {
    std::string where = fs_error->path1().string();
    if (!fs_error->path2().empty()) where += " -> " + fs_error->path2().string();
    return format_error({"file system error", where.empty() ? "(no path)" : where, "",
                         fs_error->code().message() + " (" + fs_error->what() + ")",
                         "check that the path exists, is not a dangling symbolic link or a link "
                         "loop, is writable, and that the disk has space"});
  }
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) {
    return format_error({"out of host memory", "this process", "", e.what(),
                         "lower train.micro_batch, data.resolution, data.workers or "
                         "data.prefetch, or give the job more memory"});
  }
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&e)) {
    return format_error({"LibTorch error", "a tensor operation", "",
                         torch_error->what_without_backtrace(),
                         "if a model file or input caused it, the message names the operation; "
                         "otherwise report it with train.log"});
  }
  return format_error({"internal error", "this process", "", e.what(),
                       "report it with train.log: this path has no check of its own yet"});
}

}  // namespace dde::util
