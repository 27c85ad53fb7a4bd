# The torch-free CUDA kernels of csq_ext as an OBJECT library, `csq_cuda_kernels`.
#
# Include this file from a project that has (or can enable) the CUDA language:
#     include(cmake/csq_cuda_kernels.cmake)
#     target_link_libraries(<your torch library> PRIVATE csq_cuda_kernels)
# and compile csrc/cuda/csq_ops_cuda.cpp (the torch host file: every op's CUDA entry) into that library.
# Standalone (nvcc only, no torch): cmake -S csrc/cuda -B build-cuda && cmake --build build-cuda
#
# Options (cache variables):
#   CSQ_CUDA_ARCHS      real architectures to build SASS for, default "80;90a"
#   CSQ_CUDA_EMBED_PTX  also embed PTX of the first architecture (JIT on newer GPUs), default ON
#   CSQ_CUDA_PTXAS_VERBOSE  print ptxas register / spill / shared memory use, default ON
# Sets CSQ_CUDA_ARCHS_STRING (e.g. "sm_80,sm_90a") for build-info strings.

cmake_minimum_required(VERSION 3.18)

get_property(_csq_langs GLOBAL PROPERTY ENABLED_LANGUAGES)
if(NOT "CUDA" IN_LIST _csq_langs)
  enable_language(CUDA)
endif()
find_package(CUDAToolkit REQUIRED)

set(CSQ_CUDA_ARCHS "80;90a" CACHE STRING "CUDA architectures for csq_cuda_kernels (e.g. 80;90a)")
option(CSQ_CUDA_EMBED_PTX "Embed PTX of the first architecture in CSQ_CUDA_ARCHS" ON)
option(CSQ_CUDA_PTXAS_VERBOSE "Print the ptxas resource report (-Xptxas -v)" ON)

set(_csq_cuda_dir "${CMAKE_CURRENT_LIST_DIR}/../csrc/cuda")
get_filename_component(_csq_cuda_dir "${_csq_cuda_dir}" ABSOLUTE)

set(CSQ_CUDA_KERNEL_SOURCES
  "${_csq_cuda_dir}/csq_chunked_fwd_launch.cu"
  "${_csq_cuda_dir}/csq_chunked_bwd_launch.cu"
  "${_csq_cuda_dir}/csq_decode_launch.cu"
  "${_csq_cuda_dir}/csq_direct_launch.cu"
  "${_csq_cuda_dir}/csq_state_launch.cu")

add_library(csq_cuda_kernels OBJECT ${CSQ_CUDA_KERNEL_SOURCES})

# Explicit -gencode flags: architecture-specific targets such as 90a are spelled the same in
# every CMake version, and nothing depends on CMAKE_CUDA_ARCHITECTURES defaults.
set(_csq_gencode "")
set(_csq_arch_names "")
foreach(_arch IN LISTS CSQ_CUDA_ARCHS)
  list(APPEND _csq_gencode "-gencode=arch=compute_${_arch},code=sm_${_arch}")
  list(APPEND _csq_arch_names "sm_${_arch}")
endforeach()
if(CSQ_CUDA_EMBED_PTX)
  list(GET CSQ_CUDA_ARCHS 0 _first_arch)
  list(APPEND _csq_gencode "-gencode=arch=compute_${_first_arch},code=compute_${_first_arch}")
endif()
string(REPLACE ";" "," CSQ_CUDA_ARCHS_STRING "${_csq_arch_names}")

set_target_properties(csq_cuda_kernels PROPERTIES
  CUDA_ARCHITECTURES OFF
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CXX_STANDARD 17
  POSITION_INDEPENDENT_CODE ON)
# The flags of the build that ships (setup.py: ours, plus the half-precision defines that
# torch.utils.cpp_extension adds), so that this build's ptxas report describes that one.
target_compile_options(csq_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:${_csq_gencode} -O3 -lineinfo --use_fast_math
  --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__>)
if(CSQ_CUDA_PTXAS_VERBOSE)
  target_compile_options(csq_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
endif()
target_include_directories(csq_cuda_kernels PUBLIC "${_csq_cuda_dir}")
target_link_libraries(csq_cuda_kernels PUBLIC CUDA::cudart)
