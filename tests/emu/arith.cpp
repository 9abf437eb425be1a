// The device arithmetic modes of the emulator (arith.h): the mode, its Python bindings, and what
// tests/test_device_arithmetic.py needs to check it (the functions on a tensor, a tiny kernel).
#include <torch/extension.h>

#include "emu.h"

#include <string>

namespace emu::arith {

namespace detail {
Mode mode = Mode::exact;
uint32_t seed = 0;
}  // namespace detail

bool flush_to_zero() { return device(); }

namespace {

const char* mode_name(Mode mode) { return mode == Mode::device ? "device" : "exact"; }

void set_arithmetic(const std::string& name, uint32_t seed) {
  if (name == "exact") detail::mode = Mode::exact;
  else if (name == "device") detail::mode = Mode::device;
  else throw pybind11::value_error("set_arithmetic: expected 'exact' or 'device', got '" + name + "'");
  detail::seed = seed;
}

// One of the kernels' operations, elementwise on the host (outside any launch: no MXCSR flags,
// only what arith.h itself does). op: exp, log, div (a / b, -prec-div=false), __expf, __logf,
// __fdividef. float32 or float64 (fp64: the intrinsics are float-only).
torch::Tensor apply(const std::string& op, const torch::Tensor& a, const c10::optional<torch::Tensor>& b_opt) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat || a.scalar_type() == torch::kDouble, "apply: float or double");
  const bool binary = op == "div" || op == "__fdividef";
  TORCH_CHECK(binary == b_opt.has_value(), "apply: ", op, binary ? " needs" : " takes no", " second operand");
  torch::Tensor x = a.contiguous(), y = binary ? b_opt->to(a.scalar_type()).expand_as(a).contiguous() : x;
  torch::Tensor out = torch::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "apply", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* py = y.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (op == "__expf") { for (int64_t i = 0; i < n; ++i) po[i] = __expf(px[i]); return; }
      if (op == "__logf") { for (int64_t i = 0; i < n; ++i) po[i] = __logf(px[i]); return; }
      if (op == "__fdividef") { for (int64_t i = 0; i < n; ++i) po[i] = __fdividef(px[i], py[i]); return; }
    }
    if (op == "exp") for (int64_t i = 0; i < n; ++i) po[i] = exp(px[i]);
    else if (op == "log") for (int64_t i = 0; i < n; ++i) po[i] = log(px[i]);
    else if (op == "div") for (int64_t i = 0; i < n; ++i) po[i] = div(px[i], py[i]);
    else TORCH_CHECK(false, "apply: unknown op '", op, "' for ", x.scalar_type());
  });
  return out;
}

// One thread per element: out[i] = (x·y, x + y, exp(x), x / y (div)) computed inside a launch, where
// device mode's FTZ/DAZ applies to plain arithmetic too.
__global__ void ftz_kernel(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ out,
                           int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  // volatile: the compiler must not fold the operations (the flags act at run time)
  volatile float a = x[i], b = y[i];
  out[4 * i + 0] = a * b;
  out[4 * i + 1] = a + b;
  out[4 * i + 2] = exp(static_cast<float>(a));
  out[4 * i + 3] = div(static_cast<float>(a), static_cast<float>(b));
}

torch::Tensor in_kernel(const torch::Tensor& x, const torch::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat && x.dim() == 1 &&
              y.sizes() == x.sizes(), "in_kernel: two float vectors of one size");
  torch::Tensor a = x.contiguous(), b = y.contiguous();
  torch::Tensor out = torch::empty({a.numel(), 4}, a.options());
  const int64_t n = a.numel(), threads = 64;
  if (n > 0)
    launch(ftz_kernel, dim3(static_cast<unsigned>((n + threads - 1) / threads)), dim3(threads), 0,
           a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), n);
  return out;
}

}  // namespace
}  // namespace emu::arith

void bind_arith(pybind11::module_& m) {
  using namespace emu::arith;
  m.def("set_arithmetic", &set_arithmetic, pybind11::arg("name"), pybind11::arg("seed") = 0,
        "the kernels' exp/log/division: 'exact' (host libm) or 'device' (nvcc --use_fast_math: "
        "documented maximum errors, flush to zero; `seed`: which error pattern); see tests/emu/arith.h");
  m.def("arithmetic_seed", [] { return emu::arith::detail::seed; }, "the seed of device mode's error pattern");
  m.def("arithmetic", [] { return std::string(mode_name(emu::arith::detail::mode)); }, "the current arithmetic mode");
  pybind11::module_ s = m.def_submodule("arith", "checks of the device arithmetic (tests/test_device_arithmetic.py)");
  s.def("apply", &apply, pybind11::arg("op"), pybind11::arg("a"), pybind11::arg("b") = pybind11::none(),
        "op (exp, log, div, __expf, __logf, __fdividef) elementwise on the host");
  s.def("in_kernel", &in_kernel, "(x*y, x+y, exp(x), div(x, y)) per element, computed inside an emulated launch");
  s.def("flush_to_zero", &flush_to_zero, "whether launches set FTZ/DAZ");
}
