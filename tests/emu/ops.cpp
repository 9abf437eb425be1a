// csrc/cuda's host driver and kernels, built by the host compiler on top of the emulator and
// registered as torch.ops.smoothce_emu.* for CPU tensors (same schemas as torch.ops.smoothce.*).
// The tests run every launch plan through it, with device limits they choose.
#include <torch/extension.h>
#include <torch/library.h>

#include "emu.h"  // before any csrc/cuda header
#include "memcheck.h"

#include "cuda/forward.cuh"
#include "smoothce/linear.h"
#include "smoothce/schema.h"

pybind11::dict kernel_attributes_dict(const void* kernel);  // sanitizer_selftest.cpp

namespace {

using smoothce::cuda::DeviceLimits;
using smoothce::cuda::Plan;
using smoothce::cuda::Variant;

// An A100-like device by default (opt-in shared memory, no clusters), with few SMs so that grids
// stay small.
DeviceLimits& limits() {
  static DeviceLimits value{2, 163 * 1024 - 2048, 8192};
  return value;
}

Plan& last_plan() {
  static Plan plan;
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_emu(const at::Tensor& input, const at::Tensor& target,
                                                           const c10::optional<at::Tensor>& weight,
                                                           int64_t ignore_index, int64_t reduction,
                                                           double label_smoothing, bool compute_grad,
                                                           bool float32_loss,
                                                           const c10::optional<at::Tensor>& grad_output,
                                                           SMOOTHCE_EXTENSION_PARAMS) {
  emu::MemcheckScope memcheck("smoothce_emu::forward", {{"input", input}, {"target", target}, {"weight", weight},
                                                        {"grad_output", grad_output}, {"target_b", target_b}, {"lam", lam}});
  return smoothce::cuda::forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad,
                                 float32_loss, grad_output, SMOOTHCE_EXTENSIONS, false, limits(), &last_plan());
}

void grad_emu_(at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
               int64_t ignore_index, int64_t reduction, double label_smoothing, bool float32_loss,
               const at::Tensor& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  emu::MemcheckScope memcheck("smoothce_emu::grad_", {{"input", input}, {"target", target}, {"weight", weight},
                                                      {"grad_output", grad_output}, {"target_b", target_b}, {"lam", lam}});
  smoothce::cuda::forward(input, target, weight, ignore_index, reduction, label_smoothing, true, float32_loss,
                          grad_output, SMOOTHCE_EXTENSIONS, true, limits(), &last_plan());
}

// csrc/linear.cpp's driver (GEMMs by ATen on the CPU tensors) with the emulated kernels for its chunks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_emu(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool float32_loss, std::array<bool, 4> output_mask, int64_t chunk_size,
    bool fp32_grad_weight, const c10::optional<at::Tensor>& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  emu::MemcheckScope memcheck("smoothce_emu::linear_forward",
                              {{"input", input}, {"linear_weight", linear_weight}, {"linear_bias", linear_bias},
                               {"target", target}, {"weight", weight}, {"grad_output", grad_output},
                               {"target_b", target_b}, {"lam", lam}});
  auto kernel = [](const at::Tensor& logits, const at::Tensor& target_rows,
                   const c10::optional<at::Tensor>& class_weight, int64_t ignore, int64_t red, double eps,
                   bool compute_grad, bool f32_loss, const c10::optional<at::Tensor>& upstream,
                   const smoothce::Extensions& ext, bool grad_over_logits) {
    return smoothce::cuda::forward(logits, target_rows, class_weight, ignore, red, eps, compute_grad, f32_loss,
                                   upstream, ext, grad_over_logits, limits(), &last_plan());
  };
  return smoothce::linear_forward(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
                                  label_smoothing, float32_loss, output_mask, chunk_size, fp32_grad_weight,
                                  grad_output, SMOOTHCE_EXTENSIONS, kernel);
}

at::Tensor shard_stats_emu(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                           int64_t vocab_start, int64_t num_classes, int64_t ignore_index, double label_smoothing,
                           bool float32_loss, SMOOTHCE_EXTENSION_PARAMS) {
  emu::MemcheckScope memcheck("smoothce_emu::shard_stats", {{"input", input}, {"target", target}, {"weight", weight},
                                                            {"target_b", target_b}, {"lam", lam}});
  return smoothce::cuda::shard_stats(input, target, weight, vocab_start, num_classes, ignore_index, label_smoothing,
                                     float32_loss, SMOOTHCE_EXTENSIONS, limits());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_forward_emu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool compute_grad, bool float32_loss, const c10::optional<at::Tensor>& grad_output,
    SMOOTHCE_EXTENSION_PARAMS) {
  emu::MemcheckScope memcheck("smoothce_emu::shard_forward",
                              {{"input", input}, {"target", target}, {"weight", weight}, {"stats", stats},
                               {"grad_output", grad_output}, {"target_b", target_b}, {"lam", lam}});
  return smoothce::cuda::shard_forward(input, target, weight, stats, vocab_start, num_classes, ignore_index,
                                       reduction, label_smoothing, compute_grad, float32_loss, grad_output,
                                       SMOOTHCE_EXTENSIONS, false, limits());
}

void shard_grad_emu_(at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                     const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index,
                     int64_t reduction, double label_smoothing, bool float32_loss, const at::Tensor& grad_output,
                     SMOOTHCE_EXTENSION_PARAMS) {
  emu::MemcheckScope memcheck("smoothce_emu::shard_grad_",
                              {{"input", input}, {"target", target}, {"weight", weight}, {"stats", stats},
                               {"grad_output", grad_output}, {"target_b", target_b}, {"lam", lam}});
  smoothce::cuda::shard_forward(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction,
                                label_smoothing, true, float32_loss, grad_output, SMOOTHCE_EXTENSIONS, true, limits());
}

