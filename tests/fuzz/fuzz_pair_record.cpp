// libFuzzer target: ShardPairReader (tar grouping + KEY.json parsing) over arbitrary bytes,
// in the three read modes the trainer uses. A bad pair's metadata must come back as
// PairRecord::problem, anything structural as a dde::Error; nothing else may happen.
#include <cstddef>
#include <cstdint>

#include "dde/data/pair_record.hpp"
#include "dde/util/error.hpp"
#include "fuzz_input_file.hpp"

using dde::data::ShardPairReader;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = dde::fuzz::write_input_file(data, size);
  for (const auto mode : {ShardPairReader::Images::kRead, ShardPairReader::Images::kSkip,
                          ShardPairReader::Images::kHeadersOnly}) {
    try {
      ShardPairReader reader(path, mode);
      while (std::optional<dde::data::PairRecord> record = reader.next()) {
        if (record->problem) {
          (void)record->problem->reason();
        }
      }
    } catch (const dde::Error&) {
    }
  }
  return 0;
}
