// Host side of the CUDA path: checks (problem.cpp), the device prologue (D, Σw, range check), the
// launch plan (plan.h) and the kernels (kernels.cuh). Shared by cross_entropy.cu and the CPU
// emulator (tests/emu), which runs it on CPU tensors. No host synchronisation anywhere: every value
// the kernels need from the data is computed on the device (CUDA-graph capturable).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "cuda/kernels.cuh"
#include "smoothce/problem.h"

namespace smoothce::cuda {

constexpr int kPrologueThreads = 256;

inline PlanInput plan_input(const Problem& p) {
  PlanInput in;
  in.outer = p.outer;
  in.classes = p.classes;
  in.inner = p.inner;
  in.class_contiguous = p.class_contiguous();
  const int64_t C = p.classes;
  // Rows at consecutive positions follow each other: offset(pos) = pos·C.
  in.dense_rows = in.class_contiguous && (p.inner == 1 ? (p.stride_outer == C || p.outer <= 1)
                                                       : (p.stride_inner == C && (p.stride_outer == C * p.inner || p.outer <= 1)));
  in.elem_size = static_cast<int64_t>(p.input.element_size());
  in.soft = p.soft_target;
  return in;
}

inline Plan plan_for(const Problem& p, const DeviceLimits& limits) { return make_plan(plan_input(p), limits); }

// The limits a problem's plan is made for: clusters only where the device has them AND the binary's
// cluster kernel was compiled for sm_90 or newer (its code for older architectures traps: a build for
// "8.0+PTX" runs JIT-compiled sm_80 code on an H100). Prepares the kernels that may take more than
// 48 KiB of shared memory (prepare_kernel).
template <typename scalar_t>
DeviceLimits limits_for(const DeviceLimits& device) {
  DeviceLimits limits = device;
  prepare_kernel(&rows_kernel<scalar_t>, limits.max_smem);
  prepare_kernel(&strided_kernel<scalar_t>, limits.max_smem);
  if (limits.max_cluster_blocks > 0 && prepare_kernel(&cluster_rows_kernel<scalar_t>, limits.max_smem).ptx_arch < 90)
    limits.max_cluster_blocks = 0;
  return limits;
}

// One target type in the kernels: uint8 class indices (and a mixup partner alike) are widened to
// int64 (N bytes, no N×C work).
inline std::pair<at::Tensor, Extensions> widened_targets(const at::Tensor& target, const Extensions& ext_arg) {
  auto widened = [](const at::Tensor& t) { return t.scalar_type() == at::kByte ? t.to(at::kLong) : t; };
  Extensions ext = ext_arg;
  if (ext.target_b.has_value() && ext.target_b->defined() && ext.target_b->scalar_type() == target.scalar_type())
    ext.target_b = widened(*ext.target_b);
  return {widened(target), ext};
}

// The kernels' arguments for a checked problem and its buffers (smoothing: the problem's, or that of
// all the ranks' classes for a vocabulary shard).
template <typename scalar_t>
KernelArgs<scalar_t> kernel_args(const Problem& prob, const ForwardBuffers& out,
                                 const Smoothing<acc_type<scalar_t>>& smoothing, const DeviceScalars* scalars) {
  using acc_t = acc_type<scalar_t>;
  KernelArgs<scalar_t> a{};
  a.input = prob.input.const_data_ptr<scalar_t>();
  a.soft_target = prob.soft_target ? prob.target.const_data_ptr<scalar_t>() : nullptr;
  a.target = prob.soft_target ? nullptr : prob.target.const_data_ptr<int64_t>();
  a.target_b = prob.target_b.defined() ? prob.target_b.const_data_ptr<int64_t>() : nullptr;
  a.lam = prob.lam.defined() ? prob.lam.const_data_ptr<acc_t>() : nullptr;
  a.lam_value = static_cast<acc_t>(prob.lam_value);
  a.weight = out.weight.defined() ? out.weight.const_data_ptr<acc_t>() : nullptr;
  a.grad = prob.compute_grad ? out.kernel_grad.mutable_data_ptr<scalar_t>() : nullptr;
  a.position_loss = out.position_loss.defined() ? out.position_loss.mutable_data_ptr<acc_t>() : nullptr;
  a.lse = out.lse.defined() ? out.lse.mutable_data_ptr<acc_t>() : nullptr;
  a.scalars = scalars;
  a.position_scale =
      out.upstream.defined() && out.upstream.dim() > 0 ? out.upstream.const_data_ptr<acc_t>() : nullptr;
  static_cast<PositionLayout&>(a) = prob.layout();
  static_cast<Smoothing<acc_t>&>(a) = smoothing;
  a.mass = mass_kind(prob.soft_target, a.tv.off, a.weight != nullptr);
  return a;
}

// The prologue every forward runs before its main kernels: for index targets, `launch_partials(grid,
// partial)` launches the kernel writing one partial sum of D per block (the range check with it), then
// one block turns them into the DeviceScalars (D, grad_scale with a scalar upstream gradient, Σw).
template <typename acc_t, typename LaunchPartials>
void launch_prologue(const Problem& prob, const ForwardBuffers& out, const DeviceLimits& limits,
                     const acc_t* weight_ptr, DeviceScalars* device_scalars, LaunchPartials&& launch_partials) {
  const int64_t positions = prob.positions();
  int64_t partials = 0;
  at::Tensor partial;
  if (!prob.soft_target && positions > 0) {
    partials = std::min<int64_t>(ceil_div(positions, kPrologueThreads * 8), limits.sm_count * 4);
    partial = at::empty({partials}, prob.input.options().dtype(at::kDouble));
    launch_partials(dim3(static_cast<unsigned>(partials)), partial.mutable_data_ptr<double>());
  }
  auto kernel = &scalars_kernel<acc_t>;
  const double fixed_denominator = prob.soft_target || positions == 0 ? static_cast<double>(positions) : -1.0;
  const at::Tensor& upstream = out.upstream;
  SMOOTHCE_LAUNCH(kernel, dim3(1), dim3(kPrologueThreads), 0,
                  partial.defined() ? static_cast<const double*>(partial.const_data_ptr<double>()) : nullptr, partials,
                  fixed_denominator, weight_ptr, prob.classes, prob.reduction,
                  upstream.defined() && upstream.dim() == 0 ? upstream.const_data_ptr<acc_t>() : nullptr,
                  device_scalars);
}

// The loss a forward returns: per position ('none'), or their sum (in fp64), divided for 'mean' by the
// device's D (scalars[0], DeviceScalars::denominator).
inline at::Tensor reduced_loss(const ForwardBuffers& out, int64_t reduction, const at::Tensor& scalars) {
  if (reduction == kNone) return out.position_loss.to(out.loss_dtype);
  at::Tensor total = out.position_loss.sum(at::kDouble);
  if (reduction == kMean) total = total / scalars.select(0, 0);  // a plain division: 0/0 is NaN, as torch
  return total.to(out.loss_dtype);
}

// Launches the plan's kernels; returns the plan launched: `plan`, or `fallback` (made without
// clusters) when the device cannot schedule the plan's clusters.
template <typename scalar_t>
Plan launch_main(const KernelArgs<scalar_t>& args, const Plan& plan, const Plan& fallback, const at::Tensor& input) {
  using acc_t = acc_type<scalar_t>;
  if (plan.work == 0) return plan;
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(static_cast<unsigned>(plan.threads));
  switch (plan.variant) {
    case Variant::kRows: {
      auto kernel = &rows_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(kernel, grid, block, plan.smem_bytes, args, plan);
      break;
    }
    case Variant::kClusterRows: {
      auto kernel = &cluster_rows_kernel<scalar_t>;
      const auto blocks_per_cluster = static_cast<unsigned>(plan.chunks);
      if (!cluster_fits(kernel, grid, block, plan.smem_bytes, blocks_per_cluster))
        return launch_main(args, fallback, fallback, input);
      SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, plan.smem_bytes, blocks_per_cluster, args, plan);
      break;
    }
    case Variant::kStrided: {
      auto kernel = &strided_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(kernel, grid, block, plan.smem_bytes, args, plan);
      break;
    }
    case Variant::kSplitRows: {
      // One online-softmax state per (position, chunk), in the accumulation type.
      const at::Tensor partial =
          at::empty({plan.work * static_cast<int64_t>(sizeof(RowState<acc_t>))}, input.options().dtype(at::kByte));
      auto* states = reinterpret_cast<RowState<acc_t>*>(partial.mutable_data_ptr<uint8_t>());
      const at::Tensor target_x = at::empty({args.target ? 2 * args.outer * args.inner : 0},
                                            input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* target_x_ptr = target_x.mutable_data_ptr<acc_t>();
      auto state_kernel = &split_state_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(state_kernel, grid, block, 0, args, plan, states, target_x_ptr);
      const int64_t items = args.grad ? plan.work : plan.work / plan.chunks;  // (position, chunk) or position
      const dim3 finish_grid(static_cast<unsigned>(std::min(items, plan.blocks)));
      auto finish_kernel = &split_finish_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(finish_kernel, finish_grid, block, 0, args, plan, items,
                      static_cast<const RowState<acc_t>*>(states), static_cast<const acc_t*>(target_x_ptr));
      break;
    }
  }
  return plan;
}

// The op smoothce::forward on the device (see csrc/ops.cpp); with grad_over_logits, smoothce::grad_
// (the gradient written over the input). `used_plan` reports the plan.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& target_arg, const c10::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, bool compute_grad, bool float32_loss,
    const c10::optional<at::Tensor>& grad_output, const Extensions& ext_arg, bool grad_over_logits,
    const DeviceLimits& limits, Plan* used_plan = nullptr) {
  const auto [target, ext] = widened_targets(target_arg, ext_arg);
  const Problem prob =
      make_problem(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss, ext);
  const auto options = prob.input.options();
  at::Tensor (*allocate_grad)(const at::Tensor&) = grad_over_logits ? &grad_over_input : &empty_grad_like;
  const ForwardBuffers out = make_forward_buffers(prob, input, float32_loss, grad_output, allocate_grad);
  const at::Tensor& weight_acc = out.weight;
  at::Tensor scalars = at::empty({static_cast<int64_t>(sizeof(DeviceScalars) / sizeof(double))}, options.dtype(at::kDouble));
  auto* device_scalars = reinterpret_cast<DeviceScalars*>(scalars.mutable_data_ptr<double>());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.input.scalar_type(), "smoothce_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const DeviceLimits plan_limits = limits_for<scalar_t>(limits);
    const Plan plan = plan_for(prob, plan_limits);
    DeviceLimits without_clusters = plan_limits;
    without_clusters.max_cluster_blocks = 0;
    const Plan fallback = plan.variant == Variant::kClusterRows ? plan_for(prob, without_clusters) : plan;
    const acc_t* weight_ptr = weight_acc.defined() ? weight_acc.const_data_ptr<acc_t>() : nullptr;
    const KernelArgs<scalar_t> a = kernel_args<scalar_t>(prob, out, prob.smoothing<acc_t>(), device_scalars);

    // Prologue: D (and the range check) over the targets, then the DeviceScalars.
    launch_prologue<acc_t>(prob, out, limits, weight_ptr, device_scalars, [&](dim3 grid, double* partial) {
      auto kernel = &target_weight_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(kernel, grid, dim3(kPrologueThreads), 0, a, partial);
    });
    const Plan launched = launch_main(a, plan, fallback, prob.input);
    if (used_plan) *used_plan = launched;
  });

  out.copy_back();
  return {reduced_loss(out, reduction, scalars), out.lse, out.grad};
}

