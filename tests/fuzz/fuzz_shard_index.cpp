// libFuzzer target: ShardIndex::parse over arbitrary text (the shard files it names are
// looked up in an empty temporary folder, so path checks run too). Messages must stay
// printable: no raw input bytes may be echoed.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    (void)dde::data::ShardIndex::parse(text, "/nonexistent-dde-fuzz/index.json");
  } catch (const dde::Error& e) {
    for (const char* c = e.what(); *c != '\0'; ++c) {
      const auto u = static_cast<unsigned char>(*c);
      if (u < 32 && u != '\n') {
        std::abort();  // a raw control byte reached the message
      }
    }
  }
  return 0;
}
