# Keep ggml's AMX kernels out of the build.
#
# With GGML_NATIVE (the default) ggml compiles its AMX matmul whenever the build machine has
# AMX (Intel Sapphire Rapids and later), and on such hosts (KVM guests among them) it
# segfaults on the first decode of a Q4_1 model, in ggml_backend_amx_mul_mat: llama.cpp
# #20824, unfixed upstream. `--repack 0` / use_extra_bufts=false would avoid it at run time
# but also drop the x86 weight repacking that the other quant types gain from, so the
# compiler is told there is no AMX instead (GCC and Clang honour -mno-* over -march=native
# in either order). Included by the package's CMakeLists and, as CMAKE_PROJECT_INCLUDE, by
# bench/llama_bench.py's build of llama-server / llama-bench, so both compare like for like.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86)$")
  include(CheckCCompilerFlag)
  check_c_compiler_flag("-mno-amx-int8 -mno-amx-tile -mno-amx-bf16" LLAMA_CRAB_CC_HAS_MNO_AMX)
  if(LLAMA_CRAB_CC_HAS_MNO_AMX)
    add_compile_options(-mno-amx-int8 -mno-amx-tile -mno-amx-bf16)
  endif()
endif()
