#include "dde/train/stop_signal.hpp"

#include <atomic>
#include <csignal>

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

}  // namespace dde::train
