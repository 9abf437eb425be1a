// The CUDA subset the kernels of csrc/cuda/*.cuh may use, so that the same source builds with nvcc
// (real kernels) and with the host compiler under the test suite's emulator (tests/emu/emu.h,
// which must be included before any csrc/cuda header there).
//
// Kernels may use ONLY (the emulator implements exactly this list):
//   __global__ __device__ __host__ __forceinline__ __launch_bounds__(n) __restrict__
//   threadIdx blockIdx blockDim gridDim (.x .y .z), warpSize (32)
//   __syncthreads(), __syncwarp(mask)
//   __shfl_xor_sync / __shfl_down_sync / __shfl_sync(mask, value, lane, width) on float, double,
//     int, unsigned, long long
//   static `__shared__` arrays of trivial types; dynamic shared memory only via
//     SMOOTHCE_DYNAMIC_SMEM(type, name)
//   __threadfence()
//   math: expf logf exp log fmaxf fminf fabsf (and std:: forms through row_math.h)
//   SMOOTHCE_DEVICE_INDEX_ERROR(value, classes, ignore_index): an out-of-range target (device assert)
//   thread-block clusters (sm_90) through smoothce::cuda::cluster_sync(), cluster_rank() and
//     cluster_smem(ptr, rank) (map_shared_rank); a kernel launched in clusters uses dynamic shared
//     memory only (the emulator runs a cluster's blocks on one OS thread, where static __shared__
//     would be one copy for all of them)
// Global memory is read and written only through memory.cuh (which counts bytes under emulation).
// Launches only through SMOOTHCE_LAUNCH(kernel, grid, block, smem_bytes, args...) on the current
// stream, or SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, smem_bytes, cluster_blocks, args...).
#pragma once

#include <cstdint>
#include <utility>

#if defined(__CUDACC__)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>

#define SMOOTHCE_EMULATED 0
#define SMOOTHCE_DYNAMIC_SMEM(type, name)                        \
  extern __shared__ __align__(16) unsigned char smoothce_smem[]; \
  type* name = reinterpret_cast<type*>(smoothce_smem)
#define SMOOTHCE_COUNT_READ(bytes) ((void)0)
#define SMOOTHCE_COUNT_WRITE(bytes) ((void)0)

// Same behaviour as torch's nll_loss on CUDA: a device-side assert (the context reports it at the
// next synchronisation), after printing which value was wrong.
#define SMOOTHCE_DEVICE_INDEX_ERROR(value, classes, ignore_index)                                         \
  do {                                                                                                    \
    printf("smoothce.cross_entropy: target value %lld is out of bounds: expected class indices in "       \
           "[0, %lld) or ignore_index (%lld)\n",                                                          \
           static_cast<long long>(value), static_cast<long long>(classes),                                \
           static_cast<long long>(ignore_index));                                                         \
    CUDA_KERNEL_ASSERT(false && "smoothce: target out of bounds");                                        \
  } while (0)

namespace smoothce::cuda {
// Kernels that ask for more than the default 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t smem_bytes) {
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
}
}  // namespace smoothce::cuda

#define SMOOTHCE_LAUNCH(kernel, grid, block, smem_bytes, ...)                                      \
  do {                                                                                             \
    ::smoothce::cuda::allow_smem(kernel, smem_bytes);                                              \
    kernel<<<grid, block, smem_bytes, ::at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);          \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                \
  } while (0)

namespace smoothce::cuda {

// A launch in clusters of `cluster_blocks` consecutive blocks along x, on the current stream.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1];

  ClusterLaunch(dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem_bytes;
    config.stream = ::at::cuda::getCurrentCUDAStream();
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster_blocks;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config.attrs points into this object
};

// Whether the device can run such clusters at all (the blocks of a cluster must fit on one GPC at
// once); the launcher falls back to a plan without clusters when it cannot.
template <typename... Params>
inline bool cluster_fits(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
  allow_smem(kernel, smem_bytes);
  const ClusterLaunch launch(grid, block, smem_bytes, cluster_blocks);
  int clusters = 0;
  return cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) == cudaSuccess && clusters > 0;
}

template <typename... Params, typename... Args>
inline void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                           unsigned cluster_blocks, Args&&... args) {
  allow_smem(kernel, smem_bytes);
  const ClusterLaunch launch(grid, block, smem_bytes, cluster_blocks);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, std::forward<Args>(args)...));
}

// The cluster kernels run only where the plan asked for clusters (sm_90 and newer); the sm_80 build
// of their code traps.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  __trap();
  return 0;
#endif
}

template <typename T>
__device__ __forceinline__ T* cluster_smem(T* ptr, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(ptr, rank);
#else
  __trap();
  return ptr;
#endif
}

}  // namespace smoothce::cuda

#define SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, smem_bytes, cluster_blocks, ...) \
  ::smoothce::cuda::launch_cluster(kernel, grid, block, smem_bytes, cluster_blocks, __VA_ARGS__)

#else  // host compiler: the emulator must have defined the CUDA subset

#ifndef SMOOTHCE_EMULATOR
#error "csrc/cuda headers build with nvcc, or with the host compiler after tests/emu/emu.h"
#endif
#define SMOOTHCE_EMULATED 1
#define SMOOTHCE_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())
#define SMOOTHCE_COUNT_READ(bytes) ::emu::count_read(bytes)
#define SMOOTHCE_COUNT_WRITE(bytes) ::emu::count_write(bytes)
#define SMOOTHCE_DEVICE_INDEX_ERROR(value, classes, ignore_index) \
  ::emu::index_error(static_cast<long long>(value), static_cast<long long>(classes), static_cast<long long>(ignore_index))
#define SMOOTHCE_LAUNCH(kernel, grid, block, smem_bytes, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem_bytes), __VA_ARGS__)
#define SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, smem_bytes, cluster_blocks, ...)                       \
  ::emu::launch_cluster(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem_bytes),                      \
                        static_cast<unsigned>(cluster_blocks), __VA_ARGS__)

namespace smoothce::cuda {
template <typename Kernel>
inline bool cluster_fits(Kernel, dim3, dim3, size_t, unsigned) {
  return true;  // the emulator runs every cluster emu::launch_cluster accepts
}
// (the caller's file and line name the barrier in the emulator's messages)
inline void cluster_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::cluster_sync(file, line);
}
inline unsigned cluster_rank() { return ::emu::cluster_rank(); }
template <typename T>
inline T* cluster_smem(T* ptr, unsigned rank) {
  return static_cast<T*>(::emu::cluster_smem(static_cast<void*>(ptr), rank));
}
}  // namespace smoothce::cuda

#endif

namespace smoothce::cuda {
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
}  // namespace smoothce::cuda
