#include "dde/train/test_seam.hpp"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dde/util/error.hpp"

namespace dde::train {
namespace {

// "a:b:c" -> {a, b, c}; a dde::Error naming the variable unless every item is an integer.
std::vector<int64_t> env_integers(const char* name) {
  const char* env = std::getenv(name);
  std::vector<int64_t> items;
  if (env == nullptr) return items;
  std::stringstream ss(env);
  std::string item;
  while (std::getline(ss, item, ':')) {
    size_t used = 0;
    try {
      items.push_back(std::stoll(item, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size()) {
      throw Error({"malformed test hook variable", name, "integers separated by ':'", env,
                   "unset it (it is for tests only)"});
    }
  }
  return items;
}

// NAME=S:I[:R] as a point of the run; unset: a point that never matches.
TestSeam::At point_of(const char* name, const char* form) {
  const std::vector<int64_t> v = env_integers(name);
  if (v.empty()) return {};
  if (v.size() < 2 || v.size() > 3) {
    throw Error({"malformed test hook variable", name, form, std::getenv(name),
                 "unset it (it is for tests only)"});
  }
  return {v[0], v[1], v.size() == 3 ? v[2] : -1};
}

// NAME="3,4" -> {3, 4}.
std::set<int64_t> env_steps(const char* name) {
  std::set<int64_t> steps;
  const char* env = std::getenv(name);
  if (env == nullptr) return steps;
  std::stringstream ss(env);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t used = 0;
    try {
      if (!item.empty()) steps.insert(std::stoll(item, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (!item.empty() && used != item.size()) {
      throw Error({"malformed test hook variable", name, "step numbers separated by ','", env,
                   "unset it (it is for tests only)"});
    }
  }
  return steps;
}

}  // namespace

TestSeam TestSeam::from_environment() {
  TestSeam hooks;
  hooks.stop_at_ = point_of("DDE_DEBUG_STOP_AT", "STEP:MICRO[:RANK]");
  hooks.stop_in_eval_ = point_of("DDE_DEBUG_STOP_IN_EVAL", "STEP:BATCH[:RANK]");
  const std::vector<int64_t> sleep = env_integers("DDE_DEBUG_MICRO_BATCH_SLEEP_MS");
  if (!sleep.empty()) hooks.sleep_ms_ = sleep[0];
  hooks.nonfinite_steps_ = env_steps("DDE_DEBUG_NONFINITE_STEPS");
  return hooks;
}

void TestSeam::before_micro_batch(int64_t rank, int64_t step, int64_t micro) const {
  if (sleep_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms_));
  if (stop_at_.matches(rank, step, micro)) std::raise(SIGUSR1);
}

void TestSeam::before_eval_batch(int64_t rank, int64_t step, int64_t batch) const {
  if (stop_in_eval_.matches(rank, step, batch)) std::raise(SIGUSR1);
}

}  // namespace dde::train
