#include "dde/dist/shard_layout.hpp"

#include <algorithm>
#include <numeric>
#include <string>

#include "dde/util/error.hpp"

namespace dde::dist {

ShardLayout partition_parameters(const std::vector<int64_t>& numels, int64_t world_size) {
  if (world_size < 1) {
    throw Error({"bad world size for optimizer sharding", "partition_parameters", ">= 1",
                 std::to_string(world_size), ""});
  }
  ShardLayout layout;
  layout.world_size = world_size;
  const int64_t total = std::accumulate(numels.begin(), numels.end(), int64_t{0});
  std::vector<int64_t> used(static_cast<size_t>(world_size), 0);
  int64_t start = 0;
  for (const int64_t n : numels) {
    if (n < 0) {
      throw Error(
          {"negative parameter size", "partition_parameters", ">= 0", std::to_string(n), ""});
    }
    const int64_t rank = start < total ? (start * world_size) / total : world_size - 1;
    layout.owner.push_back(rank);
    layout.offset.push_back(used[static_cast<size_t>(rank)]);
    used[static_cast<size_t>(rank)] += n;
    start += n;
  }
  // owner is non-decreasing: rank r's parameters are one contiguous run (maybe empty).
  for (int64_t r = 0; r < world_size; ++r) {
    const auto lo = std::lower_bound(layout.owner.begin(), layout.owner.end(), r);
    const auto hi = std::upper_bound(layout.owner.begin(), layout.owner.end(), r);
    layout.first.push_back(lo - layout.owner.begin());
    layout.end.push_back(hi - layout.owner.begin());
  }
  layout.segment = *std::max_element(used.begin(), used.end());
  return layout;
}

}  // namespace dde::dist
