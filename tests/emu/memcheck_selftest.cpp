// Tiny kernels that test memcheck (memcheck.h) itself (tests/test_memcheck.py): known-bad ones that
// it must report, and correct controls. Written like the real kernels, with only the CUDA subset of
// cuda/compat.cuh and memory.cuh's accessors (which report every access to memcheck). Each binding
// runs its launch inside a MemcheckScope naming its tensor arguments, as the emulated ops do, and
// allocates its outputs inside it (tracked allocations).
#include <torch/extension.h>

#include "emu.h"
#include "memcheck.h"

#include "cuda/compat.cuh"
#include "cuda/memory.cuh"

#include <optional>

namespace emu_memcheck_selftest {

using smoothce::cuda::load_global;
using smoothce::cuda::load_pack;
using smoothce::cuda::Pack;
using smoothce::cuda::store_global;
using smoothce::cuda::store_pack;

// Correct: block b owns out[b * blockDim.x, (b + 1) * blockDim.x); every thread also reads in[0],
// which all blocks share and nobody writes: out[i] = 2 * in[i] + in[0].
__global__ void slices_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  store_global(out + i, 2.0f * load_global(in + i) + load_global(in));
}

// Thread 0 copies the 16-byte vector at in + in_offset to out + out_offset (misaligned when an
// offset is not a multiple of 4 floats).
__global__ void pack_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t in_offset,
                            int64_t out_offset) {
  if (threadIdx.x != 0) return;
  const Pack<float> pack = load_pack(in + in_offset);
  store_pack(out + out_offset, pack);
}

// Every thread copies its element (out[i] = in[i], i < n), then thread `thread` of the last block
// reads in[index] (write false) or writes out[index] (write true).
__global__ void index_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n, int64_t index,
                             bool write, int thread) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) store_global(out + i, load_global(in + i));
  if (blockIdx.x != gridDim.x - 1 || static_cast<int>(threadIdx.x) != thread) return;
  if (write) store_global(out + index, 1.0f);
  else store_global(out, load_global(in + index));
}

// Thread 0 of each block: block b owns data[b] (a 2-byte element: neighbouring blocks share no
// granule); data[gridDim.x] is the element the modes make blocks meet at, S.
// mode 0 (correct): data[b] += S.  1: every block writes S.  2: block 0 writes S, the others read it.
// 3: block 0 reads S, the others write it.  4: blocks 0 and 1 read S, the others write it.
// 5 (correct): data[b] += 1.  6 (correct): block b reads its neighbour's element data[(b + 1) % blocks].
__global__ void race_kernel(int16_t* __restrict__ data, int mode) {
  if (threadIdx.x != 0) return;
  const unsigned b = blockIdx.x;
  int16_t* const shared = data + gridDim.x;
  switch (mode) {
    case 0:
      store_global(data + b, static_cast<int16_t>(load_global(data + b) + load_global(shared)));
      break;
    case 1:
      store_global(shared, static_cast<int16_t>(b));  // 1: every block writes S
      break;
    case 2:
      if (b == 0) store_global(shared, int16_t{7});  // 2: block 0 writes S
      else store_global(data + b, load_global(shared));  // 2: the others read S
      break;
    case 3:
      if (b == 0) store_global(data, load_global(shared));  // 3: block 0 reads S
      else store_global(shared, static_cast<int16_t>(b));  // 3: the others write S
      break;
    case 4:
      if (b < 2) store_global(data + b, load_global(shared));  // 4: blocks 0 and 1 read S
      else store_global(shared, static_cast<int16_t>(b));  // 4: the others write S
      break;
    case 6:
      (void)load_global(data + (b + 1) % gridDim.x);  // 6: the neighbour's element
      break;
    default:
      store_global(data + b, static_cast<int16_t>(load_global(data + b) + 1));
      break;
  }
}

namespace {

float* floats(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), "expected a contiguous float tensor");
  return t.data_ptr<float>();
}

