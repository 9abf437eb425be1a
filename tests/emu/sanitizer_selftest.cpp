// Tiny kernels, correct and known-bad, for the emulator's shared-memory sanitizer, launch rules and
// schedules (tests/test_sanitizer.py). Written with the CUDA subset of cuda/compat.cuh and the
// accessors of cuda/memory.cuh, so that the checks see them as they see the real kernels.
#include <torch/extension.h>

#include "emu.h"

#include "cuda/compat.cuh"
#include "cuda/memory.cuh"

namespace emu_sanitizer {

using smoothce::cuda::cluster_rank;
using smoothce::cuda::cluster_smem;
using smoothce::cuda::cluster_sync;
using smoothce::cuda::load_shared;
using smoothce::cuda::Pack;
using smoothce::cuda::store_shared;

enum RaceMode : int {
  kBarrier = 0,         // write, __syncthreads, read another warp's value: correct
  kNoBarrier = 1,       // the same without the barrier: read after write across warps
  kWriteAfterRead = 2,  // read a neighbour's slot, then (no barrier) overwrite one's own slot
  kWarpNoSync = 3,      // lane l reads lane l+1's slot of the same warp, no __syncwarp: a race
  kWarpSync = 4,        // the same with __syncwarp: correct
  kStaticNoBarrier = 5, // kNoBarrier on static shared memory
  kSameThread = 6,      // each thread rewrites and rereads its own slot: correct
  kPartialSyncwarp = 7, // __syncwarp over half the warp, read across the halves: a race
};

// out[t] = the value thread t read (another thread's index, or its own).
__global__ void race_kernel(int* __restrict__ out, int mode) {
  SMOOTHCE_DYNAMIC_SMEM(int, dynamic);
  SMOOTHCE_SHARED(int, fixed, 1024);
  int* slots = mode == kStaticNoBarrier ? fixed : dynamic;
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  const int lane = t % 32, warp_base = t - lane;
  int seen = -1;
  switch (mode) {
    case kBarrier:
    case kNoBarrier:
    case kStaticNoBarrier:
      store_shared(slots + t, t);
      if (mode == kBarrier) __syncthreads();
      seen = load_shared(slots + (t + 32) % n);
      break;
    case kWriteAfterRead:
      store_shared(slots + t, t);
      __syncthreads();
      seen = load_shared(slots + (t + 32) % n);
      store_shared(slots + t, -t);
      break;
    case kWarpNoSync:
    case kWarpSync:
      store_shared(slots + t, t);
      if (mode == kWarpSync) __syncwarp();
      seen = load_shared(slots + warp_base + (lane + 1) % 32);
      break;
    case kSameThread:
      store_shared(slots + t, t);
      store_shared(slots + t, t + 1);
      seen = load_shared(slots + t) - 1;
      break;
    case kPartialSyncwarp:
      store_shared(slots + t, t);
      __syncwarp(lane < 16 ? 0x0000ffffu : 0xffff0000u);
      seen = load_shared(slots + warp_base + (lane + 1) % 32);  // lane 15 reads lane 16's slot
      break;
  }
  out[blockIdx.x * n + t] = seen;
}

// Each block of a cluster writes its rank into its dynamic shared memory, then (after the cluster
// barrier, or without it: `synced` false, a race) reads the next rank's; with `final_sync` false a
// block may exit while the previous rank still reads its shared memory (a race too).
__global__ void cluster_race_kernel(int* __restrict__ out, bool synced, bool final_sync) {
  SMOOTHCE_DYNAMIC_SMEM(int, slot);
  const unsigned rank = cluster_rank(), blocks = gridDim.x;
  if (threadIdx.x == 0) store_shared(slot, static_cast<int>(rank));
  if (synced) cluster_sync();
  if (threadIdx.x == 0) out[blockIdx.x] = load_shared(cluster_smem(slot, (rank + 1) % blocks));
  if (final_sync) cluster_sync();  // no block leaves while another may still read its shared memory
}

// A 16-byte vector store to shared memory `offset` bytes into the dynamic buffer.
__global__ void misaligned_shared_kernel(int offset) {
  SMOOTHCE_DYNAMIC_SMEM(unsigned char, bytes);
  if (threadIdx.x == 0) store_shared(reinterpret_cast<Pack<float>*>(bytes + offset), Pack<float>{{1.f, 2.f, 3.f, 4.f}});
}

// Reads its static array before writing it (each block), then writes it: out[block] = the bits read.
__global__ void static_poison_kernel(uint32_t* __restrict__ out) {
  SMOOTHCE_SHARED(uint32_t, word, 4);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = load_shared(word + 1);
    store_shared(word + 1, 7u);
  }
}

// `words` ints of static shared memory (a template: one kernel per size) next to the launch's
// dynamic shared memory.
template <int words>
__global__ void static_and_dynamic_kernel(int* __restrict__ out) {
  SMOOTHCE_SHARED(int, fixed, words);
  if (threadIdx.x == 0) {
    store_shared(fixed + words - 1, 1);
    out[blockIdx.x] = load_shared(fixed + words - 1);
  }
}

__global__ void __launch_bounds__(64) bounded_kernel(int* __restrict__ out) { out[threadIdx.x] = 1; }

