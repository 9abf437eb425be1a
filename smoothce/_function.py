"""The autograd.Function over torch.ops.smoothce.*, and the fake (meta) kernels torch.compile traces."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.smoothce)

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _position_shape(input: torch.Tensor):
    class_dim = 0 if input.dim() == 1 else 1
    return input.shape[:class_dim] + input.shape[class_dim + 1 :]


@torch.library.register_fake("smoothce::forward")
def _forward_fake(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss):
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
    """Forward runs the fused kernel; when the input needs a gradient the kernel writes it too, for an
    upstream gradient of 1, and backward only rescales it in place (a no-op for plain loss.backward())."""

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss):
        loss, lse, grad = torch.ops.smoothce.forward(
            input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss
        )
        return loss, lse, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, _ = inputs
        _, lse, grad = output
        ctx.mark_non_differentiable(lse, grad)
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        ctx.grad_consumed = False
        soft_target_grad = target.is_floating_point() and target.requires_grad
        ctx.save_for_backward(
            grad if compute_grad else None,
            input if soft_target_grad else None,
            lse if soft_target_grad else None,
            weight if soft_target_grad else None,
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse, _grad_grad):
        grad, input, lse, weight = ctx.saved_tensors
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            if grad is None:
                raise RuntimeError(
                    "smoothce.cross_entropy: the input needs a gradient but the forward ran without computing "
                    "it (grad mode was off or input.requires_grad was False when the loss was computed)"
                )
            if ctx.grad_consumed:
                raise RuntimeError(
                    "smoothce.cross_entropy: backward through the same loss a second time (retain_graph=True) "
                    "is not supported: the fused kernel computes the gradient in forward and backward scales "
                    "it in place. Compute the loss again for a second backward."
                )
            ctx.grad_consumed = True
            torch.ops.smoothce.scale_grad_(grad, grad_loss)
            grad_input = grad
        if ctx.needs_input_grad[1]:
            grad_target = _soft_target_grad(grad_loss, input, lse, weight, ctx.reduction, ctx.label_smoothing)
        return grad_input, grad_target, None, None, None, None, None, None


def _soft_target_grad(grad_loss, input, lse, weight, reduction, label_smoothing):
    """∂L/∂P = −s·(1 − ε)·w·log_softmax(x) (SEMANTICS §3), from the saved per-position lse."""
    class_dim = 0 if input.dim() == 1 else 1
    log_prob = input.to(lse.dtype) - lse.unsqueeze(class_dim)
    scale = grad_loss.to(lse.dtype)
    if reduction == REDUCTIONS["none"]:
        scale = scale.unsqueeze(class_dim)
    elif reduction == REDUCTIONS["mean"]:
        scale = scale / (input.numel() // max(input.shape[class_dim], 1) if input.numel() else 0)
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

    # Under autocast the loss is fp32 (as torch's cross_entropy), read straight from the half logits.
    float32_loss = torch.is_autocast_enabled(input.device.type)
    if float32_loss:
        if weight is not None and weight.dtype != input.dtype and input.is_floating_point():
            weight = weight.to(input.dtype)
        if target.is_floating_point() and target.dtype != input.dtype and input.is_floating_point():
            target = target.to(input.dtype)
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _, _ = CrossEntropyFunction.apply(
        input, target, weight, int(ignore_index), REDUCTIONS[reduction], label_smoothing, compute_grad, float32_loss
    )
    return loss
