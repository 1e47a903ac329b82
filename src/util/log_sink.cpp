// The spdlog side of dde::log. Deliberately includes no torch header (see log.hpp).
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <mutex>
#include <string>

#include "dde/util/log.hpp"

namespace dde::log {

namespace {

struct State {
  std::mutex mutex;
  std::shared_ptr<spdlog::logger> logger;
  int rank = 0;
};

State& state() {
  static State s;
  return s;
}

std::shared_ptr<spdlog::logger>& logger_locked(State& s) {
  if (!s.logger) {
    s.logger = std::make_shared<spdlog::logger>(
        "dde", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    s.logger->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
    s.logger->set_level(spdlog::level::info);
  }
  return s.logger;
}

spdlog::level::level_enum to_spdlog(Level level) {
  switch (level) {
    case Level::kDebug:
      return spdlog::level::debug;
    case Level::kInfo:
      return spdlog::level::info;
    case Level::kWarn:
      return spdlog::level::warn;
    case Level::kError:
      return spdlog::level::err;
  }
  return spdlog::level::info;
}

}  // namespace

void emit(Level level, const std::string& message) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.rank != 0 && level < Level::kWarn) {
    return;
  }
  logger_locked(s)->log(to_spdlog(level), "{}", message);
}

void set_rank(int rank) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.rank = rank;
  logger_locked(s)->set_pattern(fmt::format("[%Y-%m-%d %H:%M:%S.%e] [rank {}] [%^%l%$] %v", rank));
}

void set_level(Level level) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  logger_locked(s)->set_level(to_spdlog(level));
}

void add_file(const std::string& path) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/false);
  logger_locked(s)->sinks().push_back(sink);
}

void flush() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  logger_locked(s)->flush();
}

}  // namespace dde::log
