// The op schemas, written once: csrc/ops.cpp declares them as smoothce::*, the test suite's CPU
// emulation of the CUDA kernels (tests/emu) under its own namespace.
#pragma once

namespace smoothce {

// Loss, per-position log-sum-exp (fp32; fp64 for fp64 input) and, when compute_grad, the gradient
// for the upstream gradient grad_output (a scalar, or one value per position for reduction 'none';
// None: 1, all ones for 'none'), scaled inside the kernel; an empty tensor otherwise.
// The docs/semantics.md §3 options: target_values (on, off) replace uniform smoothing for index
// targets; z_loss adds α·lse²; target_b (with lam, one value per position, or lam_value) mixes a
// second index target in: q = lam·q(target) + (1 − lam)·q(target_b).
#define SMOOTHCE_EXTENSION_ARGS \
  "float[]? target_values=None, float z_loss=0., Tensor? target_b=None, Tensor? lam=None, float lam_value=1."
constexpr const char* kForwardSchema =
    "forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, int reduction, "
    "float label_smoothing, bool compute_grad, bool float32_loss, Tensor? grad_output=None, " SMOOTHCE_EXTENSION_ARGS
    ") -> (Tensor loss, Tensor lse, Tensor grad)";

// forward's gradient for grad_output, written over the logits (inplace_backward): nothing allocated
// for it. Every logit is read before its gradient element is written.
constexpr const char* kGradSchema =
    "grad_(Tensor(a!) input, Tensor target, Tensor? weight, int ignore_index, int reduction, "
    "float label_smoothing, bool float32_loss, Tensor grad_output, " SMOOTHCE_EXTENSION_ARGS ") -> ()";

// grad *= grad_output (a scalar, or one value per position broadcast over the classes); a no-op
// when a scalar grad_output is 1, decided by the kernel without a host round trip.
// Fused linear + cross-entropy (csrc/smoothce/linear.h): logits = input·linear_weightᵀ + linear_bias
// in row chunks, never all at once. output_mask: which gradients (input, linear_weight, linear_bias,
// target) to compute, for grad_output (None: 1); the others come back empty. chunk_size: rows per chunk
// (0: automatic). fp32_grad_weight: accumulate the half-precision weight's and bias's gradients in fp32.
constexpr const char* kLinearForwardSchema =
    "linear_forward(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
    "int ignore_index, int reduction, float label_smoothing, bool float32_loss, bool[4] output_mask, "
    "int chunk_size=0, bool fp32_grad_weight=True, Tensor? grad_output=None, " SMOOTHCE_EXTENSION_ARGS
    ") -> (Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias, "
    "Tensor grad_target)";

// Vocabulary-parallel (smoothce/distributed.py): `input` is one rank's shard of the classes as
// contiguous rows (positions, C_local), classes [vocab_start, vocab_start + C_local) of num_classes;
// index targets are global. shard_stats: the shard's ShardStats per position (row_math.h),
// (positions, 10) in the accumulation type. shard_forward: with `stats` every rank's, stacked in rank
// order (ranks, positions, 10; each rank's slice contiguous), the loss, lse and this shard's gradient, as forward gives them.
constexpr const char* kShardStatsSchema =
    "shard_stats(Tensor input, Tensor target, Tensor? weight, int vocab_start, int num_classes, int ignore_index, "
    "float label_smoothing, bool float32_loss, " SMOOTHCE_EXTENSION_ARGS ") -> Tensor";
constexpr const char* kShardForwardSchema =
    "shard_forward(Tensor input, Tensor target, Tensor? weight, Tensor stats, int vocab_start, int num_classes, "
    "int ignore_index, int reduction, float label_smoothing, bool compute_grad, bool float32_loss, "
    "Tensor? grad_output=None, " SMOOTHCE_EXTENSION_ARGS ") -> (Tensor loss, Tensor lse, Tensor grad)";

// shard_forward's gradient for grad_output written over the shard (inplace_backward).
constexpr const char* kShardGradSchema =
    "shard_grad_(Tensor(a!) input, Tensor target, Tensor? weight, Tensor stats, int vocab_start, int num_classes, "
    "int ignore_index, int reduction, float label_smoothing, bool float32_loss, Tensor grad_output, "
    SMOOTHCE_EXTENSION_ARGS ") -> ()";

constexpr const char* kScaleGradSchema = "scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()";

}  // namespace smoothce
