// The eager training path in C++: smoothce.cross_entropy's autograd node for the common case (the
// logits need a gradient; not inplace_backward, no divisor, the target needs none), so that a call
// pays for one C++ node instead of a Python autograd.Function and a Python backward. It is the same
// algorithm as smoothce/_function.py's CrossEntropyFunction (which serves every other case, and
// torch.compile): for 'mean' and 'sum' the forward kernel writes the gradient for an upstream
// gradient of 1 (on CPU: the one the last two backwards received, g_expected_scale, which the Python
// Function does not guess) and the first backward rescales it in place where it differs;
// 'none' and a second backward through a retained graph recompute it from the saved logits;
// create_graph=True calls back into Python for a differentiable gradient.
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>

#include "smoothce/problem.h"

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace smoothce {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using ForwardOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t,
                                                     double, bool, bool, const OptTensor&,
                                                     std::optional<c10::ArrayRef<double>>, double, const OptTensor&,
                                                     const OptTensor&, double);
using ScaleGradOp = void(Tensor&, const Tensor&);

// The ops of one namespace: smoothce, or the test suite's smoothce_emu (the CUDA kernels' source
// run on CPU). Filled under the GIL on first use and never changed after, so the backward (on
// autograd's threads, without the GIL) reads them freely.
struct Ops {
  std::string ns;
  c10::TypedOperatorHandle<ForwardOp> forward;
  c10::TypedOperatorHandle<ScaleGradOp> scale_grad;
};
constexpr int kMaxNamespaces = 4;
std::array<std::optional<Ops>, kMaxNamespaces> g_ops;

int64_t ops_slot(const char* ns) {
  for (int64_t i = 0; i < kMaxNamespaces; ++i) {
    if (!g_ops[i].has_value()) {
      auto& dispatcher = c10::Dispatcher::singleton();
      g_ops[i] = Ops{ns, dispatcher.findSchemaOrThrow((std::string(ns) + "::forward").c_str(), "").typed<ForwardOp>(),
                     dispatcher.findSchemaOrThrow((std::string(ns) + "::scale_grad_").c_str(), "")
                         .typed<ScaleGradOp>()};
      return i;
    }
    if (g_ops[i]->ns == ns) return i;
  }
  TORCH_CHECK(false, "smoothce: more than ", kMaxNamespaces, " op namespaces");
}

// Python's differentiable gradient (smoothce._function._differentiable_input_grad), for create_graph=True.
PyObject* g_differentiable_grad = nullptr;

// The arguments other than tensors, as the op takes them.
struct Options {
  int64_t ops = 0;  // g_ops slot
  int64_t ignore_index = -100;
  int64_t reduction = 1;
  double label_smoothing = 0.0;
  bool float32_loss = false;
  std::optional<std::vector<double>> target_values;
  double z_loss = 0.0;
  double lam_value = 1.0;
};

std::optional<c10::ArrayRef<double>> values_ref(const std::optional<std::vector<double>>& values) {
  if (!values.has_value()) return std::nullopt;
  return c10::ArrayRef<double>(*values);
}

// The forward op of o's namespace, with o's options: (loss, lse, gradient for grad_output when compute_grad).
std::tuple<Tensor, Tensor, Tensor> call_forward(const Options& o, const Tensor& input, const Tensor& target,
                                                const OptTensor& weight, const OptTensor& target_b,
                                                const OptTensor& lam, bool compute_grad,
                                                const OptTensor& grad_output) {
  return g_ops[o.ops]->forward.call(input, target, weight, o.ignore_index, o.reduction, o.label_smoothing,
                                    compute_grad, o.float32_loss, grad_output, values_ref(o.target_values), o.z_loss,
                                    target_b, lam, o.lam_value);
}

OptTensor optional_tensor(const c10::IValue& value) {
  return value.isNone() ? OptTensor() : OptTensor(value.toTensor());
}

