// Argument checks and the (outer, classes, inner) view every backend works on. Host only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "smoothce/row_math.h"

namespace smoothce {

// The docs/semantics.md §3 options of the forward op (its keyword arguments): explicit target values
// (on, off) for index targets, the z-loss weight, and a mixup partner target with its share lam (a
// per-position tensor, or lam_value for every position).
struct Extensions {
  c10::optional<c10::ArrayRef<double>> target_values;
  double z_loss = 0.0;
  c10::optional<at::Tensor> target_b;
  c10::optional<at::Tensor> lam;
  double lam_value = 1.0;
};

// The op implementations' parameters for the schema's extension arguments (SMOOTHCE_EXTENSION_ARGS in
// schema.h), and the Extensions they make.
#define SMOOTHCE_EXTENSION_PARAMS                                                                          \
  c10::optional<c10::ArrayRef<double>> target_values, double z_loss, const c10::optional<at::Tensor>&target_b, \
      const c10::optional<at::Tensor>&lam, double lam_value
#define SMOOTHCE_EXTENSIONS ::smoothce::Extensions{target_values, z_loss, target_b, lam, lam_value}

// The input seen as x[n, c, s] = data[n*stride_outer + c*stride_class + s*stride_inner] with
// n < outer, c < classes, s < inner. (N, C, d1..dk) collapses d1..dk into `inner` without a copy
// whenever their strides allow it; (N, C) has inner = 1 and is then turned around (outer = 1,
// inner = N) when its classes are strided, so that one kernel family covers class-contiguous rows
// and another vectorizes across positions. The gradient and a probability target share the
// input's strides (the checks make sure of it).
struct Problem {
  at::Tensor input;
  at::Tensor target;                 // index: int64/uint8 positions; soft: same strides as input
  c10::optional<at::Tensor> weight;  // 1-D, contiguous, length classes
  bool soft_target = false;
  int64_t outer = 0, classes = 0, inner = 0;
  int64_t stride_outer = 0, stride_class = 0, stride_inner = 0;
  int64_t target_stride_outer = 0, target_stride_inner = 0;  // index targets only
  std::vector<int64_t> position_shape;  // shape of a per-position tensor (loss for 'none', lse)
  int64_t ignore_index = -100;
  int64_t reduction = 1;
  double label_smoothing = 0.0;
  bool compute_grad = false;
  bool has_target_values = false;
  double target_values[2] = {0.0, 0.0};  // (on, off) when has_target_values
  double z_loss = 0.0;
  at::Tensor target_b;  // mixup partner: the target's dtype and strides; undefined without mixup
  at::Tensor lam;       // mixup share per position (contiguous, accumulation type), or undefined
  double lam_value = 1.0;

  int64_t positions() const { return outer * inner; }
  PositionLayout layout() const {
    return {classes, outer, inner, stride_outer, stride_class, stride_inner, target_stride_outer, target_stride_inner,
            ignore_index};
  }
  template <typename acc_t>
  Smoothing<acc_t> smoothing() const {
    return Smoothing<acc_t>::make(label_smoothing, classes, has_target_values ? target_values : nullptr, z_loss);
  }
  // Classes contiguous in memory: the per-row kernel; otherwise positions are (the across-rows kernel).
  bool class_contiguous() const { return stride_class == 1 || classes == 1; }
};

// `autocast` (the op's float32_loss) also admits float32 class weights for half logits, as torch's
// autocast hands cross_entropy fp32 weights. Validates every argument (errors name the argument, the value seen and what is expected) and
// builds the view. May make `input` (and a soft `target`) contiguous when their strides cannot be
// described by the view; never copies a dense input or an expanded forward-only input.
Problem make_problem(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                     int64_t ignore_index, int64_t reduction, double label_smoothing, bool compute_grad,
                     bool autocast, const Extensions& extensions = {});

// The tensors a forward writes, and its inputs converted for the kernels, made alike by every backend.
struct ForwardBuffers {
  at::ScalarType acc_dtype, loss_dtype;
  at::Tensor lse, position_loss;  // per position, accumulation type
  at::Tensor grad;                // the caller's input layout (as the fake kernel); empty without compute_grad
  at::Tensor kernel_grad;         // grad, or a twin with the problem input's strides (see copy_back)
  at::Tensor weight;              // class weights in the accumulation type (undefined without weights)
  at::Tensor upstream;            // grad_output in the accumulation type, contiguous (undefined without)

  // When the checks had to make the input contiguous, the kernels wrote a contiguous twin.
  void copy_back() const {
    if (!kernel_grad.is_same(grad)) grad.copy_(kernel_grad);
  }
};

// Checks forward's grad_output (defined only with compute_grad, on the input's device, floating, a
// scalar or, for reduction 'none', one value per position) and allocates the outputs; the gradient
// with `allocate_grad(input)`, which must lay it out as empty_grad_like(input).
ForwardBuffers make_forward_buffers(const Problem& p, const at::Tensor& input, bool float32_loss,
                                    const c10::optional<at::Tensor>& grad_output,
                                    at::Tensor (*allocate_grad)(const at::Tensor&));

// allocate_grad for smoothce::grad_: the gradient goes over the logits themselves (refused when
// elements may share memory: expand, unfold).
at::Tensor grad_over_input(const at::Tensor& input);

// The span of a tensor's elements in memory (1 + Σ (size − 1)·stride), or −1 when two of them may
// share memory: with the dimensions of size > 1 ordered by stride, each stride must exceed the span
// of the smaller ones (slices, transposes and channels_last pass; expand and unfold do not).
// smoothce/_function.py's _elements_apart is the same test.
int64_t disjoint_span(const at::Tensor& t);

// Whether a gradient of `input` takes the input's own strides: 2-d and 3-d inputs with contiguous
// classes whose elements do not share memory and span at most 5/4 of their number (the gaps the
// gradient's storage then holds), dense or with gaps (a vocabulary's padding sliced off, a language
// model's logits[:, :-1] as (B, V, T − 1)). Other layouts get at::empty_like's. The fake kernels
// (smoothce/_function.py, _grad_like) lay the gradient out by the same rule.
bool grad_keeps_layout(const at::Tensor& input);

// The gradient's layout for `input` (above): the input's strides where grad_keeps_layout, else
// at::empty_like(input)'s (the same for dense inputs).
at::Tensor empty_grad_like(const at::Tensor& input);

// Vocabulary-parallel shards (smoothce::shard_stats, shard_forward), on every backend: the shard is
// contiguous rows (positions, classes) whose classes lie in [0, num_classes) from vocab_start; the
// stats are every rank's (ranks, positions, kShardStats) in the accumulation type, each rank's slice
// contiguous.
void check_shard(const Problem& p, int64_t vocab_start, int64_t num_classes);
void check_shard_stats(const Problem& p, const at::Tensor& stats, at::ScalarType acc_dtype);

// A floating CPU scalar's value, read in place (no aten::item round trip).
double cpu_scalar(const at::Tensor& t);

// Checks grad_output for scale_grad_ against the gradient it scales.
void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& grad_output);

}  // namespace smoothce
