// The emulator's Python module (built by tests/emulator.py, never shipped): the emulated CUDA ops
// (ops.cpp), the emulator's own controls and self-test kernels (selftest.cpp).
#include <torch/extension.h>

void bind_runtime(pybind11::module_& m);    // emu.cpp: traffic counters, limits
void bind_selftests(pybind11::module_& m);  // selftest.cpp: tiny known kernels
void bind_ops(pybind11::module_& m);        // ops.cpp: csrc/cuda's driver and kernels on CPU tensors
void bind_arith(pybind11::module_& m);      // arith.cpp: the device arithmetic modes
void bind_memcheck(pybind11::module_& m);   // memcheck.cpp: global-memory bounds and cross-block races
void bind_sanitizer_selftests(pybind11::module_& m);  // sanitizer_selftest.cpp: racecheck, launch rules

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_runtime(m);
  bind_selftests(m);
  bind_ops(m);
  bind_arith(m);
  bind_memcheck(m);
  bind_sanitizer_selftests(m);
}
