// The fused linear + cross-entropy driver (smoothce::linear_forward), shared by every backend: the
// rows go through in chunks, each chunk's logits are written by one GEMM into a reused buffer, and a
// backend's fused kernel turns that buffer into the chunk's gradient in place while writing its loss
// and log-sum-exp; the gradient GEMMs then consume the buffer. Host only; no host synchronisation
// (the mean's denominator stays on the device).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <functional>
#include <tuple>

#include "smoothce/problem.h"

namespace smoothce {

// A backend's smoothce::forward, with the gradient written over `input` when grad_over_logits
// (its arguments as the op's: input, target, weight, ignore_index, reduction, label_smoothing,
// compute_grad, float32_loss, grad_output, extensions, grad_over_logits).
using ChunkKernel = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, int64_t, double, bool, bool,
    const c10::optional<at::Tensor>&, const Extensions&, bool)>;

// The automatic chunk (README "Fused linear + cross-entropy"): a chunk's logits take about as much
// memory as the input (⌈N·H/V⌉ rows), but at least kLinearMinChunkRows rows (GEMMs stay efficient) and
// at most kLinearChunkBudget bytes; the rows are then evened out over the chunks that takes.
constexpr int64_t kLinearChunkBudget = int64_t(128) << 20;
constexpr int64_t kLinearMinChunkRows = 128;

// Rows per chunk for N = rows, H = features, V = classes: chunk_size when > 0 (at most N), else the
// automatic rule above (N = 4096, H = 512, V = 32000, fp32: 32 chunks of 128 rows); `fewest`: the
// budget alone decides (as few chunks as fit 128 MiB each).
int64_t linear_chunk_rows(int64_t rows, int64_t features, int64_t classes, int64_t itemsize, int64_t chunk_size,
                          bool fewest = false);

// smoothce::linear_forward (schema.h): input (N, H), linear_weight (V, H), linear_bias (V) or none,
// target (N) class indices or (N, V) probabilities. output_mask says which gradients to compute
// (input, linear_weight, linear_bias, target), for grad_output (None: 1). Returns (loss, lse,
// grad_input, grad_linear_weight, grad_linear_bias, grad_target), the gradients not asked for empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool float32_loss, std::array<bool, 4> output_mask, int64_t chunk_size,
    bool fp32_grad_weight, const c10::optional<at::Tensor>& grad_output, const Extensions& ext,
    const ChunkKernel& kernel);

}  // namespace smoothce