// Options travel to the backward as one IValue tuple (one map entry instead of eight).
c10::IValue pack(const Options& o, const OptTensor& target_b, const OptTensor& lam) {
  c10::IValue values = o.target_values.has_value() ? c10::IValue(*o.target_values) : c10::IValue();
  return c10::ivalue::Tuple::create(std::vector<c10::IValue>{o.ops, o.ignore_index, o.reduction, o.label_smoothing, o.float32_loss,
                                     std::move(values), o.z_loss, o.lam_value,
                                     target_b.has_value() ? c10::IValue(*target_b) : c10::IValue(),
                                     lam.has_value() ? c10::IValue(*lam) : c10::IValue()});
}

Options unpack(const c10::IValue& packed, OptTensor& target_b, OptTensor& lam) {
  const c10::ArrayRef<c10::IValue> e = packed.toTupleRef().elements().asArrayRef();
  Options o;
  o.ops = e[0].toInt();
  o.ignore_index = e[1].toInt();
  o.reduction = e[2].toInt();
  o.label_smoothing = e[3].toDouble();
  o.float32_loss = e[4].toBool();
  if (!e[5].isNone()) o.target_values = e[5].toDoubleVector();
  o.z_loss = e[6].toDouble();
  o.lam_value = e[7].toDouble();
  target_b = optional_tensor(e[8]);
  lam = optional_tensor(e[9]);
  return o;
}

bool is_power_of_two(double g) {
  int exponent = 0;
  return std::abs(std::frexp(g, &exponent)) == 0.5;
}

// Whether to rescale the fused gradient (computed for an upstream gradient of 1 and already rounded
// to its dtype) by grad_loss, rather than recompute it scaled inside the kernel. Rescaling rounds
// each element a second time. In bf16 and fp16 that is a visible error (bf16 512×1000, ε = 0.1,
// loss / 3: 36% of the elements 1 ulp off the float64 value rounded once, against 0.01% scaled inside
// the kernel), so half-type gradients on CPU are recomputed for any upstream gradient but 1 and, in
// bf16, powers of two (only the exponent changes; fp16 gradients are often subnormal, below 6.1e-5,
// where a power of two scales their rounding error too). The recompute reads the logits where the
// rescale reads the gradient, but runs the kernel's arithmetic again: fwd+bwd with loss / 3 took
// 1.3–1.7× the time of loss * 0.5 (Zen 4 VM, 2 threads). fp32 and fp64 rescale: at most 1 ulp of the
// accumulation dtype. On a GPU, reading grad_loss would synchronize with the device: rescaled.
// smoothce/_function.py's _rescale_fused_grad is the same test for the Python autograd.Function.
// host_g: grad_loss's value where it is a scalar on the CPU (else none).
bool rescale_fused_grad(const Tensor& grad, std::optional<double> host_g) {
  const auto dtype = grad.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || !host_g.has_value()) return true;
  const double g = *host_g;
  return g == 1.0 || (is_power_of_two(g) && dtype == at::kBFloat16);
}

