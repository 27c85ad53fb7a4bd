// Emulator stand-in for the CUDA runtime header (see ../emu_cuda.hpp).
#pragma once
#include <cstddef>
#include <cstring>
#include "../emu_cuda.hpp"
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { int e = emu::last_error(); emu::last_error() = 0; return cudaError_t(e); }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { std::memset(p, v, n); return cudaSuccess; }
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) { std::memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::smem_optin();
  return cudaSuccess;
}
template <typename K> cudaError_t cudaFuncSetAttribute(K k, cudaFuncAttribute, int bytes) {
  if (bytes > emu::smem_optin()) return cudaErrorInvalidValue;
  emu::smem_limits()[reinterpret_cast<const void*>(k)] = bytes;
  return cudaSuccess;
}
