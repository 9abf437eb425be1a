// The fused linear + cross-entropy driver (see smoothce/linear.h). Every backend runs this code: the
// CPU op (cpu/cross_entropy.cpp), the CUDA op (cuda/cross_entropy.cu) and the emulated CUDA op of the
// test suite (tests/emu/ops.cpp) differ only in the kernel they pass.
#include "smoothce/linear.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <sstream>
#include <string>

namespace smoothce {
namespace {

// Error messages name the function called: the mixup form when there is a target_b.
const char* where_of(const Extensions& ext) {
  return ext.target_b.has_value() && ext.target_b->defined() ? "smoothce.linear_mixup_cross_entropy: "
                                                             : "smoothce.linear_cross_entropy: ";
}

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

bool is_half(at::ScalarType dt) { return dt == at::kHalf || dt == at::kBFloat16; }

// Argument checks the chunk kernel cannot make (it sees one chunk of logits) or would word for
// cross_entropy; the kernel still checks targets' values and the variants' options per chunk.
void check_args(const char* where, const at::Tensor& input, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t reduction,
                bool float32_loss, const c10::optional<at::Tensor>& grad_output, bool any_grad) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kDouble || dt == at::kFloat || is_half(dt), where,
                   "input must be a floating-point tensor (float64, float32, float16 or bfloat16), got dtype ", dt);
  TORCH_CHECK_VALUE(input.dim() == 2, where, "input must be 2-D (N, H) here (the Python API flattens leading "
                    "dimensions), got shape ", shape_str(input.sizes()));
  TORCH_CHECK_VALUE(w.dim() == 2, where, "linear_weight must be 2-D (V, H), got shape ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(1) == input.size(1), where, "linear_weight must have shape (V, H) with H = ",
                    input.size(1), " (the input's last dimension), got shape ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(0) >= 1, where, "linear_weight must have at least one class (row), got shape ",
                    shape_str(w.sizes()));
  TORCH_CHECK_TYPE(w.scalar_type() == dt, where, "linear_weight must have the input's dtype (", dt, "), got ",
                   w.scalar_type());
  TORCH_CHECK(w.device() == input.device(), where, "linear_weight must be on the input's device (", input.device(),
              "), got ", w.device());
  const int64_t V = w.size(0), N = input.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, where, "linear_bias must have shape (V,) = (", V,
                      ",) to match linear_weight's classes, got shape ", shape_str(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, where, "linear_bias must have the input's dtype (", dt, "), got ",
                     bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), where, "linear_bias must be on the input's device (",
                input.device(), "), got ", bias->device());
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == V, where,
                      "weight (the class weights) must have shape (V,) = (", V,
                      ",) to match linear_weight's classes, got shape ", shape_str(weight->sizes()));
    TORCH_CHECK_TYPE(weight->scalar_type() == dt || (float32_loss && weight->scalar_type() == at::kFloat), where,
                     "weight (the class weights) must have the input's dtype (", dt, "), got ", weight->scalar_type());
  }
  TORCH_CHECK(target.device() == input.device(), where, "target must be on the input's device (", input.device(),
              "), got ", target.device());
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == N && target.size(1) == V, where,
                      "a probability (floating) target must have shape (N, V) = (", N, ", ", V, "), got ",
                      shape_str(target.sizes()));
    // (under autocast an fp32 target with half logits: the chunks are read in fp32, as torch's autocast does)
    TORCH_CHECK_TYPE(target.scalar_type() == dt || (float32_loss && is_half(dt) && target.scalar_type() == at::kFloat),
                     where, "a probability target must have the input's dtype (", dt, "), got ", target.scalar_type());
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, where,
                     "target must hold class indices as int64 (or uint8), or class probabilities in the input's "
                     "dtype; got dtype ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, where,
                      "a target of class indices must have shape (N,) = (", N, ",) (one per input row), got ",
                      shape_str(target.sizes()));
  }
  if (grad_output.has_value() && grad_output->defined()) {
    const at::Tensor& g = *grad_output;
    TORCH_CHECK_VALUE(any_grad, where, "grad_output is only used when output_mask asks for a gradient");
    TORCH_CHECK(g.device() == input.device(), where, "grad_output must be on the input's device (", input.device(),
                "), got ", g.device());
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), where, "grad_output must be floating, got ",
                     g.scalar_type());
    TORCH_CHECK_VALUE(g.dim() == 0 || (reduction == kNone && g.dim() == 1 && g.size(0) == N), where,
                      "grad_output must be a scalar", reduction == kNone ? " or have shape (N,)" : "", ", got shape ",
                      shape_str(g.sizes()));
  }
}