// ---------------------------------------------------------------- vocabulary-parallel shards
// smoothce::shard_stats, shard_forward and (grad_over_logits) shard_grad_ on the device (docs/semantics.md §10;
// shard_finish_kernel reads each logit before it writes its gradient element; the kernels:
// kernels.cuh "vocabulary-parallel shards"). A block per position, threads for the shard's length.
inline int shard_threads(int64_t classes) {
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(kWarp, round_up(ceil_div(classes, 8), kWarp))));
}

inline Problem shard_problem(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                             int64_t vocab_start, int64_t num_classes, int64_t ignore_index, int64_t reduction,
                             double label_smoothing, bool compute_grad, bool float32_loss, const Extensions& ext) {
  Problem prob =
      make_problem(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss, ext);
  check_shard(prob, vocab_start, num_classes);
  return prob;
}

inline at::Tensor shard_stats(const at::Tensor& input, const at::Tensor& target_arg,
                              const c10::optional<at::Tensor>& weight, int64_t vocab_start, int64_t num_classes,
                              int64_t ignore_index, double label_smoothing, bool float32_loss,
                              const Extensions& ext_arg, const DeviceLimits& limits) {
  const auto [target, ext] = widened_targets(target_arg, ext_arg);
  const Problem prob = shard_problem(input, target, weight, vocab_start, num_classes, ignore_index, kSum,
                                     label_smoothing, false, float32_loss, ext);
  ForwardBuffers buffers = make_forward_buffers(prob, input, float32_loss, c10::nullopt, nullptr);
  at::Tensor stats = at::empty({prob.outer, kShardStats}, prob.input.options().dtype(buffers.acc_dtype));
  if (prob.outer == 0) return stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.input.scalar_type(), "smoothce_shard_stats_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Smoothing<acc_t> smoothing = Smoothing<acc_t>::make(
        prob.label_smoothing, num_classes, prob.has_target_values ? prob.target_values : nullptr, prob.z_loss);
    const KernelArgs<scalar_t> a = kernel_args<scalar_t>(prob, buffers, smoothing, nullptr);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(prob.outer, limits.sm_count * 8)));
    auto kernel = &shard_stats_kernel<scalar_t>;
    SMOOTHCE_LAUNCH(kernel, grid, dim3(shard_threads(prob.classes)), 0, a, ShardPlace{vocab_start, num_classes},
                    stats.mutable_data_ptr<acc_t>());
  });
  return stats;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_forward(
    const at::Tensor& input, const at::Tensor& target_arg, const c10::optional<at::Tensor>& weight,
    const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool compute_grad, bool float32_loss, const c10::optional<at::Tensor>& grad_output,
    const Extensions& ext_arg, bool grad_over_logits, const DeviceLimits& limits) {
  const auto [target, ext] = widened_targets(target_arg, ext_arg);
  const Problem prob = shard_problem(input, target, weight, vocab_start, num_classes, ignore_index, reduction,
                                     label_smoothing, compute_grad, float32_loss, ext);
  at::Tensor (*allocate_grad)(const at::Tensor&) = grad_over_logits ? &grad_over_input : &empty_grad_like;
  const ForwardBuffers out = make_forward_buffers(prob, input, float32_loss, grad_output, allocate_grad);
  check_shard_stats(prob, stats, out.acc_dtype);
  const auto options = prob.input.options();
  const int64_t positions = prob.outer;
  at::Tensor scalars = at::empty({static_cast<int64_t>(sizeof(DeviceScalars) / sizeof(double))}, options.dtype(at::kDouble));
  auto* device_scalars = reinterpret_cast<DeviceScalars*>(scalars.mutable_data_ptr<double>());
  const ShardPlace shard{vocab_start, num_classes};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.input.scalar_type(), "smoothce_shard_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Smoothing<acc_t> smoothing = Smoothing<acc_t>::make(
        prob.label_smoothing, num_classes, prob.has_target_values ? prob.target_values : nullptr, prob.z_loss);
    const KernelArgs<scalar_t> a = kernel_args<scalar_t>(prob, out, smoothing, device_scalars);
    const acc_t* all = stats.const_data_ptr<acc_t>();
    // Prologue: D from the targets' merged weights, then the DeviceScalars (weight_sum unused: the merged mass).
    launch_prologue<acc_t>(prob, out, limits, nullptr, device_scalars, [&](dim3 grid, double* partial) {
      auto kernel = &shard_weight_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(kernel, grid, dim3(kPrologueThreads), 0, a, shard, all, stats.size(0), stats.stride(0), partial);
    });
    if (positions > 0) {
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(positions, limits.sm_count * 8)));
      auto kernel = &shard_finish_kernel<scalar_t>;
      SMOOTHCE_LAUNCH(kernel, grid, dim3(shard_threads(prob.classes)), 0, a, shard, all, stats.size(0),
                      stats.stride(0));
    }
  });
  out.copy_back();
  return {reduced_loss(out, reduction, scalars), out.lse, out.grad};
}

// The op smoothce::scale_grad_ on the device: grad *= grad_output.
inline void scale_grad(at::Tensor& grad, const at::Tensor& grad_output, const DeviceLimits& limits) {
  check_scale_grad_args(grad, grad_output);
  if (grad.numel() == 0) return;
  if (grad_output.dim() > 0 || !grad.is_non_overlapping_and_dense()) {
    grad.mul_(grad_output.dim() > 0 && grad.dim() > 1 ? grad_output.unsqueeze(1) : grad_output);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "smoothce_scale_grad_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor factor = grad_output.to(grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int64_t threads = 256;
    const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(grad.numel(), threads * 8), limits.sm_count * 8));
    // A dense tensor's elements are the numel consecutive slots from its data pointer, in some order.
    scalar_t* base = grad.mutable_data_ptr<scalar_t>();
    auto kernel = &scale_grad_kernel<scalar_t>;
    SMOOTHCE_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), 0, base,
                    grad.numel(), factor.const_data_ptr<acc_t>());
  });
}

}  // namespace smoothce::cuda
