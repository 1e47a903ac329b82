// libFuzzer target: the safetensors header reader (read_safetensors_layout: the 8-byte length,
// the JSON header, dtypes, shapes, offsets) over arbitrary bytes as a file. Anything malformed
// must be a dde::Error; what it accepts must lie inside the file, which is checked by touching
// every tensor's first and last byte in the input (ASan reports a range past it).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "dde/checkpoint/safetensors_header.hpp"
#include "dde/util/error.hpp"
#include "fuzz_input_file.hpp"

using dde::checkpoint::SafetensorsLayout;
using dde::checkpoint::SafetensorsLayoutEntry;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = dde::fuzz::write_input_file(data, size);
  SafetensorsLayout layout;
  try {
    layout = dde::checkpoint::read_safetensors_layout(path);
  } catch (const dde::Error&) {
    return 0;
  }
  volatile uint8_t sink = 0;
  for (const SafetensorsLayoutEntry& e : layout.entries) {
    int64_t numel = 1;
    for (const int64_t d : e.shape) numel *= d;  // UBSan reports an overflow the parser let by
    const int64_t bytes = numel * dde::checkpoint::safetensors_dtype_size(e.dtype);
    if (layout.file_size != static_cast<int64_t>(size) || e.begin < layout.data_start ||
        e.end - e.begin != bytes) {
      std::abort();  // the layout disagrees with the input
    }
    if (bytes > 0) sink = sink + data[e.begin] + data[e.end - 1];
  }
  (void)sink;
  return 0;
}