torch::Tensor slices(const torch::Tensor& in, int64_t threads) {
  emu::MemcheckScope memcheck("memcheck_selftest.slices", {{"in", in}});
  const int64_t n = in.numel(), blocks = std::max<int64_t>(1, (n + threads - 1) / threads);
  torch::Tensor out = torch::empty_like(in);
  SMOOTHCE_LAUNCH(slices_kernel, blocks, threads, 0, static_cast<const float*>(floats(in)), floats(out), n);
  return out;
}

torch::Tensor pack(const torch::Tensor& in, int64_t in_offset, int64_t out_offset) {
  emu::MemcheckScope memcheck("memcheck_selftest.pack", {{"in", in}});
  torch::Tensor out = torch::zeros({out_offset + 8}, in.options());
  SMOOTHCE_LAUNCH(pack_kernel, 1, 32, 0, static_cast<const float*>(floats(in)), floats(out), in_offset, out_offset);
  return out;
}

// register_in false: `in` is not named to the scope (memory no op was given).
torch::Tensor index_access(const torch::Tensor& in, int64_t blocks, int64_t threads, int64_t index, bool write,
                    int64_t thread, bool register_in) {
  emu::MemcheckScope memcheck("memcheck_selftest.index", {{"in", register_in ? in : torch::Tensor()}});
  torch::Tensor out = torch::zeros_like(in);
  SMOOTHCE_LAUNCH(index_kernel, blocks, threads, 0, static_cast<const float*>(floats(in)), floats(out), in.numel(),
                  index, write, static_cast<int>(thread));
  return out;
}

// data: int16, blocks + 1 elements, updated in place. No cluster_blocks: a plain launch.
void race(torch::Tensor& data, int64_t mode, std::optional<int64_t> cluster_blocks) {
  TORCH_CHECK(data.scalar_type() == torch::kShort && data.is_contiguous() && data.numel() >= 2);
  emu::MemcheckScope memcheck("memcheck_selftest.race", {{"data", data}});
  const int64_t blocks = data.numel() - 1;
  int16_t* ptr = data.data_ptr<int16_t>();
  if (cluster_blocks) SMOOTHCE_LAUNCH_CLUSTER(race_kernel, blocks, 32, 0, *cluster_blocks, ptr, static_cast<int>(mode));
  else SMOOTHCE_LAUNCH(race_kernel, blocks, 32, 0, ptr, static_cast<int>(mode));
}

}  // namespace
}  // namespace emu_memcheck_selftest

void bind_memcheck_selftests(pybind11::module_& m) {
  using namespace emu_memcheck_selftest;
  pybind11::module_ s = m.def_submodule("memcheck_selftest", "known kernels that test memcheck (global memory)");
  s.def("slices", &slices, "correct: out = 2 * in + in[0], each block its own slice", pybind11::arg("input"),
        pybind11::arg("threads") = 32);
  s.def("pack", &pack, "thread 0 copies a 16-byte vector from in + in_offset to out + out_offset (out has "
                       "out_offset + 8 floats)",
        pybind11::arg("input"), pybind11::arg("in_offset"), pybind11::arg("out_offset"));
  s.def("index", &index_access, "copy, then thread `thread` of the last block reads in[index] (or writes out[index])",
        pybind11::arg("input"), pybind11::arg("blocks"), pybind11::arg("threads"), pybind11::arg("index"),
        pybind11::arg("write"), pybind11::arg("thread") = 0, pybind11::arg("register_input") = true);
  s.def("race", &race, "int16 data of blocks + 1 elements; mode 0 correct, 1 all blocks write S, 2 block 0 writes "
                       "S and the others read it, 3 block 0 reads S and the others write it, 4 blocks 0 and 1 "
                       "read S and the others write it, 5 correct (data[b] += 1), 6 correct (block b reads data[(b + 1) % blocks])",
        pybind11::arg("data"), pybind11::arg("mode"), pybind11::arg("cluster_blocks") = std::nullopt);
}
