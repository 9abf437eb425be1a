"""The autograd.Function over torch.ops.smoothce.*, and the fake (meta) kernels torch.compile traces."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.smoothce)

# The ops every call goes through. The test suite swaps in torch.ops.smoothce_emu (the CUDA kernels'
# source run on CPU by tests/emu) to run the whole suite on them.
_ops = torch.ops.smoothce

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_DTENSOR = "DTensor"  # torch.distributed.tensor.DTensor's name: such logits go to smoothce.distributed


def _position_shape(input: torch.Tensor):
    class_dim = 0 if input.dim() == 1 else 1
    return input.shape[:class_dim] + input.shape[class_dim + 1 :]


_KERNEL_DEVICES = {"cpu", "meta"} | ({"cuda"} if _C.build_info["cuda"] == "yes" else set())


def _check_kernel_device(input):
    if input.is_cpu and "cpu" in _KERNEL_DEVICES:  # (is_cpu is much quicker to read than .device)
        return
    if input.device.type not in _KERNEL_DEVICES:
        raise NotImplementedError(
            f"smoothce.cross_entropy: this build of smoothce has no kernels for {input.device.type} tensors "
            f"(it has: {', '.join(sorted(_KERNEL_DEVICES - {'meta'}))}); see `python -m smoothce`"
        )


def _check_devices(where: str, input, target, weight, target_b=None, **others):
    """Before dispatch: a CUDA or meta tensor among CPU ones would otherwise pick that backend's kernel.
    others: more tensor arguments by name (None: absent)."""
    if (input.is_cpu and (target is None or target.is_cpu) and (weight is None or weight.is_cpu)
            and (target_b is None or target_b.is_cpu) and not others):
        return  # all on the CPU (is_cpu is much quicker to read than .device)
    device = input.device
    named = (("target", target), ("weight", weight), ("target_b", target_b)) + tuple(others.items())
    for name, tensor in named:
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{where}: {name} must be on the input's device ({device}), got {tensor.device}")


@torch.library.register_fake("smoothce::forward")
def _forward_fake(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss,
                  grad_output=None, target_values=None, z_loss=0.0, target_b=None, lam=None, lam_value=1.0):
    _check_devices("smoothce.forward", input, target, weight, target_b)  # this is also the Meta kernel
    positions = _position_shape(input)
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss_dtype = torch.float32 if float32_loss and input.dtype in _HALF_DTYPES else input.dtype
    loss = input.new_empty(positions if reduction == 0 else (), dtype=loss_dtype)
    lse = input.new_empty(positions, dtype=acc_dtype)
    grad = _grad_like(input) if compute_grad else input.new_empty((0,))
    return loss, lse, grad


def _grad_like(input):
    """An empty gradient laid out as the kernels lay it out (problem.h's grad_keeps_layout): with the
    input's strides where it is 2-d or 3-d with contiguous classes, its elements apart and their span
    at most 5/4 of their number (a padded vocabulary sliced off, a language model's logits[:, :-1] as
    (B, V, T - 1)); else as torch.empty_like."""
    if 2 <= input.dim() <= 3 and input.numel() > 0 and input.stride(1) == 1 and _elements_apart(input):
        span = 1 + sum((size - 1) * stride for size, stride in zip(input.shape, input.stride()))
        if span <= input.numel() + input.numel() // 4:
            return input.new_empty_strided(input.shape, input.stride())
    return torch.empty_like(input)


@torch.library.register_fake("smoothce::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


@torch.library.register_fake("smoothce::grad_")
def _grad_fake(input, target, weight, ignore_index, reduction, label_smoothing, float32_loss, grad_output,
               target_values=None, z_loss=0.0, target_b=None, lam=None, lam_value=1.0):
    _check_devices("smoothce.grad_", input, target, weight, target_b)
    return None


# The vocabulary-parallel ops (smoothce/distributed.py): 10 statistics per position (kShardStats).
@torch.library.register_fake("smoothce::shard_stats")
def _shard_stats_fake(input, target, weight, vocab_start, num_classes, ignore_index, label_smoothing, float32_loss,
                      target_values=None, z_loss=0.0, target_b=None, lam=None, lam_value=1.0):
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    return input.new_empty((input.shape[0], 10), dtype=acc)


@torch.library.register_fake("smoothce::shard_forward")
def _shard_forward_fake(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction,
                        label_smoothing, compute_grad, float32_loss, grad_output=None, target_values=None, z_loss=0.0,
                        target_b=None, lam=None, lam_value=1.0):
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss_dtype = torch.float32 if float32_loss and input.dtype in _HALF_DTYPES else input.dtype
    loss = input.new_empty((input.shape[0],) if reduction == 0 else (), dtype=loss_dtype)
    grad = torch.empty_like(input) if compute_grad else input.new_empty((0,))
    return loss, input.new_empty((input.shape[0],), dtype=acc), grad


@torch.library.register_fake("smoothce::shard_grad_")
def _shard_grad_fake(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction, label_smoothing,
                     float32_loss, grad_output, target_values=None, z_loss=0.0, target_b=None, lam=None, lam_value=1.0):
    return None


class CrossEntropyFunction(torch.autograd.Function):
    """Forward runs the fused kernel; for mean and sum, when the input needs a gradient, the kernel
    writes it too, for an upstream gradient of 1, and the first backward only rescales it in place (a
    no-op for plain loss.backward()). Reduction 'none' (whose upstream gradient is a tensor) and a
    later backward through a retained graph (retain_graph=True, gradcheck, jacobians) recompute the
    gradient from the saved logits, scaled by the upstream gradient inside the kernel: one read of the
    logits and one write of the gradient."""

    # The forward(ctx, ...) form: the setup_context form makes every apply() bind its arguments
    # through inspect.signature, which costs more than the whole kernel on small inputs.
    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss,
                target_values, z_loss, target_b, lam, lam_value, inplace, divisor):
        ext = dict(target_values=target_values, z_loss=z_loss, target_b=target_b, lam=lam, lam_value=lam_value)
        # inplace_backward: nothing fused; backward writes the gradient over the logits.
        fuse = compute_grad and reduction != REDUCTIONS["none"] and not inplace
        # divisor (reduction 'sum'): the loss is Σ/divisor, and the fused gradient is scaled by 1/divisor in
        # the kernel rather than by a second pass over it in backward.
        grad_scale = None if divisor is None else _reciprocal(divisor, input)
        loss, lse, grad = _ops.forward(input, target, weight, ignore_index, reduction, label_smoothing, fuse, float32_loss,
                                       grad_scale if fuse else None, **ext)
        if divisor is not None:
            loss = loss / divisor
        ctx.mark_non_differentiable(lse, grad)
        ctx.set_materialize_grads(False)  # no zero-filled N×C gradient for the `grad` output
        ctx.args = (ignore_index, reduction, label_smoothing, float32_loss)
        ctx.ext = ext
        ctx.inplace = inplace
        # Eager: the forward's gradient is handed out once (not a saved tensor: it is consumed in place
        # and may become input.grad); the logits are saved for a second backward and soft-target
        # gradients. Compiled graphs are functional: there the gradient is a saved tensor and backward
        # scales a copy of it.
        compiled_grad = fuse and torch.compiler.is_compiling()
        ctx.fused_grad = grad if fuse and not compiled_grad else None
        ctx.scaled = grad_scale is not None
        ctx.save_for_backward(input, target, weight, lse, grad if compiled_grad else None, grad_scale)
        return loss, lse, grad

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_grad):
        ignore_index, reduction, label_smoothing, float32_loss = ctx.args
        grad_input = grad_target = None
        if grad_loss is None:  # the loss did not reach the graph's outputs: its gradient is zero
            return (None,) * _APPLY_ARGS
        # The upstream gradient of the unscaled loss (the fused and compiled gradients carry the scale).
        upstream = grad_loss
        if ctx.scaled:
            grad_scale = ctx.saved_tensors[5]
            upstream = grad_loss.to(grad_scale.dtype) * grad_scale
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients for higher orders
            return _differentiable_backward(ctx, upstream)
        if ctx.needs_input_grad[1]:  # before an in-place gradient overwrites the logits it needs
            input, _, weight, lse = ctx.saved_tensors[:4]
            grad_target = _soft_target_grad(upstream, input, lse, weight, reduction, label_smoothing)
        if ctx.needs_input_grad[0]:
            grad_input, ctx.fused_grad = ctx.fused_grad, None
            if grad_input is not None and not _rescale_fused_grad(grad_input, grad_loss):
                grad_input = None  # recomputed below, scaled inside the kernel
            if grad_input is not None:
                _ops.scale_grad_(grad_input, grad_loss)
            elif ctx.saved_tensors[4] is not None:  # compiled
                grad_input = _scaled(ctx.saved_tensors[4], grad_loss)
            elif ctx.inplace and not torch.compiler.is_compiling():
                # The gradient over the logits. Bumping their version makes any other user of them in
                # the graph (a saved tensor, or this graph's own second backward) raise autograd's
                # "modified by an inplace operation" error instead of reading the gradient.
                input, target, weight = ctx.saved_tensors[:3]
                _ops.grad_(input, target, weight, ignore_index, reduction, label_smoothing, float32_loss,
                           upstream, **ctx.ext)
                torch.autograd.graph.increment_version(input)
                grad_input = input
            else:  # 'none', a second backward (the fused gradient was consumed), or a rescale rounding twice
                input, target, weight = ctx.saved_tensors[:3]
                _, _, grad_input = _ops.forward(
                    input, target, weight, ignore_index, reduction, label_smoothing, True, float32_loss, upstream,
                    **ctx.ext
                )
        return (grad_input, grad_target) + (None,) * (_APPLY_ARGS - 2)


_APPLY_ARGS = 15  # CrossEntropyFunction.forward's arguments after ctx


# Whether autocast is on for any device: a quick test before asking for the input's (an older torch may lack it).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _cpp_autograd() -> bool:
    """Whether _C.cross_entropy may serve a call: in eager mode only. torch.compile traces the ops
    and CrossEntropyFunction, and torch.func's transforms get their errors."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _reciprocal(divisor, input):
    """1/divisor in the kernels' accumulation dtype (fp64 for fp64 logits, else fp32)."""
    return torch.reciprocal(divisor.to(torch.float64 if input.dtype == torch.float64 else torch.float32))


def _differentiable_backward(ctx, grad_loss):
    """Gradients that autograd can differentiate again (second order: Hessian-vector products,
    meta-learning), from the reference implementation's graph; only used under create_graph=True."""
    ignore_index, reduction, label_smoothing, _ = ctx.args
    input, target, weight = ctx.saved_tensors[:3]
    grad_input, grad_target = _differentiable_grads(input, target, weight, ignore_index, reduction, label_smoothing,
                                                    ctx.ext, grad_loss, ctx.needs_input_grad[:2])
    return (grad_input, grad_target) + (None,) * (_APPLY_ARGS - 2)


def _differentiable_grads(input, target, weight, ignore_index, reduction, label_smoothing, ext, grad_loss, needed):
    """(∂L/∂input, ∂L/∂target) for grad_loss, each only where `needed` says, with a graph of their own."""
    from . import reference

    wanted = [t for t, need in zip((input, target), needed) if need]
    with torch.enable_grad():
        loss = reference.loss_with_options(input, target, weight, ignore_index, _REDUCTION_NAMES[reduction],
                                           label_smoothing, **ext)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    return tuple(next(grads) if need else None for need in needed)


def _differentiable_input_grad(input, target, weight, ignore_index, reduction, label_smoothing, target_values, z_loss,
                               target_b, lam, lam_value, grad_loss):
    """The C++ node's backward under create_graph=True (csrc/autograd.cpp)."""
    ext = dict(target_values=target_values, z_loss=z_loss, target_b=target_b, lam=lam, lam_value=lam_value)
    return _differentiable_grads(input, target, weight, ignore_index, reduction, label_smoothing, ext, grad_loss,
                                 (True, False))[0]


_C.set_differentiable_grad(_differentiable_input_grad)


def _rescale_fused_grad(grad, grad_loss):
    """Whether to rescale the fused gradient by grad_loss rather than recompute it scaled inside the
    kernel: fp32/fp64, tensors off the CPU, and half types for 1 and (bf16) powers of two.
    csrc/autograd.cpp's rescale_fused_grad is the same test for the C++ node, and says why."""
    if (grad.dtype not in (torch.bfloat16, torch.float16) or grad_loss.device.type != "cpu" or grad_loss.dim() != 0
            or torch._C._are_functorch_transforms_active()):
        return True
    g = grad_loss.item()
    return g == 1.0 or (abs(math.frexp(g)[0]) == 0.5 and grad.dtype == torch.bfloat16)


def _scaled(grad, grad_loss):
    """grad · grad_loss out of place (grad_loss a scalar or one value per position), in grad's dtype."""
    if grad_loss.dim() > 0 and grad.dim() > 1:
        grad_loss = grad_loss.unsqueeze(1)
    return (grad * grad_loss).to(grad.dtype)


def _soft_target_grad(grad_loss, input, lse, weight, reduction, label_smoothing):
    """∂L/∂P = −s·(1 − ε)·w·log_softmax(x) (docs/semantics.md §2.4), from the saved per-position lse."""
    class_dim = 0 if input.dim() == 1 else 1
    log_prob = input.to(lse.dtype) - lse.unsqueeze(class_dim)
    scale = grad_loss.to(lse.dtype)
    if reduction == REDUCTIONS["none"]:
        scale = scale.unsqueeze(class_dim)
    elif reduction == REDUCTIONS["mean"]:
        scale = scale / math.prod(_position_shape(input))  # mean over positions (0 gives NaN, as torch)
    out = log_prob * (-(1.0 - label_smoothing)) * scale
    if weight is not None:
        shape = [1] * input.dim()
        shape[class_dim] = -1
        out = out * weight.to(lse.dtype).view(shape)
    return out.to(input.dtype)


# The types _check_number accepts without the (slower) numbers ABC check.
_EXACT_TYPES = {numbers.Integral: (int,), numbers.Real: (float, int)}


def _check_number(name: str, value, kind, where="smoothce.cross_entropy"):
    if type(value) in _EXACT_TYPES[kind]:
        return
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if kind is numbers.Integral else "a float"
        raise TypeError(f"{where}: {name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_tensor(where, name, value, optional=False):
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{where}: {name} must be {expected}, got {type(value).__name__}")


def _check_loss_args(where, ignore_index, reduction, label_smoothing) -> float:
    """Checks the arguments every loss takes; returns label_smoothing as a float."""
    _check_number("ignore_index", ignore_index, numbers.Integral, where)
    _check_number("label_smoothing", label_smoothing, numbers.Real, where)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:  # also rejects NaN (torch silently uses 0 for ε < 0: ★)
        raise ValueError(f"{where}: label_smoothing must be a float in [0, 1], got {label_smoothing}")
    return label_smoothing


def _extension_args(where, input, target, label_smoothing, smoothing, target_values, z_loss, inplace_backward,
                    num_classes=None):
    """Checks the docs/semantics.md §3 keywords; returns (label_smoothing, target_values) for the op: "others"
    and explicit values become (on, off) for index targets. num_classes: C when the input is not the
    logits (the fused linear loss)."""
    if (type(smoothing) is str and smoothing == "uniform" and target_values is None and type(z_loss) in (float, int)
            and z_loss == 0 and inplace_backward is False):
        return label_smoothing, None  # the defaults (a quick way through the checks below)
    if not isinstance(smoothing, str) or smoothing not in ("uniform", "others"):
        raise ValueError(f"{where}: smoothing must be 'uniform' or 'others', got {smoothing!r}")
    _check_number("z_loss", z_loss, numbers.Real, where)
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"{where}: z_loss must be a finite float >= 0, got {z_loss}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"{where}: inplace_backward must be a bool, got {inplace_backward!r}")
    if target_values is not None:
        if not isinstance(target_values, (tuple, list)) or len(target_values) != 2:
            raise ValueError(f"{where}: target_values must be a pair (on, off), got {target_values!r}")
        for value in target_values:
            _check_number("target_values", value, numbers.Real, where)
        if not all(math.isfinite(v) and v >= 0 for v in target_values):
            raise ValueError(f"{where}: target_values must be finite and non-negative, got {tuple(target_values)}")
        if label_smoothing != 0.0 or smoothing != "uniform":
            raise ValueError(
                f"{where}: target_values=(on, off) set the target distribution themselves; they cannot be combined "
                f"with label_smoothing={label_smoothing} or smoothing={smoothing!r}"
            )
    if (smoothing == "others" or target_values is not None) and target.is_floating_point():
        option = "smoothing='others'" if target_values is None else "target_values"
        raise ValueError(
            f"{where}: {option} applies to class-index targets only; got a probability (floating) target "
            f"(mix the smoothing into the probabilities instead)"
        )
    if target_values is not None:
        return 0.0, [float(target_values[0]), float(target_values[1])]
    if smoothing == "others":
        if num_classes is None:
            num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
        off = label_smoothing / (num_classes - 1) if num_classes > 1 else 0.0  # C = 1: no other class
        return 0.0, [1.0 - label_smoothing, off]
    return label_smoothing, None


def _elements_apart(tensor) -> bool:
    """True when no two elements of `tensor` can share memory: with its dimensions ordered by stride,
    each stride exceeds the span of the smaller ones (slices, transposes, channels_last pass; expand,
    unfold and some exotic as_strided layouts do not). The C++ op checks the same (disjoint_span)."""
    span = 0
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1):
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def _check_inplace(where, input, target):
    """inplace_backward writes the gradient over the logits: refuse where autograd itself forbids an
    in-place write (a leaf that requires grad, or a view of one) and where the gradient of the target
    needs the logits after they are overwritten."""
    base = input._base if input._base is not None else input
    # (compiled graphs compute the gradient out of place: see CrossEntropyFunction.backward)
    if not torch.compiler.is_compiling() and not _elements_apart(input):
        raise RuntimeError(
            f"{where}: inplace_backward=True cannot write the gradient over logits whose elements may share memory "
            f"(strides {tuple(input.stride())} for shape {tuple(input.shape)}, e.g. expand or unfold); use "
            f"inplace_backward=False"
        )
    if base.is_leaf and base.requires_grad:
        raise RuntimeError(
            f"{where}: inplace_backward=True would write the gradient over the logits, but they are "
            f"{'a view of ' if base is not input else ''}a leaf tensor that requires grad (its .grad and its values "
            f"would share memory); pass the output of a layer, or use inplace_backward=False"
        )
    if target.requires_grad and target.is_floating_point():
        raise RuntimeError(
            f"{where}: inplace_backward=True cannot be combined with a target that requires grad (its gradient "
            f"needs the logits that the in-place gradient overwrites)"
        )


def cross_entropy_impl(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    smoothing: str = "uniform",
    target_values=None,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
    mixup: bool = False,
    target_b: Optional[torch.Tensor] = None,
    lam=None,
    where: str = "smoothce.cross_entropy",
    float32_loss: bool = False,
    divisor=None,
) -> torch.Tensor:
    """For the integrations: float32_loss, an fp32 loss from half logits also outside autocast (their
    libraries return one); divisor (an int or a tensor, with reduction 'sum'), the loss Σ/divisor
    (transformers' sum / num_items_in_batch) with the gradient's 1/divisor applied inside the kernel."""
    if _DTENSOR in (type(input).__name__, type(target).__name__, type(weight).__name__):
        from . import distributed  # DTensor logits: the vocabulary-parallel loss (docs/semantics.md §10)

        if divisor is not None or float32_loss:
            raise ValueError(f"{where}: DTensor logits are not supported by this integration's options")
        return distributed.dtensor_cross_entropy(where, input, target, weight, ignore_index, reduction,
                                                 label_smoothing, smoothing, target_values, z_loss, inplace_backward,
                                                 mixup=mixup, target_b=target_b, lam=lam)
    _check_tensor(where, "input", input)
    _check_tensor(where, "target_a" if mixup else "target", target)
    _check_tensor(where, "weight", weight, optional=True)
    label_smoothing = _check_loss_args(where, ignore_index, reduction, label_smoothing)
    label_smoothing, op_target_values = _extension_args(
        where, input, target, label_smoothing, smoothing, target_values, z_loss, inplace_backward
    )
    z_loss = float(z_loss)
    lam_tensor, lam_value = _mixup_lam(where, input, target, target_b, lam) if mixup else (None, 1.0)
    if divisor is not None:
        assert reduction == "sum", "divisor divides the sum"
        divisor = torch.as_tensor(divisor, device=input.device)

    _check_kernel_device(input)
    _check_devices(where, input, target, weight, target_b)
    # Under autocast the loss is fp32 (as torch's cross_entropy), read straight from the half logits;
    # fp32 class weights are used as they are. Only probability targets in another dtype than the
    # logits need both in fp32 (torch's autocast copies the logits to fp32 in every case).
    float32_loss = bool(float32_loss) or (_any_autocast() and torch.is_autocast_enabled(input.device.type))
    if float32_loss and target.is_floating_point() and input.is_floating_point() and target.dtype != input.dtype:
        input, target = input.float(), target.float()
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    inplace = inplace_backward and compute_grad
    target_grad = target.requires_grad and torch.is_grad_enabled()
    if not inplace and divisor is None and not target_grad and _cpp_autograd():
        # Inference and the common training call, through one C++ call; for training, one C++ autograd
        # node (csrc/autograd.cpp: CrossEntropyFunction's algorithm without the cost of a Python
        # autograd.Function and a Python backward).
        return _C.cross_entropy(
            _ops.name, input, target, weight, int(ignore_index), REDUCTIONS[reduction], label_smoothing, float32_loss,
            None if op_target_values is None else tuple(op_target_values), z_loss, target_b, lam_tensor, lam_value,
            compute_grad,
        )
    ext = (op_target_values, z_loss, target_b, lam_tensor, lam_value)
    if not (compute_grad or target_grad):
        # Inference: nothing to differentiate, so skip autograd.Function's bookkeeping.
        loss, _, _ = _ops.forward(
            input, target, weight, int(ignore_index), REDUCTIONS[reduction], label_smoothing, False, float32_loss,
            target_values=op_target_values, z_loss=z_loss, target_b=target_b, lam=lam_tensor, lam_value=lam_value,
        )
        return loss if divisor is None else loss / divisor
    if inplace:
        _check_inplace(where, input, target)
    loss, _, _ = CrossEntropyFunction.apply(
        input, target, weight, int(ignore_index), REDUCTIONS[reduction], label_smoothing, compute_grad, float32_loss,
        *ext, inplace, divisor
    )
    return loss


def _mixup_lam(where, input, target_a, target_b, lam, positions=None):
    """mixup's lam: a float in [0, 1] (→ lam_value), or a tensor broadcast to one value per position
    (its values are checked by the kernels' driver: on CPU at once, on CUDA without a host sync).
    positions: the positions' shape when the input is not the logits (the fused linear loss)."""
    _check_tensor(where, "target_b", target_b)
    for name, t in (("target_a", target_a), ("target_b", target_b)):
        if t.is_floating_point():
            raise ValueError(
                f"{where}: {name} must hold class indices (int64 or uint8); mixup of probability targets is "
                f"their weighted sum, pass it to smoothce.cross_entropy"
            )
    if target_b.shape != target_a.shape:
        raise ValueError(
            f"{where}: target_b must have target_a's shape {tuple(target_a.shape)}, got {tuple(target_b.shape)}"
        )
    if isinstance(lam, torch.Tensor):
        if positions is None:
            positions = _position_shape(input)
        if not lam.is_floating_point():
            raise TypeError(f"{where}: lam must be a float or a floating tensor, got dtype {lam.dtype}")
        if lam.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{where}: lam is a mixing constant; the loss is not differentiated with respect to it "
                             f"(pass lam.detach())")
        try:
            fits = torch.broadcast_shapes(lam.shape, positions) == positions
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: lam must be a float or a tensor broadcastable to the positions' shape {tuple(positions)} "
                f"(one value per position), got shape {tuple(lam.shape)}"
            )
        if lam.device != input.device:
            raise ValueError(f"{where}: lam must be on the input's device ({input.device}), got {lam.device}")
        return lam.expand(positions), 1.0
    _check_number("lam", lam, numbers.Real, where)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{where}: lam must be in [0, 1], got {lam}")
    return None, float(lam)