// The upstream gradient the next fused forward of logits on CPU scales its gradient by: the finite,
// positive scalar that the last two fused backwards on CPU received, where they received the same
// (g_last_scale: the last one), else 1; for fp32 and fp64 logits only where it is a power of two
// within 2^±64 (expected_scale). Twice in a row: where losses with different upstream gradients take
// turns (an auxiliary loss weighted in the same backward, a second model's loss in a backward of its
// own), a guess of the last one could make the others miss each step, also one whose upstream
// gradient is 1, which without a guess costs nothing more. A training loop that scales its loss the
// same way at every step (gradient accumulation's loss / k, a loss scaler's factor) then gets the
// gradient scaled inside the kernel, and its backward does nothing, instead of a recompute (half
// types) or a rescale (one more read and write of N×C). A backward that receives another upstream
// gradient recomputes the gradient scaled inside the kernel (half types), rescales it by the quotient
// of the two (fp32, fp64), or, where the forward used 1, goes on as rescale_fused_grad says.
// Either way the gradient has the bits it had without the guess: the recompute's (which the exact
// bf16 rescale by a power of two equals), or, for fp32 and fp64, the rescale's. Scaling by a power of
// two inside the kernel scales every rounded step exactly, so the kernel's gradient for 2^k is 2^k
// times its gradient for 1, and a rescale by g / 2^k (exact) of it rounds g times that gradient once,
// as the rescale without a guess does. Not so for elements that are or become subnormal (below 2^−126
// in magnitude; fp64 2^−1022), which can differ in their last bit, nor where g / 2^k does not fit the
// dtype (|g| beyond about 2^±60 times the guess): that gradient is recomputed.
// Negative scales are not guessed: a rescale by one turns the gradient's zeros (ignored positions)
// into −0, where the kernel writes +0. fp32 and fp64 guess no other scale than powers of two: their
// rescale rounds twice, which a scale inside the kernel would not reproduce.
// On a GPU, reading the upstream gradient would synchronize with the device: there it stays 1.
std::atomic<double> g_expected_scale{1.0};
std::atomic<double> g_last_scale{1.0};

// The scale a fused forward of `input` computes its gradient for (see g_expected_scale).
double expected_scale(const Tensor& input) {
  if (!input.device().is_cpu()) return 1.0;
  const double s = g_expected_scale.load(std::memory_order_relaxed);
  switch (input.scalar_type()) {
    case at::kBFloat16:
    case at::kHalf:
      return s;
    case at::kFloat:
    case at::kDouble:
      // (within 2^±64: the kernel's constants scaled by it stay normal)
      return is_power_of_two(s) && s >= 0x1p-64 && s <= 0x1p64 ? s : 1.0;
    default:
      return 1.0;
  }
}

}  // namespace

