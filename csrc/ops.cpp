// The op schemas (declared once; each backend registers its kernels with TORCH_LIBRARY_IMPL)
// and the Python module that carries the build information.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "smoothce/linear.h"
#include "smoothce/schema.h"

#ifndef SMOOTHCE_VERSION
#define SMOOTHCE_VERSION "unknown"
#endif
#ifndef SMOOTHCE_CPU_CAPABILITY
#define SMOOTHCE_CPU_CAPABILITY "default"
#endif

TORCH_LIBRARY(smoothce, m) {
  m.def(smoothce::kForwardSchema, {at::Tag::pt2_compliant_tag});
  m.def(smoothce::kScaleGradSchema, {at::Tag::pt2_compliant_tag});
  m.def(smoothce::kGradSchema, {at::Tag::pt2_compliant_tag});
  m.def(smoothce::kLinearForwardSchema, {at::Tag::pt2_compliant_tag});
  m.def(smoothce::kShardStatsSchema, {at::Tag::pt2_compliant_tag});
  m.def(smoothce::kShardForwardSchema, {at::Tag::pt2_compliant_tag});
  m.def(smoothce::kShardGradSchema, {at::Tag::pt2_compliant_tag});
}

namespace smoothce::cpu {
void empty_grad_cache();
void tile_log1p(const float* in, float* out, int64_t n);
void tile_exp(const float* in, float* out, int64_t n);
}
namespace smoothce {  // csrc/autograd.cpp
PyObject* cross_entropy(PyObject*, PyObject* args);
PyObject* common_cross_entropy(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* set_differentiable_grad(PyObject*, PyObject* fn);
}  // namespace smoothce

namespace {

PyObject* empty_cache(PyObject*, PyObject*) {
  smoothce::cpu::empty_grad_cache();
  Py_RETURN_NONE;
}

PyObject* linear_chunk_rows(PyObject*, PyObject* args) {
  long long rows = 0, features = 0, classes = 0, itemsize = 0, chunk_size = 0;
  int fewest = 0;
  if (!PyArg_ParseTuple(args, "LLLLLp", &rows, &features, &classes, &itemsize, &chunk_size, &fewest)) return nullptr;
  return PyLong_FromLongLong(smoothce::linear_chunk_rows(rows, features, classes, itemsize, chunk_size, fewest != 0));
}

// _tile_log1p(x, out), _tile_exp(x, out): out = the CPU kernels' vector log1p (the tiles') or exp of x,
// both C-contiguous buffers of float32 of one size (numpy arrays): for the tests of their accuracy.
template <void (*F)(const float*, float*, int64_t)>
PyObject* map_floats(const char* error, PyObject* args) {
  PyObject *x = nullptr, *out = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &x, &out)) return nullptr;
  Py_buffer in{}, res{};
  const bool got_in = PyObject_GetBuffer(x, &in, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0;
  const bool got_res = got_in && PyObject_GetBuffer(out, &res, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) == 0;
  auto is_float = [](const Py_buffer& b) { return b.itemsize == 4 && b.format && std::string(b.format) == "f"; };
  const bool ok = got_res && is_float(in) && is_float(res) && in.len == res.len;
  if (ok) F(static_cast<const float*>(in.buf), static_cast<float*>(res.buf), in.len / 4);
  if (got_res) PyBuffer_Release(&res);
  if (got_in) PyBuffer_Release(&in);
  if (!ok) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, error);
    return nullptr;
  }
  Py_RETURN_NONE;
}
PyObject* tile_log1p(PyObject*, PyObject* args) {
  return map_floats<smoothce::cpu::tile_log1p>("_tile_log1p(x, out): x and out must be float32 buffers of the same size",
                                               args);
}
PyObject* tile_exp(PyObject*, PyObject* args) {
  return map_floats<smoothce::cpu::tile_exp>("_tile_exp(x, out): x and out must be float32 buffers of the same size",
                                             args);
}