// On CPU tensors the values are checked here, before any GEMM, so that the error names this function
// (on CUDA the chunks' kernels check them without a host sync).
void check_values(const char* where, const at::Tensor& target, const Extensions& ext, int64_t classes, int64_t ignore_index) {
  if (!target.device().is_cpu() || at::isFloatingType(target.scalar_type())) return;
  auto check = [&](const at::Tensor& t_arg, const char* name) {
    const at::Tensor t = t_arg.to(at::kLong);
    const at::Tensor bad = (t != ignore_index).logical_and_((t < 0).logical_or_(t >= classes));
    if (!bad.any().item<bool>()) return;
    TORCH_CHECK_INDEX(false, where, name, " value ", t.masked_select(bad)[0].item<int64_t>(),
                      " is out of bounds: expected class indices in [0, ", classes, ") or ignore_index (",
                      ignore_index, ")");
  };
  const bool mixup = ext.target_b.has_value() && ext.target_b->defined();
  check(target, mixup ? "target_a" : "target");
  if (mixup) check(*ext.target_b, "target_b");
  if (ext.lam.has_value() && ext.lam->defined() && at::isFloatingType(ext.lam->scalar_type())) {
    const at::Tensor& lam = *ext.lam;
    const at::Tensor bad = at::logical_not(at::logical_and(lam >= 0, lam <= 1));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), where, "lam values must be in [0, 1], got ",
                      lam.masked_select(bad)[0].item<double>());
  }
}

// Σ_valid k·w[t] over a target (k: 1, or the mixup share), in double on the device: the mean's
// denominator, as the kernels' own prologue computes it (class weights in the accumulation type).
at::Tensor target_mass(const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t classes,
                       int64_t ignore_index, at::ScalarType acc) {
  const at::Tensor t = target.to(at::kLong);
  const at::Tensor valid = (t != ignore_index).logical_and_(t >= 0).logical_and_(t < classes);
  if (!(weight.has_value() && weight->defined())) return valid.to(at::kDouble);
  const at::Tensor w = weight->to(acc).to(at::kDouble);
  return w.index_select(0, t.masked_fill(valid.logical_not(), 0)).mul_(valid);
}

at::Tensor mean_denominator(const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t classes,
                            int64_t ignore_index, const Extensions& ext, at::ScalarType acc) {
  if (at::isFloatingType(target.scalar_type())) {
    return at::scalar_tensor(static_cast<double>(target.size(0)), target.options().dtype(at::kDouble));
  }
  at::Tensor mass = target_mass(target, weight, classes, ignore_index, acc);
  if (!(ext.target_b.has_value() && ext.target_b->defined())) return mass.sum();
  const at::Tensor mass_b = target_mass(*ext.target_b, weight, classes, ignore_index, acc);
  at::Tensor lam_a, lam_b;  // the kernels' shares: lam and 1 − lam, in the accumulation type
  if (ext.lam.has_value() && ext.lam->defined()) {
    const at::Tensor lam = ext.lam->to(acc);
    lam_a = lam.to(at::kDouble);
    lam_b = (1 - lam).to(at::kDouble);
  } else {
    lam_a = at::scalar_tensor(ext.lam_value, mass.options()).to(acc).to(at::kDouble);
    lam_b = (1 - at::scalar_tensor(ext.lam_value, mass.options()).to(acc)).to(at::kDouble);
  }
  return (mass * lam_a + mass_b * lam_b).sum();
}

// grad_W += dlogitsᵀ·x. A half-precision weight's gradient accumulates in fp32 (acc): on CUDA with
// cuBLAS's fp32 output for half operands (addmm's out_dtype, torch ≥ 2.8); on CPU, which has no such
// GEMM, through fp32 copies of column slices of dlogits, each at most half the size of the chunk's buffer.
void accumulate_grad_weight(at::Tensor& acc, const at::Tensor& dlogits, const at::Tensor& x) {
  if (acc.scalar_type() == dlogits.scalar_type()) {
    acc.addmm_(dlogits.t(), x);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)  // addmm's out_dtype
  // (a torch whose CUDA addmm wants `self` in the operands' dtype refuses before computing anything: then
  // every later call takes the fp32-copy path below)
  static std::atomic<bool> fp32_out_refused{false};
  if (acc.is_cuda() && !fp32_out_refused.load(std::memory_order_relaxed)) {
    try {
      at::addmm_out(acc, acc, dlogits.t(), x, acc.scalar_type());
      return;
    } catch (const c10::OutOfMemoryError&) {
      throw;
    } catch (const c10::Error&) {
      fp32_out_refused.store(true, std::memory_order_relaxed);
    }
  }
#endif
  const at::Tensor x_acc = x.to(acc.scalar_type());
  const int64_t V = dlogits.size(1), slice = std::max<int64_t>(1, (V + 3) / 4);
  for (int64_t v0 = 0; v0 < V; v0 += slice) {
    const int64_t width = std::min(slice, V - v0);
    acc.narrow(0, v0, width).addmm_(dlogits.narrow(1, v0, width).to(acc.scalar_type()).t(), x_acc);
  }
}