// Outside the anonymous namespace: its name is the node's (loss.grad_fn), CppNode<smoothce::CrossEntropyFunction>.
struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  // target_b and lam are arguments for the graph's sake only: neither is differentiated (the Python
  // side sends lam detached; target_b holds indices).
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        const OptTensor& weight, const OptTensor& target_b, const OptTensor& lam, const Options& o) {
    // 'mean' and 'sum': the gradient for an upstream gradient of 1 comes with the loss.
    const bool fuse = o.reduction != 0;
    // (the upstream gradient this one is expected to be: g_expected_scale)
    const double expected = fuse ? expected_scale(input) : 1.0;
    const OptTensor scale = expected != 1.0 ? OptTensor(at::scalar_tensor(expected, at::kDouble)) : std::nullopt;
    auto [loss, lse, grad] = call_forward(o, input, target, weight, target_b, lam, fuse, scale);
    ctx->set_materialize_grads(false);
    torch::autograd::variable_list saved{input, target};
    if (weight.has_value() && weight->defined()) saved.push_back(*weight);
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["o"] = pack(o, target_b, lam);
    // Not a saved tensor: handed out once, consumed in place, and may become input.grad.
    if (fuse) {
      ctx->saved_data["g"] = std::move(grad);
      ctx->saved_data["s"] = expected;
    }
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(6);
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;  // the loss did not reach the graph's outputs
    auto fused = ctx->saved_data.find("g");
    if (fused != ctx->saved_data.end() && !c10::GradMode::is_enabled()) {
      Tensor grad = fused->second.toTensor();
      ctx->saved_data.erase(fused);  // a second backward recomputes it
      const double expected = ctx->saved_data.at("s").toDouble();  // (see g_expected_scale)
      // (the upstream gradient's value where it is a scalar on the CPU, read once)
      std::optional<double> host_g;
      if (grad_loss.device().is_cpu() && grad_loss.dim() == 0) host_g = cpu_scalar(grad_loss);
      if (host_g.has_value()) {
        const double g = *host_g;
        if (std::isfinite(g) && g > 0.0) {
          const double last = g_last_scale.exchange(g, std::memory_order_relaxed);
          g_expected_scale.store(g == last ? g : 1.0, std::memory_order_relaxed);
        }
        if (g == expected) {
          out[0] = std::move(grad);  // scaled inside the kernel already
          return out;
        }
      }
      // Scaled for another upstream gradient than 1: rescaled by the quotient (fp32, fp64; exact, or
      // recomputed where it is not representable) or recomputed (half types).
      OptTensor rescale_by;
      if (expected == 1.0) {
        if (rescale_fused_grad(grad, host_g)) rescale_by = grad_loss;
      } else if ((grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble) && host_g.has_value()) {
        const double quotient = *host_g / expected;
        Tensor by = at::scalar_tensor(quotient, grad_loss.options());
        if (cpu_scalar(by) == quotient || std::isnan(quotient)) rescale_by = std::move(by);
      }
      if (rescale_by.has_value()) {
        OptTensor target_b, lam;
        const Options o = unpack(ctx->saved_data.at("o"), target_b, lam);
        g_ops[o.ops]->scale_grad.call(grad, *rescale_by);
        out[0] = std::move(grad);
        return out;
      }
      grad.reset();  // recomputed below, scaled inside the kernel: the fused gradient is freed first
    }
    const auto saved = ctx->get_saved_variables();
    const OptTensor weight = saved.size() > 2 ? OptTensor(saved[2]) : OptTensor();
    OptTensor target_b, lam;
    const Options o = unpack(ctx->saved_data.at("o"), target_b, lam);
    if (c10::GradMode::is_enabled()) {  // create_graph=True: a gradient autograd can differentiate again
      out[0] = differentiable_grad(saved[0], saved[1], weight, o, target_b, lam, grad_loss);
      return out;
    }
    // 'none', or a second backward (the fused gradient was consumed): recomputed for grad_loss.
    out[0] = std::get<2>(call_forward(o, saved[0], saved[1], weight, target_b, lam, true, grad_loss));
    return out;
  }

  static Tensor differentiable_grad(const Tensor& input, const Tensor& target, const OptTensor& weight,
                                    const Options& o, const OptTensor& target_b, const OptTensor& lam,
                                    const Tensor& grad_loss) {
    pybind11::gil_scoped_acquire gil;
    TORCH_CHECK(g_differentiable_grad != nullptr, "smoothce: the differentiable gradient was not registered");
    auto wrap = [](const OptTensor& t) { return t.has_value() ? THPVariable_Wrap(*t) : Py_NewRef(Py_None); };
    PyObject* values = Py_NewRef(Py_None);
    if (o.target_values.has_value()) {
      Py_DECREF(values);
      values = Py_BuildValue("(dd)", (*o.target_values)[0], (*o.target_values)[1]);
    }
    PyObject* result = PyObject_CallFunction(
        g_differentiable_grad, "NNNLLdNdNNdN", THPVariable_Wrap(input), THPVariable_Wrap(target), wrap(weight),
        static_cast<long long>(o.ignore_index), static_cast<long long>(o.reduction), o.label_smoothing, values,
        o.z_loss, wrap(target_b), wrap(lam), o.lam_value, THPVariable_Wrap(grad_loss));
    if (result == nullptr) throw python_error();
    if (!THPVariable_Check(result)) {
      Py_DECREF(result);
      TORCH_CHECK(false, "smoothce: the differentiable gradient must be a tensor");
    }
    Tensor grad = THPVariable_Unpack(result);
    Py_DECREF(result);
    return grad;
  }
};

