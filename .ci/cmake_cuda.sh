#!/usr/bin/env bash
# The CMake operator library with the CUDA backend (-DCSQ_WITH_CUDA=ON: the torch-free kernels
# and the host files), against the CUDA torch that .ci/cuda_build.sh installed, then loaded by
# tests/test_cmake_library.py (which checks that every operator has a CUDA kernel).
#
#   bash .ci/cmake_cuda.sh        (after .ci/cuda_build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=$(realpath -m "${CSQ_CUDA_ENV:-build-cuda-env}")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# The toolkit's own nvcc first: CMake's FindCUDAToolkit derives the toolkit root from the nvcc it
# finds, and an nvcc wrapper script elsewhere on the PATH would point it at the wrong folder.
export PATH="$CUDA_HOME/bin:$PATH"
PY="$ENV/bin/python"
export LD_LIBRARY_PATH="$ENV/stand-ins:$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# torch's CMake config asks for these: the architectures (its default would be too old for
# CUDA 13) and an nvrtc library to link against (ours never calls it; the stand-in satisfies it).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-cmake-cuda -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCSQ_WITH_CUDA=ON \
  -DCSQ_CUDA_PTXAS_VERBOSE=OFF -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DCUDAToolkit_ROOT="$CUDA_HOME" -DCUDA_nvrtc_LIBRARY="$ENV/stand-ins/libnvrtc.so.13" >/dev/null
cmake --build build-cmake-cuda -j"${MAX_JOBS:-2}" >/dev/null
"$PY" -m pip install -q pytest
# --noconftest: the suite's conftest imports the package, which in this checkout may be built for
# another torch; the library test loads the CMake library in a fresh interpreter of its own.
CSQ_CMAKE_LIB="$PWD/build-cmake-cuda/libcsq_ext_ops.so" "$PY" -m pytest -q --noconftest -p no:cacheprovider tests/test_cmake_library.py