c10::optional<at::Tensor> rows_of(const c10::optional<at::Tensor>& t, int64_t start, int64_t rows) {
  if (!(t.has_value() && t->defined())) return t;
  return t->narrow(0, start, rows);
}

}  // namespace

int64_t linear_chunk_rows(int64_t rows, int64_t features, int64_t classes, int64_t itemsize, int64_t chunk_size,
                          bool fewest) {
  if (rows <= 0) return 0;
  if (chunk_size > 0) return std::min(chunk_size, rows);
  const int64_t row_bytes = std::max<int64_t>(1, classes * itemsize);
  const int64_t cap = std::max<int64_t>(1, kLinearChunkBudget / row_bytes);
  const int64_t like_input = (rows * features + classes - 1) / std::max<int64_t>(1, classes);  // ⌈N·H/V⌉
  const int64_t fit = fewest ? cap : std::min(cap, std::max(kLinearMinChunkRows, like_input));
  const int64_t chunks = (rows + fit - 1) / fit;
  return (rows + chunks - 1) / chunks;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool float32_loss, std::array<bool, 4> output_mask, int64_t chunk_size,
    bool fp32_grad_weight, const c10::optional<at::Tensor>& grad_output, const Extensions& ext,
    const ChunkKernel& kernel) {
  const char* where = where_of(ext);
  const bool need_input = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const bool has_bias = linear_bias.has_value() && linear_bias->defined();
  const bool soft = at::isFloatingType(target.scalar_type());
  const bool need_target = output_mask[3];
  TORCH_CHECK_VALUE(!need_b || has_bias, where, "output_mask asks for linear_bias's gradient without a linear_bias");
  TORCH_CHECK_VALUE(!need_target || soft, where, "only a probability (floating) target has a gradient");
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum, where,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(chunk_size >= 0, where, "chunk_size must be a positive number of rows (or None), got ",
                    chunk_size);
  const bool grad_logits = need_input || need_w || need_b;  // the kernel writes dlogits over the buffer
  const bool any_grad = grad_logits || need_target;
  check_args(where, input, linear_weight, linear_bias, target, weight, reduction, float32_loss, grad_output, any_grad);

  const int64_t N = input.size(0), H = input.size(1), V = linear_weight.size(0);
  check_values(where, target, ext, V, ignore_index);
  const auto dtype = input.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto loss_dtype = float32_loss && is_half(dtype) ? at::kFloat : dtype;
  const auto options = input.options();

  // Rows per chunk; with a single chunk the weight's gradient is one GEMM, rounded once in any dtype.
  // (CPU, half weights, fp32 accumulation: ATen has no CPU GEMM from half operands into fp32, so each
  // extra chunk costs an fp32 GEMM; as few chunks as the budget allows, one when the logits fit it.)
  const bool fewest = input.device().is_cpu() && is_half(dtype) && fp32_grad_weight && need_w;
  const int64_t chunk = linear_chunk_rows(N, H, V, input.element_size(), chunk_size, fewest);
  const bool one_chunk = chunk >= N;
  const auto b_acc = fp32_grad_weight && is_half(dtype) ? at::kFloat : dtype;
  const auto w_acc = one_chunk ? dtype : b_acc;

  at::Tensor position_loss = at::empty({N}, options.dtype(acc));
  at::Tensor lse = at::empty({N}, options.dtype(acc));
  at::Tensor grad_input = need_input ? at::empty({N, H}, options) : at::empty({0}, options);
  at::Tensor grad_w = need_w ? at::zeros({V, H}, options.dtype(w_acc)) : at::empty({0}, options);
  at::Tensor grad_b = need_b ? at::zeros({V}, options.dtype(b_acc)) : at::empty({0}, options);
  at::Tensor grad_target = need_target ? at::empty({N, V}, target.options()) : at::empty({0}, options);
  // An fp32 probability target with half logits (autocast): each chunk's logits are read in fp32 and
  // their gradient rounded once to the logits' dtype, as torch's autocast computes the loss.
  const bool upcast = soft && target.scalar_type() != dtype;
  const c10::optional<at::Tensor> class_weight =
      upcast && weight.has_value() && weight->defined() ? c10::optional<at::Tensor>(weight->to(at::kFloat)) : weight;

  // The upstream gradient of every position: grad_output per position ('none'), or the scalar
  // (grad_output, or 1) over the mean's denominator, computed before the first chunk.
  at::Tensor denominator, scale;
  if (reduction == kMean && N > 0) denominator = mean_denominator(target, weight, V, ignore_index, ext, acc);
  const bool has_upstream = grad_output.has_value() && grad_output->defined();
  if (any_grad && reduction != kNone) {
    scale = has_upstream ? grad_output->to(at::kDouble) : at::ones({}, options.dtype(at::kDouble));
    if (reduction == kMean && N > 0) scale = scale / denominator;
  }
  auto upstream_rows = [&](int64_t start, int64_t rows) -> c10::optional<at::Tensor> {
    if (!any_grad) return c10::nullopt;
    if (reduction == kNone) return has_upstream ? c10::optional<at::Tensor>(grad_output->narrow(0, start, rows))
                                                : c10::nullopt;
    return scale.expand({rows});
  };

  at::Tensor buffer = chunk > 0 ? at::empty({chunk, V}, options) : at::Tensor();
  const at::Tensor weight_t = linear_weight.t();
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    const at::Tensor x = input.narrow(0, start, rows);
    if (has_bias) {
      at::addmm_out(logits, *linear_bias, x, weight_t);
    } else {
      at::mm_out(logits, x, weight_t);
    }
    const at::Tensor t = target.narrow(0, start, rows);
    Extensions chunk_ext = ext;
    chunk_ext.target_b = rows_of(ext.target_b, start, rows);
    chunk_ext.lam = rows_of(ext.lam, start, rows);
    const c10::optional<at::Tensor> upstream = upstream_rows(start, rows);
    const at::Tensor work = upcast ? logits.to(at::kFloat) : logits;
    at::Tensor chunk_loss, chunk_lse;
    if (need_target) {
      // ∂L/∂P = −s·(1 − ε)·w·log_softmax(x), from the logits before the gradient overwrites them.
      std::tie(chunk_loss, chunk_lse, std::ignore) = kernel(work, t, class_weight, ignore_index, kNone, label_smoothing,
                                                            false, true, c10::nullopt, chunk_ext, false);
      at::Tensor g = at::sub(work, chunk_lse.unsqueeze(1)).mul_(-(1.0 - label_smoothing));  // acc type
      if (upstream.has_value()) g.mul_(upstream->to(acc).unsqueeze(1));
      if (weight.has_value() && weight->defined()) g.mul_(weight->to(acc));
      grad_target.narrow(0, start, rows).copy_(g);
    }
    if (grad_logits || !need_target) {
      std::tie(chunk_loss, chunk_lse, std::ignore) =
          kernel(work, t, class_weight, ignore_index, kNone, label_smoothing, grad_logits, true,
                 grad_logits ? upstream : c10::nullopt, chunk_ext, grad_logits);
      if (upcast && grad_logits) logits.copy_(work);
    }
    position_loss.narrow(0, start, rows).copy_(chunk_loss);
    lse.narrow(0, start, rows).copy_(chunk_lse);
    if (!grad_logits) continue;
    if (need_input) {
      at::Tensor grad_rows = grad_input.narrow(0, start, rows);
      at::mm_out(grad_rows, logits, linear_weight);
    }
    if (need_w) accumulate_grad_weight(grad_w, logits, x);
    if (need_b) grad_b.add_(logits.sum(0, /*keepdim=*/false, b_acc));
  }

  at::Tensor loss;
  if (reduction == kNone) {
    loss = position_loss.to(loss_dtype);
  } else {
    at::Tensor total = position_loss.sum(at::kDouble);
    if (reduction == kMean) total = N > 0 ? total / denominator : total / 0.0;  // 0/0 is NaN, as torch
    loss = total.to(loss_dtype);
  }
  if (need_w) grad_w = grad_w.to(dtype);
  if (need_b) grad_b = grad_b.to(dtype);
  return {loss, lse, grad_input, grad_w, grad_b, grad_target};
}

}  // namespace smoothce
