# Warnings are errors in every build of ours (DDE_WERROR=OFF to silence while hacking).
function(dde_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
    -Wnon-virtual-dtor -Wcast-align -Woverloaded-virtual)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # A unity build (DDE_UNITY) makes the batch file the main file: GCC then flags every class
    # holding a member of an anonymous-namespace type of the included source.
    target_compile_options(${target} PRIVATE -Wno-subobject-linkage)
  endif()
  if(DDE_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
