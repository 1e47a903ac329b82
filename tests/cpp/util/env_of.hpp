// Shared by the C++ tests: an environment lookup (util::EnvLookup, dist::EnvLookup: the same
// std::function) that reads `vars` instead of the process environment.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>

inline std::function<std::optional<std::string>(const std::string&)> env_of(
    std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}
