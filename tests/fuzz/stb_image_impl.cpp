// The fuzz build compiles stb_image itself (instrumented, so libFuzzer sees its branches);
// the library build links Debian's libstb instead.
#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>