// Order of arrival at a barrier without race detection: each thread appends its index to a shared
// log; the log is the order in which the emulator resumed the threads (the schedule).
__global__ void order_kernel(int* __restrict__ out) {
  SMOOTHCE_SHARED(int, log, 1025);
  if (threadIdx.x == 0) log[0] = 0;
  __syncthreads();
  log[1 + log[0]++] = static_cast<int>(threadIdx.x);  // deliberately unsynchronised (racecheck off)
  __syncwarp();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) out[i] = log[1 + i];
}

torch::Tensor race(int64_t blocks, int64_t threads, int64_t mode) {
  torch::Tensor out = torch::full({blocks * threads}, -2, torch::kInt);
  SMOOTHCE_LAUNCH(race_kernel, blocks, threads, threads * 4, out.data_ptr<int>(), static_cast<int>(mode));
  return out;
}

torch::Tensor cluster_race(int64_t cluster_blocks, bool synced, bool final_sync) {
  torch::Tensor out = torch::full({cluster_blocks}, -2, torch::kInt);
  SMOOTHCE_LAUNCH_CLUSTER(cluster_race_kernel, cluster_blocks, 32, 16, cluster_blocks, out.data_ptr<int>(), synced,
                          final_sync);
  return out;
}

void misaligned_shared(int64_t offset) { SMOOTHCE_LAUNCH(misaligned_shared_kernel, 1, 32, 64, static_cast<int>(offset)); }

torch::Tensor static_poison(int64_t blocks) {
  torch::Tensor out = torch::zeros({blocks}, torch::kInt);
  SMOOTHCE_LAUNCH(static_poison_kernel, blocks, 32, 0, reinterpret_cast<uint32_t*>(out.data_ptr<int>()));
  return out;
}

// A launch of static_and_dynamic_kernel<1024> (4 KiB static) with `dynamic` bytes, after raising the
// kernel's limit to `opt_in` bytes (0: no opt-in).
torch::Tensor static_and_dynamic(int64_t dynamic, int64_t opt_in) {
  torch::Tensor out = torch::zeros({1}, torch::kInt);
  auto kernel = &static_and_dynamic_kernel<1024>;
  if (opt_in > 0) emu::func_set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<size_t>(opt_in));
  SMOOTHCE_LAUNCH(kernel, 1, 32, dynamic, out.data_ptr<int>());
  return out;
}

torch::Tensor bounded(int64_t threads) {
  torch::Tensor out = torch::zeros({threads}, torch::kInt);
  SMOOTHCE_LAUNCH(bounded_kernel, 1, threads, 0, out.data_ptr<int>());
  return out;
}

torch::Tensor order(int64_t threads) {
  torch::Tensor out = torch::full({threads}, -1, torch::kInt);
  SMOOTHCE_LAUNCH(order_kernel, 1, threads, 0, out.data_ptr<int>());
  return out;
}

// The cluster query, its error cleared or not (`clear`), then a plain launch (whose check reports a
// pending error).
torch::Tensor query_clusters_then_launch(bool clear) {
  int clusters = 0;
  if (smoothce::cuda::max_active_clusters(&cluster_race_kernel, dim3(2), dim3(32), 16, 2, &clusters) != 0 && clear)
    smoothce::cuda::clear_last_error();
  torch::Tensor out = torch::zeros({1}, torch::kInt);
  SMOOTHCE_LAUNCH(bounded_kernel, 1, 1, 0, out.data_ptr<int>());
  return out;
}

}  // namespace emu_sanitizer

// A kernel's attributes as cudaFuncGetAttributes reports them (static size after its first run).
pybind11::dict kernel_attributes_dict(const void* kernel) {
  const emu::FuncAttributes a = emu::func_attributes(kernel);
  pybind11::dict d;
  d["static_smem"] = a.static_smem;
  d["max_dynamic_smem"] = a.max_dynamic_smem;
  d["max_threads"] = a.max_threads;
  d["ptx_arch"] = a.ptx_arch;
  return d;
}

void bind_sanitizer_selftests(pybind11::module_& m) {
  using namespace emu_sanitizer;
  pybind11::module_ s = m.def_submodule("sanitizer", "known kernels, correct and bad, for the sanitizer checks");
  s.def("race", &race, "race_kernel (RaceMode `mode`): the value each thread read");
  s.def("cluster_race", &cluster_race, "each rank's read of the next rank's slot");
  s.def("misaligned_shared", &misaligned_shared, "a 16-byte store `offset` bytes into shared memory");
  s.def("static_poison", &static_poison, "per block: the bits of a static word read before any write");
  s.def("static_and_dynamic", &static_and_dynamic, "4 KiB static + `dynamic` bytes, opt-in to `opt_in` (0: none)");
  s.def("static_and_dynamic_attributes", [] {
    return kernel_attributes_dict(reinterpret_cast<const void*>(&static_and_dynamic_kernel<1024>));
  });
  s.def("bounded", &bounded, "a kernel with __launch_bounds__(64) on `threads` threads");
  s.def("bounded_attributes", [] { return kernel_attributes_dict(reinterpret_cast<const void*>(&bounded_kernel)); });
  s.def("query_clusters_then_launch", &query_clusters_then_launch, "cluster occupancy query, then a launch");
  s.def("order", &order, "the order in which the block's threads resumed after a barrier");
}
