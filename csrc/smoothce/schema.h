// The op schemas, written once: csrc/ops.cpp declares them as smoothce::*, the test suite's CPU
// emulation of the CUDA kernels (tests/emu) under its own namespace.
#pragma once

namespace smoothce {

// Loss, per-position log-sum-exp (fp32; fp64 for fp64 input) and, when compute_grad, the gradient
// for the upstream gradient grad_output (a scalar, or one value per position for reduction 'none';
// None: 1, all ones for 'none'), scaled inside the kernel; an empty tensor otherwise.
constexpr const char* kForwardSchema =
    "forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, int reduction, "
    "float label_smoothing, bool compute_grad, bool float32_loss, Tensor? grad_output=None) "
    "-> (Tensor loss, Tensor lse, Tensor grad)";

// grad *= grad_output (a scalar, or one value per position broadcast over the classes); a no-op
// when a scalar grad_output is 1, decided by the kernel without a host round trip.
constexpr const char* kScaleGradSchema = "scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()";

}  // namespace smoothce