namespace {

// The loss: with the autograd node where with_grad (the logits need a gradient), else the forward alone.
PyObject* run(const Options& o, const Tensor& input, const Tensor& target, const OptTensor& weight,
              const OptTensor& target_b, const OptTensor& lam, bool with_grad) {
  Tensor loss;
  {
    pybind11::gil_scoped_release no_gil;
    if (with_grad) {
      loss = CrossEntropyFunction::apply(input, target, weight, target_b, lam, o);
    } else {
      loss = std::get<0>(call_forward(o, input, target, weight, target_b, lam, false, std::nullopt));
    }
  }
  return THPVariable_Wrap(std::move(loss));
}

OptTensor tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "smoothce: ", name, " must be a tensor or None");
  return THPVariable_Unpack(obj);
}

}  // namespace

// _C.cross_entropy(ns, input, target, weight, ignore_index, reduction, label_smoothing, float32_loss,
// target_values, z_loss, target_b, lam, lam_value, with_grad) -> loss: with_grad, with the autograd
// node (the logits need a gradient); else the loss alone (inference). The Python wrapper has checked
// the arguments' types.
PyObject* cross_entropy(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* ns = nullptr;
  PyObject *input_obj, *target_obj, *weight_obj, *values_obj, *target_b_obj, *lam_obj;
  long long ignore_index = 0, reduction = 0;
  int float32_loss = 0, with_grad = 0;
  Options o;
  if (!PyArg_ParseTuple(args, "sOOOLLdpOdOOdp", &ns, &input_obj, &target_obj, &weight_obj, &ignore_index, &reduction,
                        &o.label_smoothing, &float32_loss, &values_obj, &o.z_loss, &target_b_obj, &lam_obj,
                        &o.lam_value, &with_grad)) {
    return nullptr;
  }
  o.ops = ops_slot(ns);
  o.ignore_index = ignore_index;
  o.reduction = reduction;
  o.float32_loss = float32_loss != 0;
  if (values_obj != Py_None) {
    TORCH_CHECK_TYPE(PyTuple_Check(values_obj) && PyTuple_GET_SIZE(values_obj) == 2,
                     "smoothce: target_values must be a tuple (on, off) or None");
    o.target_values = std::vector<double>{PyFloat_AsDouble(PyTuple_GET_ITEM(values_obj, 0)),
                                          PyFloat_AsDouble(PyTuple_GET_ITEM(values_obj, 1))};
    if (PyErr_Occurred()) return nullptr;
  }
  const OptTensor input = tensor_arg(input_obj, "input"), target = tensor_arg(target_obj, "target");
  TORCH_CHECK_TYPE(input.has_value() && target.has_value(), "smoothce: input and target must be tensors");
  const OptTensor weight = tensor_arg(weight_obj, "weight"), target_b = tensor_arg(target_b_obj, "target_b"),
                  lam = tensor_arg(lam_obj, "lam");
  return run(o, *input, *target, weight, target_b, lam, with_grad != 0);
  END_HANDLE_TH_ERRORS
}

