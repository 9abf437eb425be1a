// CUDA implementation of smoothce::forward, grad_, scale_grad_, linear_forward and the shard ops: the device guard, the current
// stream (SMOOTHCE_LAUNCH) and the device's limits around the shared driver (forward.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/forward.cuh"
#include "smoothce/linear.h"

namespace smoothce::cuda {
namespace {

DeviceLimits limits_of(const at::Device& device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());  // cached by torch
  DeviceLimits limits;
  limits.sm_count = prop->multiProcessorCount;
  // What a block may opt in to, less room for the kernels' static shared memory.
  limits.max_smem = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - 2048;
  limits.max_cluster_blocks = prop->major >= 9 ? 8 : 0;  // thread-block clusters: sm_90 on (8: portable)
  return limits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                            const c10::optional<at::Tensor>& weight,
                                                            int64_t ignore_index, int64_t reduction,
                                                            double label_smoothing, bool compute_grad,
                                                            bool float32_loss,
                                                            const c10::optional<at::Tensor>& grad_output,
                                                            SMOOTHCE_EXTENSION_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  return forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss,
                 grad_output, SMOOTHCE_EXTENSIONS, false, limits_of(input.device()));
}

void grad_cuda_(at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                int64_t ignore_index, int64_t reduction, double label_smoothing, bool float32_loss,
                const at::Tensor& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  forward(input, target, weight, ignore_index, reduction, label_smoothing, true, float32_loss, grad_output,
          SMOOTHCE_EXTENSIONS, true, limits_of(input.device()));
}

// The shared driver (csrc/linear.cpp): GEMMs by ATen (cuBLAS, current stream), chunks by forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_cuda(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool float32_loss, std::array<bool, 4> output_mask, int64_t chunk_size,
    bool fp32_grad_weight, const c10::optional<at::Tensor>& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLimits limits = limits_of(input.device());
  auto kernel = [&limits](const at::Tensor& logits, const at::Tensor& target_rows,
                          const c10::optional<at::Tensor>& class_weight, int64_t ignore, int64_t red, double eps,
                          bool compute_grad, bool f32_loss, const c10::optional<at::Tensor>& upstream,
                          const Extensions& ext, bool grad_over_logits) {
    return forward(logits, target_rows, class_weight, ignore, red, eps, compute_grad, f32_loss, upstream, ext,
                   grad_over_logits, limits);
  };
  return linear_forward(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                        float32_loss, output_mask, chunk_size, fp32_grad_weight, grad_output, SMOOTHCE_EXTENSIONS,
                        kernel);
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(grad.device());
  scale_grad(grad, grad_output, limits_of(grad.device()));
}

at::Tensor shard_stats_cuda(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                            int64_t vocab_start, int64_t num_classes, int64_t ignore_index, double label_smoothing,
                            bool float32_loss, SMOOTHCE_EXTENSION_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  return shard_stats(input, target, weight, vocab_start, num_classes, ignore_index, label_smoothing, float32_loss,
                     SMOOTHCE_EXTENSIONS, limits_of(input.device()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool compute_grad, bool float32_loss, const c10::optional<at::Tensor>& grad_output,
    SMOOTHCE_EXTENSION_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  return shard_forward(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction,
                       label_smoothing, compute_grad, float32_loss, grad_output, SMOOTHCE_EXTENSIONS, false,
                       limits_of(input.device()));
}

void shard_grad_cuda_(at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                      const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index,
                      int64_t reduction, double label_smoothing, bool float32_loss, const at::Tensor& grad_output,
                      SMOOTHCE_EXTENSION_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  shard_forward(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction, label_smoothing, true,
                float32_loss, grad_output, SMOOTHCE_EXTENSIONS, true, limits_of(input.device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(smoothce, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
  m.impl("grad_", &grad_cuda_);
  m.impl("linear_forward", &linear_forward_cuda);
  m.impl("shard_stats", &shard_stats_cuda);
  m.impl("shard_forward", &shard_forward_cuda);
  m.impl("shard_grad_", &shard_grad_cuda_);
}

}  // namespace smoothce::cuda
