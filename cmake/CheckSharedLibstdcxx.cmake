# Run after linking _C (CMakeLists.txt, POST_BUILD): fails the build when libstdc++ was linked into the extension
# statically. torch loads the shared libstdc++; a second, static copy inside _C keeps its own locale ids, so the first
# number formatted into a stream (every TORCH_CHECK message with a size) calls through the wrong facet and segfaults.
# Seen on 2026-12-04 on the H200 image, whose /opt/gcc g++ links libstdc++.a: every error path crashed the process.
#   cmake -DSO=<library> -DNM=<nm> -P CheckSharedLibstdcxx.cmake
if(NOT NM)
  message(STATUS "blockops: no nm found; skipping the static-libstdc++ check")
  return()
endif()
execute_process(COMMAND "${NM}" --defined-only "${SO}" OUTPUT_VARIABLE _symbols ERROR_QUIET RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(STATUS "blockops: '${NM}' could not read ${SO}; skipping the static-libstdc++ check")
  return()
endif()
# std::locale::id::_M_id() const: defined only by libstdc++ itself.
string(FIND "${_symbols}" "_ZNKSt6locale2id5_M_idEv" _at)
if(NOT _at EQUAL -1)
  file(REMOVE "${SO}")
  message(FATAL_ERROR "blockops: ${SO} has libstdc++ linked in statically (it defines std::locale::id::_M_id), "
          "which crashes next to the shared libstdc++ that torch loads (every error message with a number "
          "segfaults). The C++ compiler links libstdc++.a: build with a compiler whose libstdc++ is shared, e.g. "
          "CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++, and without -static-libstdc++ in LDFLAGS.")
endif()
