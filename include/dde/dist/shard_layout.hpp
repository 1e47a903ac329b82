// Where each parameter lives in the flat, padded buffer that ZeRO-1 reduce-scatters gradients
// and all-gathers weights through (llm.c's scheme, libtorch-notes.md), with whole parameters
// per rank so that every rank's optimizer sees complete tensors (Adafactor's factored second
// moment needs a parameter's rows and columns together).
//
//   flat buffer [world x segment]: rank r's segment = its parameters back to back, then zeros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace dde::dist {

struct ShardLayout {
  int64_t world_size = 1;
  int64_t segment = 0;              // elements per rank (the largest rank's share; others padded)
  std::vector<int64_t> owner;       // per parameter: the rank that updates it
  std::vector<int64_t> offset;      // per parameter: start inside its owner's segment
  std::vector<int64_t> first, end;  // per rank: its parameters are [first[r], end[r])

  // Start of parameter i in the flat buffer.
  int64_t flat_offset(std::size_t i) const { return owner[i] * segment + offset[i]; }
};

// Contiguous split of the parameters, in order, into `world_size` runs of about equal numel:
// parameter i goes to rank floor(start_i * world_size / total). Throws dde::Error on bad input.
ShardLayout partition_parameters(const std::vector<int64_t>& numels, int64_t world_size);

}  // namespace dde::dist