PyMethodDef module_methods[] = {
    {"empty_cache", empty_cache, METH_NOARGS, "Release the cached CPU gradient buffer."},
    {"linear_chunk_rows", linear_chunk_rows, METH_VARARGS,
     "linear_chunk_rows(N, H, V, itemsize, chunk_size, fewest): rows per chunk of the fused linear loss."},
    {"cross_entropy", smoothce::cross_entropy, METH_VARARGS,
     "cross_entropy(ns, input, target, weight, ignore_index, reduction, label_smoothing, float32_loss, "
     "target_values, z_loss, target_b, lam, lam_value, with_grad): the loss, with its C++ autograd node when "
     "with_grad (smoothce._function)."},
    {"common_cross_entropy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(smoothce::common_cross_entropy)),
     METH_FASTCALL,
     "common_cross_entropy(ns, input, target, weight, ignore_index, reduction, label_smoothing, smoothing, "
     "target_values, z_loss, inplace_backward): the common call of smoothce.cross_entropy and CrossEntropyLoss in "
     "one C++ call, or None where the call is another (smoothce/__init__.py)."},
    {"_tile_log1p", tile_log1p, METH_VARARGS,
     "_tile_log1p(x, out): the CPU tiles' vector log1p of a float32 buffer into another (tests)."},
    {"_tile_exp", tile_exp, METH_VARARGS,
     "_tile_exp(x, out): the CPU kernels' vector exp (arguments <= 0) of a float32 buffer into another (tests)."},
    {"set_differentiable_grad", smoothce::set_differentiable_grad, METH_O,
     "The Python function the backward of cross_entropy's node calls under create_graph=True."},
    {nullptr, nullptr, 0, nullptr}};

PyObject* build_info_dict() {
  PyObject* info = PyDict_New();
  auto set_str = [&](const char* key, const char* value) {
    PyObject* v = PyUnicode_FromString(value);
    PyDict_SetItemString(info, key, v);
    Py_DECREF(v);
  };
  set_str("version", SMOOTHCE_VERSION);
  set_str("cpu_capability", SMOOTHCE_CPU_CAPABILITY);
#ifdef SMOOTHCE_AVX512_BF16
  PyDict_SetItemString(info, "cpu_bf16", Py_True);
#else
  PyDict_SetItemString(info, "cpu_bf16", Py_False);
#endif
#ifdef SMOOTHCE_WITH_CUDA
  set_str("cuda", "yes");
#else
  set_str("cuda", "no");
#endif
  return info;
}

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "smoothce kernels (ops live in torch.ops.smoothce)", -1,
                          module_methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
#if defined(__x86_64__) && defined(CPU_CAPABILITY_AVX512)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
    PyErr_SetString(PyExc_ImportError,
                    "smoothce was built with AVX-512 kernels (F, BW, VL, DQ) but this CPU lacks them; rebuild "
                    "with SMOOTHCE_CPU_CAPABILITY=avx2 (or default) pip install --no-build-isolation .");
    return nullptr;
  }
#if defined(SMOOTHCE_AVX512_BF16)
  if (!__builtin_cpu_supports("avx512bf16")) {
    PyErr_SetString(PyExc_ImportError,
                    "smoothce was built with AVX512-BF16 conversions but this CPU lacks them; rebuild with "
                    "SMOOTHCE_CPU_BF16=0 pip install --no-build-isolation .");
    return nullptr;
  }
#endif
#elif defined(__x86_64__) && defined(CPU_CAPABILITY_AVX2)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    PyErr_SetString(PyExc_ImportError,
                    "smoothce was built with AVX2/FMA kernels but this CPU lacks them; rebuild with "
                    "SMOOTHCE_CPU_CAPABILITY=default pip install --no-build-isolation .");
    return nullptr;
  }
#endif
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyModule_AddObject(module, "build_info", build_info_dict());
  return module;
}
