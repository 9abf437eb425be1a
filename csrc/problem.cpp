// Argument checks and layout view shared by the CPU and CUDA implementations.
#include "smoothce/problem.h"
#include "smoothce/row_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

namespace smoothce {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

// The input's shape without the class dimension (dim 1; dim 0 for an unbatched (C,) input).
std::vector<int64_t> positions_of(at::IntArrayRef sizes) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  if (!shape.empty()) shape.erase(shape.begin() + (shape.size() == 1 ? 0 : 1));
  return shape;
}

// Collapses dims [2, ndim) into one (size, stride) pair when the strides allow it.
bool collapse_inner(at::IntArrayRef sizes, at::IntArrayRef strides, int64_t first, int64_t& size, int64_t& stride) {
  size = 1;
  stride = 1;
  bool have = false;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= first; --d) {
    if (sizes[d] == 1) continue;
    if (!have) {
      stride = strides[d];
      have = true;
    } else if (strides[d] != stride * size) {
      return false;
    }
    size *= sizes[d];
  }
  if (size == 0) stride = 1;
  return true;
}

void check_floating_input(const at::Tensor& input) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "smoothce.cross_entropy: input must be a floating-point tensor (float64, float32, float16 "
                   "or bfloat16), got dtype ",
                   dt);
  TORCH_CHECK_VALUE(input.dim() >= 1,
                    "smoothce.cross_entropy: input must have at least 1 dimension (C,), (N, C) or "
                    "(N, C, d1, ...), got a 0-d tensor");
}

