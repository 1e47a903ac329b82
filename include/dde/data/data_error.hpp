// Errors about one preference pair's own bytes (an image that does not decode, token ids
// outside the vocabulary, ...): the loader skips such a pair and counts it under `reason`,
// instead of stopping the run (data.max_bad_pairs). Any other dde::Error stays fatal.
// Torch-free: the fuzz targets (tests/fuzz) compile it with clang alone.
#pragma once

#include <string>
#include <utility>

#include "dde/util/error.hpp"

namespace dde::data {

class BadPairError : public Error {
 public:
  BadPairError(std::string reason, ErrorInfo info)
      : Error(std::move(info)), reason_(std::move(reason)) {}
  // A short snake_case category: "undecodable_image", "image_too_large", ...
  const std::string& reason() const { return reason_; }

 private:
  std::string reason_;
};

// At most `max_bytes` of `bytes` as printable ASCII, anything else as \xNN, "..." when cut:
// what a message may show of data read from a file (never raw binary).
std::string escape_preview(const std::string& bytes, size_t max_bytes = 32);

// The hint of a message about a shard's own structure or metadata.
inline constexpr const char* kReexportHint =
    "re-export the shards with python -m dde_tools.export_pickapic";

}  // namespace dde::data
