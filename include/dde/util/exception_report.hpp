// What main() says about an exception that is not a dde::Error: a file-system error with its
// paths and cause, memory exhaustion, a LibTorch error without its C++ backtrace. Every one is
// named with what to do, so no path a user can reach ends in a bare "unexpected error".
#pragma once

#include <exception>
#include <string>

namespace dde::util {

std::string describe_exception(const std::exception& e);

}  // namespace dde::util
