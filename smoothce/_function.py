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


def _position_shape(input: torch.Tensor):
    class_dim = 0 if input.dim() == 1 else 1
    return input.shape[:class_dim] + input.shape[class_dim + 1 :]


_KERNEL_DEVICES = {"cpu", "meta"} | ({"cuda"} if _C.build_info["cuda"] == "yes" else set())


def _check_kernel_device(input):
    if input.device.type not in _KERNEL_DEVICES:
        raise NotImplementedError(
            f"smoothce.cross_entropy: this build of smoothce has no kernels for {input.device.type} tensors "
            f"(it has: {', '.join(sorted(_KERNEL_DEVICES - {'meta'}))}); see `python -m smoothce`"
        )


def _check_devices(where: str, input, target, weight):
    """Before dispatch: a CUDA or meta tensor among CPU ones would otherwise pick that backend's kernel."""
    for name, tensor in (("target", target), ("weight", weight)):
        if tensor is not None and tensor.device != input.device:
            raise ValueError(f"{where}: {name} must be on the input's device ({input.device}), got {tensor.device}")


@torch.library.register_fake("smoothce::forward")
def _forward_fake(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss,
                  grad_output=None):
    _check_devices("smoothce.forward", input, target, weight)  # this is also the Meta kernel
    positions = _position_shape(input)
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss_dtype = torch.float32 if float32_loss and input.dtype in _HALF_DTYPES else input.dtype
    loss = input.new_empty(positions if reduction == 0 else (), dtype=loss_dtype)
    lse = input.new_empty(positions, dtype=acc_dtype)
    grad = torch.empty_like(input) if compute_grad else input.new_empty((0,))
    return loss, lse, grad


@torch.library.register_fake("smoothce::scale_grad_")
def _scale_grad_fake(grad, grad_output):
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
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss):
        fuse = compute_grad and reduction != REDUCTIONS["none"]
        loss, lse, grad = _ops.forward(input, target, weight, ignore_index, reduction, label_smoothing, fuse, float32_loss)
        ctx.mark_non_differentiable(lse, grad)
        ctx.set_materialize_grads(False)  # no zero-filled N×C gradient for the `grad` output
        ctx.args = (ignore_index, reduction, label_smoothing, float32_loss)
        # Eager: the forward's gradient is handed out once (not a saved tensor: it is consumed in place
        # and may become input.grad); the logits are saved for a second backward and soft-target
        # gradients. Compiled graphs are functional: there the gradient is a saved tensor and backward
        # scales a copy of it.
        compiled_grad = fuse and torch.compiler.is_compiling()
        ctx.fused_grad = grad if fuse and not compiled_grad else None
        ctx.save_for_backward(input, target, weight, lse, grad if compiled_grad else None)
        return loss, lse, grad

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_grad):
        ignore_index, reduction, label_smoothing, float32_loss = ctx.args
        grad_input = grad_target = None
        if grad_loss is None:  # the loss did not reach the graph's outputs: its gradient is zero
            return None, None, None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients for higher orders
            return _differentiable_backward(ctx, grad_loss)
        if ctx.needs_input_grad[0]:
            grad_input, ctx.fused_grad = ctx.fused_grad, None
            if grad_input is not None:
                _ops.scale_grad_(grad_input, grad_loss)
            elif ctx.saved_tensors[4] is not None:  # compiled
                grad_input = _scaled(ctx.saved_tensors[4], grad_loss)
            else:  # reduction 'none', or a second backward (the fused gradient was consumed)
                input, target, weight = ctx.saved_tensors[:3]
                _, _, grad_input = _ops.forward(
                    input, target, weight, ignore_index, reduction, label_smoothing, True, float32_loss, grad_loss
                )
        if ctx.needs_input_grad[1]:
            input, _, weight, lse, _ = ctx.saved_tensors
            grad_target = _soft_target_grad(grad_loss, input, lse, weight, reduction, label_smoothing)
        return grad_input, grad_target, None, None, None, None, None, None


def _differentiable_backward(ctx, grad_loss):
    """Gradients that autograd can differentiate again (second order: Hessian-vector products,
    meta-learning), from the reference implementation's graph; only used under create_graph=True."""
    from . import reference

    ignore_index, reduction, label_smoothing, _ = ctx.args
    input, target, weight = ctx.saved_tensors[:3]
    wanted = [t for t, needed in zip((input, target), ctx.needs_input_grad[:2]) if needed]
    with torch.enable_grad():
        loss = reference.cross_entropy(input, target, weight, ignore_index, _REDUCTION_NAMES[reduction], label_smoothing)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    grad_input = next(grads) if ctx.needs_input_grad[0] else None
    grad_target = next(grads) if ctx.needs_input_grad[1] else None
    return grad_input, grad_target, None, None, None, None, None, None


def _scaled(grad, grad_loss):
    """grad · grad_loss out of place (grad_loss a scalar or one value per position), in grad's dtype."""
    if grad_loss.dim() > 0 and grad.dim() > 1:
        grad_loss = grad_loss.unsqueeze(1)
    return (grad * grad_loss).to(grad.dtype)


def _soft_target_grad(grad_loss, input, lse, weight, reduction, label_smoothing):
    """∂L/∂P = −s·(1 − ε)·w·log_softmax(x) (SEMANTICS §3), from the saved per-position lse."""
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


def _check_number(name: str, value, kind):
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if kind is numbers.Integral else "a float"
        raise TypeError(f"smoothce.cross_entropy: {name} must be {expected}, got {value!r} ({type(value).__name__})")


def cross_entropy_impl(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"smoothce.cross_entropy: input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"smoothce.cross_entropy: target must be a torch.Tensor, got {type(target).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"smoothce.cross_entropy: weight must be a torch.Tensor or None, got {type(weight).__name__}")
    _check_number("ignore_index", ignore_index, numbers.Integral)
    _check_number("label_smoothing", label_smoothing, numbers.Real)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"smoothce.cross_entropy: reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:  # also rejects NaN (torch silently uses 0 for ε < 0: ★)
        raise ValueError(
            f"smoothce.cross_entropy: label_smoothing must be a float in [0, 1], got {label_smoothing}"
        )

    _check_kernel_device(input)
    _check_devices("smoothce.cross_entropy", input, target, weight)
    # Under autocast the loss is fp32 (as torch's cross_entropy), read straight from the half logits;
    # fp32 class weights are used as they are. Only probability targets in another dtype than the
    # logits need both in fp32 (torch's autocast copies the logits to fp32 in every case).
    float32_loss = torch.is_autocast_enabled(input.device.type)
    if float32_loss and target.is_floating_point() and input.is_floating_point() and target.dtype != input.dtype:
        input, target = input.float(), target.float()
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    if not (compute_grad or (target.requires_grad and torch.is_grad_enabled())):
        # Inference: nothing to differentiate, so skip autograd.Function's bookkeeping.
        loss, _, _ = _ops.forward(
            input, target, weight, int(ignore_index), REDUCTIONS[reduction], label_smoothing, False, float32_loss
        )
        return loss
    loss, _, _ = CrossEntropyFunction.apply(
        input, target, weight, int(ignore_index), REDUCTIONS[reduction], label_smoothing, compute_grad, float32_loss
    )
    return loss
