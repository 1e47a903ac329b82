// libFuzzer target: TarReader over arbitrary bytes. Every outcome but a dde::Error or the
// end of the archive is a finding (crash, sanitizer report, other exception, hang).
#include <cstddef>
#include <cstdint>

#include "dde/data/tar_reader.hpp"
#include "dde/util/error.hpp"
#include "fuzz_input_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = dde::fuzz::write_input_file(data, size);
  try {
    dde::data::TarReader tar(path);
    for (int i = 0; std::optional<dde::data::TarMember> member = tar.next(); ++i) {
      if (i % 2 == 0) {
        (void)tar.read_data();
      } else {
        tar.skip_data();
      }
    }
  } catch (const dde::Error&) {
  }
  return 0;
}
