#include <torch/torch.h>
#include "dde/util/log.hpp"
int main() { dde::log::info("placeholder {}", 1); return 0; }
