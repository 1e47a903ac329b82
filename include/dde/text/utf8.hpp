// UTF-8 checks for text from outside (captions, tokenizer files). Torch-free.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace dde::text {

// The offset of the first byte that does not begin a well-formed UTF-8 sequence (Unicode's
// table 3-7: no overlong forms, no surrogates, nothing past U+10FFFF; Python's strict decoder
// rejects the same), or nullopt when all of `bytes` is UTF-8.
std::optional<std::size_t> find_invalid_utf8(std::string_view bytes);

// "0xC3 0x28": up to `count` bytes of `bytes` from `offset`, for messages about bad bytes.
std::string hex_bytes(std::string_view bytes, std::size_t offset, std::size_t count = 4);

}  // namespace dde::text
