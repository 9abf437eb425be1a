// Every global-memory access of the kernels goes through these helpers: under the emulator they
// count bytes (tests assert the traffic model of the README), under nvcc they are plain accesses.
#pragma once

#include "cuda/compat.cuh"

namespace smoothce::cuda {

template <typename T>
__device__ __forceinline__ T load_global(const T* ptr) {
  SMOOTHCE_COUNT_READ(sizeof(T));
  return *ptr;
}

// A value the threads of a warp (or block) read at one address: one transaction on the GPU (and
// one DRAM read: the rest hit cache), so the emulator counts it for one thread only, `counted`.
template <typename T>
__device__ __forceinline__ T load_broadcast(const T* ptr, bool counted) {
  if (counted) SMOOTHCE_COUNT_READ(sizeof(T));
  return *ptr;
}

template <typename T>
__device__ __forceinline__ void store_global(T* ptr, T value) {
  SMOOTHCE_COUNT_WRITE(sizeof(T));
  *ptr = value;
}

// 16 bytes of T: one vector load or store instruction (ld.global.v4 / st.global.v4).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {  // ptr 16-byte aligned
  SMOOTHCE_COUNT_READ(sizeof(Pack<T>));
  return *reinterpret_cast<const Pack<T>*>(ptr);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& pack) {  // ptr 16-byte aligned
  SMOOTHCE_COUNT_WRITE(sizeof(Pack<T>));
  *reinterpret_cast<Pack<T>*>(ptr) = pack;
}

// Elements before the first 16-byte boundary at or after ptr (ptr is aligned to its element size).
template <typename T>
__device__ __forceinline__ int misaligned_head(const T* ptr) {
  const int bytes = static_cast<int>(reinterpret_cast<uintptr_t>(ptr) & 15u);
  return bytes == 0 ? 0 : (16 - bytes) / static_cast<int>(sizeof(T));
}

}  // namespace smoothce::cuda
