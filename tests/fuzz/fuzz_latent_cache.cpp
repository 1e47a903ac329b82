// libFuzzer target: the latent cache's readers without LibTorch. The input is index.json, a NUL
// byte, then the bytes of the index's first cache shard (a safetensors file): the index is parsed
// (LatentCacheIndex::parse), then the shard's header is checked against it
// (read_latent_cache_shard_layout). Anything malformed must be a dde::Error; every row the
// layout accepts must lie inside its tensor (as the safetensors header has it), and its last
// row's bytes are touched (ASan reports a row past the input).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dde/data/latent_cache_format.hpp"
#include "dde/util/error.hpp"
#include "fuzz_input_file.hpp"

using dde::data::LatentCacheIndex;
using dde::data::LatentCacheShardLayout;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto* nul = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  const size_t index_size = nul == nullptr ? size : static_cast<size_t>(nul - data);
  const uint8_t* shard = nul == nullptr ? data + size : nul + 1;
  const size_t shard_size = static_cast<size_t>(data + size - shard);
  LatentCacheIndex index;
  LatentCacheShardLayout layout;
  try {
    index = LatentCacheIndex::parse(std::string(reinterpret_cast<const char*>(data), index_size),
                                    "/nonexistent-dde-fuzz/index.json");
    if (index.shards.empty()) return 0;
    layout = dde::data::read_latent_cache_shard_layout(
        index, 0, dde::fuzz::write_input_file(shard, shard_size));
  } catch (const dde::Error&) {
    return 0;
  }
  const auto rows = static_cast<int64_t>(layout.keys.size());
  if (rows != index.shards[0].pairs) std::abort();
  volatile uint8_t sink = 0;
  const dde::checkpoint::SafetensorsLayout header =
      dde::checkpoint::read_safetensors_layout(dde::fuzz::write_input_file(shard, shard_size));
  for (const auto& named : layout.fields) {
    const dde::data::CacheShardField& field = named.second;
    const auto tensor = std::find_if(header.entries.begin(), header.entries.end(),
                                     [&](const auto& e) { return e.name == named.first; });
    if (field.row_bytes <= 0 || tensor == header.entries.end() || field.begin != tensor->begin ||
        field.begin + rows * field.row_bytes != tensor->end) {
      std::abort();  // rows outside their tensor
    }
    // The bytes LatentCacheShard::read would read for the last row.
    if (rows > 0) sink = sink + shard[field.begin + rows * field.row_bytes - 1];
  }
  (void)sink;
  return 0;
}
