# Warnings are errors in every build of ours (DDE_WERROR=OFF to silence while hacking).
function(dde_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
    -Wnon-virtual-dtor -Wcast-align -Woverloaded-virtual)
  if(DDE_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