// The options of docs/semantics.md §3: target values, z-loss and the mixup partner. Fills p's fields.
void check_extensions(Problem& p, const at::Tensor& input, const at::Tensor& target,
                      const std::vector<int64_t>& position_shape, const Extensions& ext) {
  if (ext.target_values.has_value()) {
    const c10::ArrayRef<double> tv = *ext.target_values;
    TORCH_CHECK_VALUE(tv.size() == 2, "smoothce.cross_entropy: target_values must be a pair (on, off), got ", tv.size(),
                      " values");
    TORCH_CHECK_VALUE(std::isfinite(tv[0]) && std::isfinite(tv[1]) && tv[0] >= 0.0 && tv[1] >= 0.0,
                      "smoothce.cross_entropy: target_values must be finite and non-negative, got (", tv[0], ", ",
                      tv[1], ")");
    TORCH_CHECK_VALUE(!p.soft_target,
                      "smoothce.cross_entropy: target_values apply to class-index targets only, got a probability "
                      "(floating) target");
    TORCH_CHECK_VALUE(p.label_smoothing == 0.0,
                      "smoothce.cross_entropy: target_values replace label_smoothing; got both (label_smoothing=",
                      p.label_smoothing, ")");
    p.has_target_values = true;
    p.target_values[0] = tv[0];
    p.target_values[1] = tv[1];
  }
  TORCH_CHECK_VALUE(std::isfinite(ext.z_loss) && ext.z_loss >= 0.0,
                    "smoothce.cross_entropy: z_loss must be a finite float >= 0, got ", ext.z_loss);
  p.z_loss = ext.z_loss;

  const bool mixup = ext.target_b.has_value() && ext.target_b->defined();
  const bool lam_tensor = ext.lam.has_value() && ext.lam->defined();
  TORCH_CHECK_VALUE(!std::isnan(ext.lam_value) && ext.lam_value >= 0.0 && ext.lam_value <= 1.0,
                    "smoothce.mixup_cross_entropy: lam must be in [0, 1], got ", ext.lam_value);
  TORCH_CHECK_VALUE(mixup || (!lam_tensor && ext.lam_value == 1.0),
                    "smoothce.forward: lam is only used with a mixup target_b");
  p.lam_value = ext.lam_value;
  if (!mixup) return;
  const at::Tensor& tb = *ext.target_b;
  TORCH_CHECK_VALUE(!p.soft_target && !at::isFloatingType(tb.scalar_type()),
                    "smoothce.mixup_cross_entropy: target_a and target_b must hold class indices (int64 or uint8), "
                    "got ", target.scalar_type(), " and ", tb.scalar_type());
  TORCH_CHECK_TYPE(tb.scalar_type() == target.scalar_type(),
                   "smoothce.mixup_cross_entropy: target_b must have target_a's dtype (", target.scalar_type(),
                   "), got ", tb.scalar_type());
  TORCH_CHECK_VALUE(tb.sizes() == target.sizes(), "smoothce.mixup_cross_entropy: target_b must have target_a's shape ",
                    shape_str(target.sizes()), ", got ", shape_str(tb.sizes()));
  TORCH_CHECK(tb.device() == input.device(), "smoothce.mixup_cross_entropy: target_b must be on the input's device (",
              input.device(), "), got ", tb.device());
  p.target_b = tb;
  if (!lam_tensor) return;
  const at::Tensor& lam = *ext.lam;
  TORCH_CHECK_TYPE(at::isFloatingType(lam.scalar_type()),
                   "smoothce.mixup_cross_entropy: lam must be a float or a floating tensor, got dtype ",
                   lam.scalar_type());
  TORCH_CHECK_VALUE(lam.sizes() == at::IntArrayRef(position_shape),
                    "smoothce.mixup_cross_entropy: a lam tensor must have one value per position, shape ",
                    shape_str(position_shape), ", got ", shape_str(lam.sizes()));
  TORCH_CHECK(lam.device() == input.device(), "smoothce.mixup_cross_entropy: lam must be on the input's device (",
              input.device(), "), got ", lam.device());
  const at::Tensor in_range = at::logical_and(lam >= 0, lam <= 1).all();
  if (lam.device().is_cpu()) {
    TORCH_CHECK_VALUE(in_range.item<bool>(), "smoothce.mixup_cross_entropy: lam values must be in [0, 1], got ",
                      lam.masked_select(at::logical_not(at::logical_and(lam >= 0, lam <= 1))).flatten()[0].item<double>());
  } else {
    at::_assert_async(in_range, "smoothce.mixup_cross_entropy: lam values must be in [0, 1]");  // no host sync
  }
  p.lam = lam.to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace

Problem make_problem(const at::Tensor& input_arg, const at::Tensor& target_arg,
                     const c10::optional<at::Tensor>& weight_arg, int64_t ignore_index, int64_t reduction,
                     double label_smoothing, bool compute_grad, bool autocast, const Extensions& ext) {
  check_floating_input(input_arg);
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "smoothce.cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(!std::isnan(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "smoothce.cross_entropy: label_smoothing must be a float in [0, 1], got ", label_smoothing);
  TORCH_CHECK(target_arg.device() == input_arg.device(),
              "smoothce.cross_entropy: target must be on the input's device (", input_arg.device(), "), got ",
              target_arg.device());

  Problem p;
  p.ignore_index = ignore_index;
  p.reduction = reduction;
  p.label_smoothing = label_smoothing;
  p.compute_grad = compute_grad;
  p.soft_target = at::isFloatingType(target_arg.scalar_type());

  const int64_t ndim = input_arg.dim();
  const int64_t class_dim = ndim == 1 ? 0 : 1;
  p.classes = input_arg.size(class_dim);
  TORCH_CHECK_VALUE(p.classes <= std::numeric_limits<int32_t>::max(),
                    "smoothce.cross_entropy: at most 2^31 - 1 classes are supported, got ", p.classes);
  const std::vector<int64_t> position_shape = positions_of(input_arg.sizes());
  p.position_shape = position_shape;

  if (p.soft_target) {
    TORCH_CHECK_VALUE(target_arg.sizes() == input_arg.sizes(),
                      "smoothce.cross_entropy: a probability (floating) target must have the input's shape ",
                      shape_str(input_arg.sizes()), ", got ", shape_str(target_arg.sizes()));
    TORCH_CHECK_TYPE(target_arg.scalar_type() == input_arg.scalar_type(),
                     "smoothce.cross_entropy: a probability target must have the input's dtype (",
                     input_arg.scalar_type(), "), got ", target_arg.scalar_type());
    TORCH_CHECK_VALUE(ignore_index < 0,
                      "smoothce.cross_entropy: ignore_index is not supported with probability (floating) targets; "
                      "expected a negative ignore_index (default -100), got ",
                      ignore_index);
  } else {
    const auto tdt = target_arg.scalar_type();
    TORCH_CHECK_TYPE(tdt == at::kLong || tdt == at::kByte,
                     "smoothce.cross_entropy: target must hold class indices as int64 (or uint8), or class "
                     "probabilities in the input's dtype; got dtype ",
                     tdt, tdt == at::kInt ? " (convert it with target.long())" : "");
    TORCH_CHECK_VALUE(target_arg.sizes() == at::IntArrayRef(position_shape),
                      "smoothce.cross_entropy: target of class indices must have shape ", shape_str(position_shape),
                      " (the input's shape ", shape_str(input_arg.sizes()), " without the class dimension ",
                      class_dim, "), got ", shape_str(target_arg.sizes()));
  }

  check_extensions(p, input_arg, target_arg, position_shape, ext);

  if (weight_arg.has_value() && weight_arg->defined()) {
    const auto& w = *weight_arg;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == p.classes,
                      "smoothce.cross_entropy: weight must be a 1-D tensor of length C = ", p.classes,
                      " (one weight per class), got shape ", shape_str(w.sizes()));
    const bool fp32_weight_under_autocast = autocast && w.scalar_type() == at::kFloat;
    TORCH_CHECK_TYPE(w.scalar_type() == input_arg.scalar_type() || fp32_weight_under_autocast,
                     "smoothce.cross_entropy: weight must have the input's dtype (", input_arg.scalar_type(),
                     "), got ", w.scalar_type());
    TORCH_CHECK(w.device() == input_arg.device(), "smoothce.cross_entropy: weight must be on the input's device (",
                input_arg.device(), "), got ", w.device());
    p.weight = w.contiguous();
  }

  // ---- the (outer, classes, inner) view ----
  at::Tensor input = input_arg;
  at::Tensor target = target_arg;
  auto view_of = [&](const at::Tensor& t, int64_t& inner, int64_t& s_outer, int64_t& s_class, int64_t& s_inner) {
    if (t.dim() == 1) {
      inner = 1;
      s_outer = 0;
      s_class = t.stride(0);
      s_inner = 1;
      return true;
    }
    s_outer = t.stride(0);
    s_class = t.stride(1);
    return collapse_inner(t.sizes(), t.strides(), 2, inner, s_inner);
  };
  int64_t inner = 1, s_outer = 0, s_class = 1, s_inner = 1;
  bool ok = view_of(input, inner, s_outer, s_class, s_inner);
  // The gradient is allocated with empty_like(input), which keeps the strides of a dense input only;
  // a layout the kernels cannot walk (classes and positions both strided) is made contiguous.
  // Walkable: classes contiguous (per-row kernel) or positions contiguous (across-rows kernel; for
  // (N, C) the positions are the rows, see the turn-around below).
  auto walkable_view = [&]() {
    const int64_t n_outer = ndim == 1 ? 1 : input.size(0);
    if (s_class == 1 || p.classes == 1) return true;
    return inner > 1 ? s_inner == 1 : (s_outer == 1 || n_outer == 1);
  };
  bool walkable = ok && walkable_view();
  // A view with gaps whose classes are contiguous (a vocabulary's padding sliced off, a language
  // model's logits[:, :-1] as (B, V, T − 1)) keeps its layout: the gradient gets the same strides
  // (empty_grad_like), so the kernels walk both without a copy of the logits.
  const bool dense = input.is_non_overlapping_and_dense();
  const bool kept = compute_grad && !dense && grad_keeps_layout(input);
  TORCH_INTERNAL_ASSERT(!kept || walkable);
  if (walkable && compute_grad && !kept && !dense) {
    // Other views with gaps: a dense copy in the same order of dimensions, so the classes stay
    // contiguous (a row copy, then the per-row kernel) rather than contiguous() turning a (N, C, T)
    // view with classes innermost into a transpose.
    input = at::empty_like(input, at::MemoryFormat::Preserve).copy_(input);
    ok = view_of(input, inner, s_outer, s_class, s_inner);
    walkable = ok && walkable_view() && input.is_non_overlapping_and_dense();
  }
  if (!walkable) {
    input = input.contiguous();
    ok = view_of(input, inner, s_outer, s_class, s_inner);
    TORCH_INTERNAL_ASSERT(ok);
  }
  if (p.soft_target && target.strides() != input.strides()) {
    // The kernels read P with the input's strides: match them (a copy only when layouts differ).
    if (input.is_non_overlapping_and_dense() || grad_keeps_layout(input)) {
      target = at::empty_strided(input.sizes(), input.strides(), input.options()).copy_(target);
    } else {
      input = input.contiguous();
      target = target.contiguous();
      ok = view_of(input, inner, s_outer, s_class, s_inner);
      TORCH_INTERNAL_ASSERT(ok);
    }
  }
  p.outer = ndim == 1 ? 1 : input.size(0);
  p.inner = inner;
  p.stride_outer = s_outer;
  p.stride_class = s_class;
  p.stride_inner = s_inner;

  if (p.target_b.defined() && !p.target_b.strides().equals(target.strides())) {
    // The kernels read both targets with one set of strides.
    target = target.contiguous();
    p.target_b = p.target_b.contiguous();
  }
  if (!p.soft_target) {
    if (target.dim() == 0) {
      p.target_stride_outer = 0;
      p.target_stride_inner = 0;
    } else {
      int64_t t_inner = 1, t_stride_inner = 1;
      if (!collapse_inner(target.sizes(), target.strides(), 1, t_inner, t_stride_inner)) {
        target = target.contiguous();
        collapse_inner(target.sizes(), target.strides(), 1, t_inner, t_stride_inner);
      }
      p.target_stride_outer = target.stride(0);
      p.target_stride_inner = t_stride_inner;
    }
  }

  // (N, C) with strided classes: walk the N positions as the inner dimension instead.
  if (p.inner == 1 && p.stride_class != 1 && p.classes > 1) {
    p.inner = p.outer;
    p.stride_inner = p.stride_outer;
    p.outer = 1;
    p.stride_outer = 0;
    p.target_stride_inner = p.target_stride_outer;
    p.target_stride_outer = 0;
  }
  p.input = input;
  p.target = target;
  return p;
}