namespace {

// Whether `obj` is one of Python's ints (not bool) within int64; the value in *out.
bool exact_int(PyObject* obj, int64_t* out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  *out = v;
  return true;
}

// Whether `obj` is one of Python's ints or floats (not bool, not a subclass) holding a finite value;
// the value in *out.
bool exact_number(PyObject* obj, double* out) {
  int64_t v = 0;
  if (PyFloat_CheckExact(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
  } else if (exact_int(obj, &v)) {
    *out = static_cast<double>(v);
  } else {
    return false;
  }
  return std::isfinite(*out);
}

bool is_ascii(PyObject* obj, const char* text) {
  return PyUnicode_CheckExact(obj) && PyUnicode_CompareWithASCIIString(obj, text) == 0;
}

}  // namespace

// _C.common_cross_entropy(ns, input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
// target_values, z_loss, inplace_backward): smoothce.cross_entropy's (and CrossEntropyLoss's)
// arguments as the caller gave them. The common call, whose arguments all pass the Python wrapper's
// checks without a conversion, runs here as _C.cross_entropy would run it after those checks: plain
// tensors on one device with kernels (CPU, or CUDA in a CUDA build); an int ignore_index; reduction
// 'none', 'mean' or 'sum'; an int or float label_smoothing in [0, 1]; the variants' defaults; no
// torch.func transform, no target that needs a gradient (under autocast: the fp32 loss, and a
// probability target in the logits' dtype).
// Anything else returns None, and the caller goes the Python way, whose checks raise the errors.
// Called outside torch.compile's tracing only (the caller tests torch.compiler.is_compiling()).
// Why: the Python wrapper's checks cost 3–5 µs a call, and 20–45 µs where a model's forward has
// evicted their code and objects from the caches (2-core Zen 4 VM, 8×10 logits).
PyObject* common_cross_entropy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 11) {
    PyErr_SetString(PyExc_TypeError, "smoothce: common_cross_entropy takes 11 arguments");
    return nullptr;
  }
  PyObject *input_obj = args[1], *target_obj = args[2], *weight_obj = args[3];
  double label_smoothing = 0.0, z_loss = 0.0;
  int64_t ignore_index = 0, reduction = 0;
  if (is_ascii(args[5], "mean")) {
    reduction = 1;
  } else if (is_ascii(args[5], "sum")) {
    reduction = 2;
  } else if (!is_ascii(args[5], "none")) {
    Py_RETURN_NONE;
  }
  const bool common = THPVariable_CheckExact(input_obj) && THPVariable_CheckExact(target_obj) &&
                      (weight_obj == Py_None || THPVariable_CheckExact(weight_obj)) && exact_int(args[4], &ignore_index) &&
                      exact_number(args[6], &label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0 &&
                      is_ascii(args[7], "uniform") && args[8] == Py_None && exact_number(args[9], &z_loss) &&
                      z_loss == 0.0 && args[10] == Py_False;
  if (!common) Py_RETURN_NONE;
  const char* ns = PyUnicode_AsUTF8(args[0]);
  if (ns == nullptr) return nullptr;
  const Tensor& input = THPVariable_Unpack(input_obj);
  const Tensor& target = THPVariable_Unpack(target_obj);
  const OptTensor weight = weight_obj == Py_None ? OptTensor() : OptTensor(THPVariable_Unpack(weight_obj));
  const c10::Device device = input.device();
#ifdef SMOOTHCE_WITH_CUDA
  const bool kernels = device.is_cpu() || device.is_cuda();
#else
  const bool kernels = device.is_cpu();
#endif
  if (!kernels) Py_RETURN_NONE;  // (before autocast's test, which knows no meta device)
  const auto transforms = c10::impl::tls_local_dispatch_key_set().included_;
  const bool grad_mode = at::GradMode::is_enabled();
  // Under autocast the loss is fp32 (as torch's); probability targets of another dtype than the
  // logits are cast by the Python way.
  const bool float32_loss = at::autocast::is_autocast_enabled(device.type());
  if (target.device() != device || (weight.has_value() && weight->device() != device) ||
      (float32_loss && target.is_floating_point() && target.scalar_type() != input.scalar_type()) ||
      transforms.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      transforms.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) || (grad_mode && target.requires_grad())) {
    Py_RETURN_NONE;
  }
  Options o;
  o.float32_loss = float32_loss;
  o.ops = ops_slot(ns);
  o.ignore_index = ignore_index;
  o.reduction = reduction;
  o.label_smoothing = label_smoothing;
  o.z_loss = z_loss;  // (0, or −0 as the Python way passes it)
  return run(o, input, target, weight, std::nullopt, std::nullopt, grad_mode && input.requires_grad());
  END_HANDLE_TH_ERRORS
}

PyObject* set_differentiable_grad(PyObject*, PyObject* fn) {
  Py_XSETREF(g_differentiable_grad, Py_NewRef(fn));
  Py_RETURN_NONE;
}

}  // namespace smoothce
