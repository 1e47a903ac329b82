# Dependencies: LibTorch from the project's virtual environment (pinned torch wheel),
# everything else from Debian's -dev packages. Nothing is vendored.
find_package(Threads REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_path(STB_INCLUDE_DIR stb_image.h PATH_SUFFIXES stb REQUIRED)
# Debian's libstb ships the compiled implementations (stb_image, stb_image_write): link it
# instead of defining STB_*_IMPLEMENTATION in one of our translation units.
find_library(STB_LIBRARY stb REQUIRED)
add_library(dde_stb INTERFACE)
target_include_directories(dde_stb SYSTEM INTERFACE ${STB_INCLUDE_DIR})
target_link_libraries(dde_stb INTERFACE ${STB_LIBRARY})
# The data side's decoders and hashing: libjpeg-turbo's TurboJPEG API (Debian
# libturbojpeg0-dev; JPEG), stb_image (PNG), OpenSSL's libcrypto (shard sha256).
find_package(OpenSSL REQUIRED COMPONENTS Crypto)
find_path(TURBOJPEG_INCLUDE_DIR turbojpeg.h REQUIRED)
find_library(TURBOJPEG_LIBRARY turbojpeg REQUIRED)
add_library(dde_data_codecs INTERFACE)
target_include_directories(dde_data_codecs SYSTEM INTERFACE ${TURBOJPEG_INCLUDE_DIR})
target_link_libraries(dde_data_codecs INTERFACE dde_stb ${TURBOJPEG_LIBRARY} OpenSSL::Crypto)

# LibTorch: ask the venv's python where the wheel's CMake files are.
set(DDE_PYTHON "${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python" CACHE FILEPATH
    "Python of the environment whose torch wheel provides LibTorch")
if(NOT EXISTS "${DDE_PYTHON}")
  message(FATAL_ERROR "DDE_PYTHON=${DDE_PYTHON} does not exist. Run scripts/setup.sh first, "
                      "or pass -DDDE_PYTHON=/path/to/python with torch installed.")
endif()
execute_process(
  COMMAND "${DDE_PYTHON}" -c "import torch, os; print(torch.utils.cmake_prefix_path); print(os.path.dirname(torch.__file__))"
  OUTPUT_VARIABLE _dde_torch_out RESULT_VARIABLE _dde_torch_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _dde_torch_rc EQUAL 0)
  message(FATAL_ERROR "'${DDE_PYTHON} -c import torch' failed: is torch installed in that environment?")
endif()
string(REPLACE "\n" ";" _dde_torch_out "${_dde_torch_out}")
list(GET _dde_torch_out 0 _dde_torch_prefix)
list(GET _dde_torch_out 1 DDE_TORCH_DIR)
list(APPEND CMAKE_PREFIX_PATH "${_dde_torch_prefix}")

# The wheel is CUDA-enabled: its TorchConfig needs nvcc and cuDNN at configure time
# (libtorch-notes.md). cuDNN comes from the nvidia-cudnn wheel beside torch.
get_filename_component(_dde_site "${DDE_TORCH_DIR}" DIRECTORY)
if(EXISTS "${_dde_site}/nvidia/cudnn")
  set(CUDNN_ROOT "${_dde_site}/nvidia/cudnn" CACHE PATH "")
  set(CUDNN_INCLUDE_PATH "${_dde_site}/nvidia/cudnn/include" CACHE PATH "")
  file(GLOB _dde_cudnn_lib "${_dde_site}/nvidia/cudnn/lib/libcudnn.so*")
  if(_dde_cudnn_lib)
    list(GET _dde_cudnn_lib 0 _dde_cudnn_lib)
    set(CUDNN_LIBRARY_PATH "${_dde_cudnn_lib}" CACHE FILEPATH "")
  endif()
endif()
set(USE_SYSTEM_NVTX ON CACHE BOOL "")
find_package(Torch REQUIRED)

# One interface target for torch: include dirs as SYSTEM (no warnings from its headers),
# torch_cuda linked with --no-as-needed so CUDA kernels register at run time.
add_library(dde_torch INTERFACE)
target_link_libraries(dde_torch INTERFACE ${TORCH_LIBRARIES})
target_include_directories(dde_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
if(TARGET torch_cuda)
  target_link_options(dde_torch INTERFACE "LINKER:--no-as-needed,$<TARGET_FILE:torch_cuda>,--as-needed")
  set(DDE_HAS_CUDA ON)
endif()
# libtorch.so exports its own copy of std::filesystem (built with a newer GCC), and some of
# it (remove_all) crashes when it interposes Debian's: put libstdc++ first in DT_NEEDED.
target_link_options(dde_torch INTERFACE "LINKER:--push-state,--no-as-needed,-lstdc++,--pop-state")
# fmt: torch ships fmt 12 headers; use them header-only (see include/dde/util/log.hpp).
target_compile_definitions(dde_torch INTERFACE DDE_TORCH_DIR="${DDE_TORCH_DIR}" FMT_HEADER_ONLY=1)

# c10d: Gloo's headers (Debian libgloo-dev; the implementation is inside libtorch_cpu) and,
# in CUDA builds, NCCL's header (the nvidia-nccl wheel beside torch, else the CUDA toolkit).
find_path(GLOO_INCLUDE_DIR gloo/algorithm.h REQUIRED)
target_include_directories(dde_torch SYSTEM INTERFACE ${GLOO_INCLUDE_DIR})
target_compile_definitions(dde_torch INTERFACE USE_C10D_GLOO)
if(DDE_HAS_CUDA)
  file(GLOB _dde_nccl_dirs "${_dde_site}/nvidia/*/include" "${_dde_site}/nvidia/nccl/include")
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${_dde_nccl_dirs} ${CUDAToolkit_INCLUDE_DIRS})
  if(NCCL_INCLUDE_DIR)
    target_include_directories(dde_torch SYSTEM INTERFACE ${NCCL_INCLUDE_DIR})
    target_compile_definitions(dde_torch INTERFACE USE_C10D_NCCL DDE_WITH_NCCL)
    message(STATUS "dde: NCCL process groups enabled (nccl.h in ${NCCL_INCLUDE_DIR})")
  endif()
endif()

function(dde_set_torch_rpath target)
  set_target_properties(${target} PROPERTIES BUILD_RPATH "${DDE_TORCH_DIR}/lib"
                                             INSTALL_RPATH "${DDE_TORCH_DIR}/lib")
endfunction()