ForwardBuffers make_forward_buffers(const Problem& p, const at::Tensor& input, bool float32_loss,
                                    const c10::optional<at::Tensor>& grad_output,
                                    at::Tensor (*allocate_grad)(const at::Tensor&)) {
  const bool scaled = grad_output.has_value() && grad_output->defined();
  if (scaled) {
    const at::Tensor& g = *grad_output;
    TORCH_CHECK_VALUE(p.compute_grad, "smoothce.forward: grad_output is only used with compute_grad=True");
    TORCH_CHECK(g.device() == p.input.device(), "smoothce.forward: grad_output must be on the input's device (",
                p.input.device(), "), got ", g.device());
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "smoothce.forward: grad_output must be floating, got ",
                     g.scalar_type());
    TORCH_CHECK_VALUE(g.dim() == 0 || (p.reduction == kNone && g.sizes() == at::IntArrayRef(p.position_shape)),
                      "smoothce.forward: grad_output must be a scalar",
                      p.reduction == kNone ? " or have shape " + shape_str(p.position_shape) : std::string(),
                      ", got shape ", shape_str(g.sizes()));
  }
  const auto dtype = p.input.scalar_type();
  ForwardBuffers b;
  b.acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  b.loss_dtype = (float32_loss && (dtype == at::kHalf || dtype == at::kBFloat16)) ? at::kFloat : dtype;
  const auto acc_options = p.input.options().dtype(b.acc_dtype);
  b.lse = at::empty(p.position_shape, acc_options);
  b.position_loss = at::empty(p.position_shape, acc_options);
  b.grad = p.compute_grad ? allocate_grad(input) : at::empty({0}, input.options());
  b.kernel_grad = b.grad;
  if (p.compute_grad && !b.grad.strides().equals(p.input.strides())) b.kernel_grad = at::empty_like(p.input);
  if (p.weight.has_value()) b.weight = p.weight->to(b.acc_dtype).contiguous();
  if (scaled) b.upstream = grad_output->to(b.acc_dtype).contiguous();
  return b;
}

