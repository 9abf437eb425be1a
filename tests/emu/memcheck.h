// memcheck of global memory (memcheck.cpp), like compute-sanitizer's memcheck on a GPU: every
// access that memory.cuh reports through emu::global_access (emu.h) is checked for
//   - alignment: the address a multiple of the access's alignment (always, when memcheck is on);
//   - bounds: the bytes lie inside ONE live tensor's storage: a tensor an emulated op was given (a
//     MemcheckScope names them) or a CPU allocation made while an op runs (outputs, scratch: every
//     at::empty goes through a tracking allocator installed when the module loads);
//   - cross-block races: a 2-byte granule written by one block (one cluster, in a cluster launch)
//     and read or written by another of the same launch (CUDA orders no two blocks of a launch).
// Bounds and races are checked only while a MemcheckScope is active (the emulated ops open one):
// kernels launched outside any op (the emulator's own self-tests, called from Python with their
// tensors) get the alignment check only. A failure stops the launch (detail::sanitizer_failure):
// launch() raises std::runtime_error naming the kernel, block and thread, then the access.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace emu {

// On by default; off: global_access returns at once, no allocation is tracked.
bool memcheck_enabled();
void set_memcheck(bool on);

// The tensors of one emulated op: their storages' whole byte ranges are valid global memory (and
// CPU allocations made until the scope ends too) until the scope ends. Scopes nest and may overlap
// across threads (a counter). The scope keeps the storages alive while it lasts.
class MemcheckScope {
 public:
  struct Arg {
    Arg(const char* arg_name, const at::Tensor& t) : name(arg_name), tensor(t.defined() ? &t : nullptr) {}
    Arg(const char* arg_name, const c10::optional<at::Tensor>& t)
        : name(arg_name), tensor(t.has_value() && t->defined() ? &*t : nullptr) {}
    const char* name;
    const at::Tensor* tensor;  // null: an absent optional argument
  };

  MemcheckScope(const char* op, std::initializer_list<Arg> args);
  ~MemcheckScope();
  MemcheckScope(const MemcheckScope&) = delete;
  MemcheckScope& operator=(const MemcheckScope&) = delete;

 private:
  bool active_ = false;
  const char* previous_op_ = nullptr;
  std::vector<std::pair<void*, uint64_t>> registrations_;  // (range, label token)
  std::vector<c10::Storage> storages_;
};

}  // namespace emu
