#include "dde/train/stop_signal.hpp"

#include <atomic>
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

std::atomic<int> g_signal{0};

// A second Ctrl-C does not wait for the checkpoint: SIGINT's default action (async-signal-safe).
extern "C" void on_stop_signal(int signum) {
  if (signum == SIGINT && g_signal.load() == SIGINT) {
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
  g_signal.store(signum);
}

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

}  // namespace

void install_stop_signal_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGUSR1, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

bool stop_requested() { return g_signal.load() != 0; }
int stop_signal() { return g_signal.load(); }

StopTestHooks StopTestHooks::from_environment() {
  StopTestHooks hooks;
  const std::vector<int64_t> stop = env_integers("DDE_DEBUG_STOP_AT");
  if (!stop.empty()) {
    if (stop.size() < 2 || stop.size() > 3) {
      throw Error({"malformed test hook variable", "DDE_DEBUG_STOP_AT", "STEP:MICRO[:RANK]",
                   std::getenv("DDE_DEBUG_STOP_AT"), "unset it (it is for tests only)"});
    }
    hooks.stop_step_ = stop[0];
    hooks.stop_micro_ = stop[1];
    hooks.stop_rank_ = stop.size() == 3 ? stop[2] : -1;
  }
  const std::vector<int64_t> sleep = env_integers("DDE_DEBUG_MICRO_BATCH_SLEEP_MS");
  if (!sleep.empty()) hooks.sleep_ms_ = sleep[0];
  return hooks;
}

void StopTestHooks::before_micro_batch(int64_t rank, int64_t step, int64_t micro) const {
  if (sleep_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms_));
  if (step == stop_step_ && micro == stop_micro_ && (stop_rank_ < 0 || rank == stop_rank_)) {
    std::raise(SIGUSR1);
  }
}

}  // namespace dde::train