int64_t disjoint_span(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return -1;
    span += (size - 1) * stride;
  }
  return span + 1;
}

bool grad_keeps_layout(const at::Tensor& input) {
  if (input.dim() < 2 || input.dim() > 3 || input.numel() == 0 || input.stride(1) != 1) return false;
  const int64_t span = disjoint_span(input);
  return span > 0 && span <= input.numel() + input.numel() / 4;
}

at::Tensor empty_grad_like(const at::Tensor& input) {
  // (a dense input's strides are empty_like's: the common case skips the test)
  if (input.is_non_overlapping_and_dense() || !grad_keeps_layout(input)) return at::empty_like(input);
  return at::empty_strided(input.sizes(), input.strides(), input.options());
}

at::Tensor grad_over_input(const at::Tensor& input) {
  TORCH_CHECK_VALUE(disjoint_span(input) >= 0,
                    "smoothce.grad_: the gradient cannot be written over logits whose elements may share memory "
                    "(strides ", input.strides(), " for shape ", input.sizes(),
                    ", e.g. expand or unfold); pass a tensor with its own storage, or use inplace_backward=False");
  return input;
}

void check_shard(const Problem& p, int64_t vocab_start, int64_t num_classes) {
  TORCH_CHECK_VALUE(p.classes == 0 || (p.inner == 1 && p.class_contiguous() && (p.stride_outer == p.classes || p.outer <= 1)),
                    "smoothce.shard_stats: the shard must be contiguous rows (positions, classes), got strides ",
                    p.input.strides());
  TORCH_CHECK_VALUE(vocab_start >= 0 && num_classes >= 1 && vocab_start + p.classes <= num_classes,
                    "smoothce.shard_stats: the shard's classes [", vocab_start, ", ", vocab_start + p.classes,
                    ") must lie in [0, num_classes = ", num_classes, ")");
}

