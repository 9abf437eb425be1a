// Every memory access of the kernels goes through these helpers: under the emulator they count
// global bytes (tests assert the traffic model of the README) and let the sanitizer check each
// access (global: alignment, bounds, cross-block races; shared: bounds, alignment, racecheck), naming
// the caller's source line; under nvcc they are plain accesses.
#pragma once

#include "cuda/compat.cuh"

namespace smoothce::cuda {

// The alignment an access of T needs on the device (vector accesses: at most 16 bytes).
template <typename T>
constexpr size_t access_align() {
  return alignof(T) < 16 ? alignof(T) : 16;
}

// (T deduced from the pointer only: the value converts to it)
template <typename T>
struct Same {
  using type = T;
};

template <typename T>
__device__ __forceinline__ T load_global(const T* ptr SMOOTHCE_SITE_PARAMS) {
  SMOOTHCE_ON_GLOBAL(ptr, sizeof(T), access_align<T>(), false);
  SMOOTHCE_COUNT_READ(sizeof(T));
  return *ptr;
}

// A value the threads of a warp (or block) read at one address: one transaction on the GPU (and
// one DRAM read: the rest hit cache), so the emulator counts it for one thread only, `counted`.
template <typename T>
__device__ __forceinline__ T load_broadcast(const T* ptr, bool counted SMOOTHCE_SITE_PARAMS) {
  SMOOTHCE_ON_GLOBAL(ptr, sizeof(T), access_align<T>(), false);
  if (counted) SMOOTHCE_COUNT_READ(sizeof(T));
  return *ptr;
}

template <typename T>
__device__ __forceinline__ void store_global(T* ptr, typename Same<T>::type value SMOOTHCE_SITE_PARAMS) {
  SMOOTHCE_ON_GLOBAL(ptr, sizeof(T), access_align<T>(), true);
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
__device__ __forceinline__ Pack<T> load_pack(const T* ptr SMOOTHCE_SITE_PARAMS) {  // ptr 16-byte aligned
  SMOOTHCE_ON_GLOBAL(ptr, sizeof(Pack<T>), 16, false);
  SMOOTHCE_COUNT_READ(sizeof(Pack<T>));
  return *reinterpret_cast<const Pack<T>*>(ptr);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& pack SMOOTHCE_SITE_PARAMS) {  // ptr 16-byte aligned
  SMOOTHCE_ON_GLOBAL(ptr, sizeof(Pack<T>), 16, true);
  SMOOTHCE_COUNT_WRITE(sizeof(Pack<T>));
  *reinterpret_cast<Pack<T>*>(ptr) = pack;
}

// Shared memory (static, dynamic, or a cluster peer's through cluster_smem).
template <typename T>
__device__ __forceinline__ T load_shared(const T* ptr SMOOTHCE_SITE_PARAMS) {
  SMOOTHCE_ON_SHARED(ptr, sizeof(T), access_align<T>(), false);
  return *ptr;
}

template <typename T>
__device__ __forceinline__ void store_shared(T* ptr, typename Same<T>::type value SMOOTHCE_SITE_PARAMS) {
  SMOOTHCE_ON_SHARED(ptr, sizeof(T), access_align<T>(), true);
  *ptr = value;
}

// Elements before the first 16-byte boundary at or after ptr (ptr is aligned to its element size).
template <typename T>
__device__ __forceinline__ int misaligned_head(const T* ptr) {
  const int bytes = static_cast<int>(reinterpret_cast<uintptr_t>(ptr) & 15u);
  return bytes == 0 ? 0 : (16 - bytes) / static_cast<int>(sizeof(T));
}

}  // namespace smoothce::cuda