void scale_grad_emu(at::Tensor& grad, const at::Tensor& grad_output) {
  emu::MemcheckScope memcheck("smoothce_emu::scale_grad_", {{"grad", grad}, {"grad_output", grad_output}});
  smoothce::cuda::scale_grad(grad, grad_output, limits());
}

at::ScalarType dtype_of(const std::string& name) {
  if (name == "float64") return at::kDouble;
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  TORCH_CHECK(false, "expected a dtype name 'float64', 'float32', 'float16' or 'bfloat16', got '", name, "'");
}

pybind11::dict plan_dict(const Plan& plan) {
  static const char* names[] = {"rows", "split_rows", "strided", "cluster_rows"};
  pybind11::dict d;
  d["variant"] = names[static_cast<int>(plan.variant)];
  d["threads"] = plan.threads;
  d["group"] = plan.group;
  d["rows_per_block"] = plan.rows_per_block;
  d["cooperative"] = plan.cooperative;
  d["chunk"] = plan.chunk;
  d["chunks"] = plan.chunks;
  d["staged"] = plan.staged;
  d["work"] = plan.work;
  d["blocks"] = plan.blocks;
  d["smem_bytes"] = plan.smem_bytes;
  return d;
}

}  // namespace

TORCH_LIBRARY(smoothce_emu, m) {
  m.def(smoothce::kForwardSchema);
  m.def(smoothce::kScaleGradSchema);
  m.def(smoothce::kGradSchema);
  m.def(smoothce::kLinearForwardSchema);
  m.def(smoothce::kShardStatsSchema);
  m.def(smoothce::kShardForwardSchema);
  m.def(smoothce::kShardGradSchema);
}

TORCH_LIBRARY_IMPL(smoothce_emu, CPU, m) {
  m.impl("forward", &forward_emu);
  m.impl("scale_grad_", &scale_grad_emu);
  m.impl("grad_", &grad_emu_);
  m.impl("linear_forward", &linear_forward_emu);
  m.impl("shard_stats", &shard_stats_emu);
  m.impl("shard_forward", &shard_forward_emu);
  m.impl("shard_grad_", &shard_grad_emu_);
}

void bind_ops(pybind11::module_& m) {
  m.def(
      "set_limits",
      [](int64_t sm_count, int64_t max_smem, int64_t split_chunk, int64_t max_cluster_blocks) {
        limits() = DeviceLimits{sm_count, max_smem, split_chunk, max_cluster_blocks};
      },
      "Device limits the launch plans are made for (the emulator enforces its own max_dynamic_smem)",
      pybind11::arg("sm_count"), pybind11::arg("max_smem"), pybind11::arg("split_chunk"),
      pybind11::arg("max_cluster_blocks") = 0);
  m.def("limits", [] {
    pybind11::dict d;
    d["sm_count"] = limits().sm_count;
    d["max_smem"] = limits().max_smem;
    d["split_chunk"] = limits().split_chunk;
    d["max_cluster_blocks"] = limits().max_cluster_blocks;
    return d;
  });
  m.def("last_plan", [] { return plan_dict(last_plan()); }, "The plan of the last emulated forward");
  m.def(
      "kernel_attributes",
      [](const std::string& variant, const std::string& dtype) {
        const void* kernel = nullptr;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype_of(dtype), "kernel_attributes", [&] {
          if (variant == "rows") kernel = reinterpret_cast<const void*>(&smoothce::cuda::rows_kernel<scalar_t>);
          if (variant == "strided") kernel = reinterpret_cast<const void*>(&smoothce::cuda::strided_kernel<scalar_t>);
          if (variant == "cluster_rows")
            kernel = reinterpret_cast<const void*>(&smoothce::cuda::cluster_rows_kernel<scalar_t>);
          if (variant == "split_finish")
            kernel = reinterpret_cast<const void*>(&smoothce::cuda::split_finish_kernel<scalar_t>);
          if (variant == "shard_stats")
            kernel = reinterpret_cast<const void*>(&smoothce::cuda::shard_stats_kernel<scalar_t>);
          if (variant == "shard_finish")
            kernel = reinterpret_cast<const void*>(&smoothce::cuda::shard_finish_kernel<scalar_t>);
        });
        TORCH_CHECK(kernel, "kernel_attributes: unknown variant '", variant, "'");
        return kernel_attributes_dict(kernel);
      },
      "cudaFuncGetAttributes of a kernel ('rows', 'strided', 'cluster_rows', 'split_finish', 'shard_stats', "
      "'shard_finish') for a dtype "
      "('float64', 'float32', 'float16', 'bfloat16'); its static size is known once a block of it ran",
      pybind11::arg("variant"), pybind11::arg("dtype"));
  m.def(
      "plan",
      [](int64_t outer, int64_t classes, int64_t inner, bool class_contiguous, bool dense_rows, int64_t elem_size,
         bool soft) {
        smoothce::cuda::PlanInput in;
        in.outer = outer;
        in.classes = classes;
        in.inner = inner;
        in.class_contiguous = class_contiguous;
        in.dense_rows = dense_rows;
        in.elem_size = elem_size;
        in.soft = soft;
        return plan_dict(smoothce::cuda::make_plan(in, limits()));
      },
      "make_plan for the current limits", pybind11::arg("outer"), pybind11::arg("classes"), pybind11::arg("inner"),
      pybind11::arg("class_contiguous"), pybind11::arg("dense_rows"), pybind11::arg("elem_size"),
      pybind11::arg("soft"));
}