void check_shard_stats(const Problem& p, const at::Tensor& stats, at::ScalarType acc_dtype) {
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) >= 1 && stats.size(1) == p.outer &&
                        stats.size(2) == kShardStats && stats.scalar_type() == acc_dtype &&
                        stats.device() == p.input.device() && stats.stride(2) == 1 &&
                        stats.stride(1) == kShardStats && stats.stride(0) >= p.outer * kShardStats,
                    "smoothce.shard_forward: stats must be the ranks' shard_stats stacked, a (ranks, ", p.outer, ", ",
                    kShardStats, ") ", acc_dtype, " tensor on ", p.input.device(), " with contiguous (positions, ",
                    kShardStats, ") slices, got ", stats.sizes(), " ", stats.scalar_type(), " on ", stats.device(),
                    " with strides ", stats.strides());
}

double cpu_scalar(const at::Tensor& t) {
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "smoothce_cpu_scalar",
                                  [&] { value = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return value;
}

void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.device() == grad.device(), "smoothce.scale_grad_: grad_output must be on the gradient's device (",
              grad.device(), "), got ", grad_output.device());
  if (grad_output.dim() == 0) return;
  const std::vector<int64_t> position_shape = positions_of(grad.sizes());
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(position_shape),
                    "smoothce.scale_grad_: grad_output must be a scalar or have shape ", shape_str(position_shape),
                    " (one value per position), got ", shape_str(grad_output.sizes()));
}

}  // namespace smoothce
