"""Fused linear + cross-entropy: the autograd.Function over torch.ops.smoothce.linear_forward (the
driver in csrc/linear.cpp) and its fake kernel. The N×V logits never exist: rows go through in chunks
whose logits live in one reused buffer (README "Fused linear + cross-entropy")."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _C, _function
from ._function import (REDUCTIONS, _REDUCTION_NAMES, _HALF_DTYPES, _check_devices, _check_kernel_device,
                        _check_loss_args, _check_number, _check_tensor, _extension_args, _mixup_lam)

_GRADS = ("input", "linear_weight", "linear_bias", "target")


@torch.library.register_fake("smoothce::linear_forward")
def _linear_forward_fake(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
                         label_smoothing, float32_loss, output_mask, chunk_size=0, fp32_grad_weight=True,
                         grad_output=None, target_values=None, z_loss=0.0, target_b=None, lam=None, lam_value=1.0):
    _check_devices("smoothce.linear_cross_entropy", input, target, weight, target_b, linear_weight=linear_weight,
                   linear_bias=linear_bias)
    n = input.shape[0]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss_dtype = torch.float32 if float32_loss and input.dtype in _HALF_DTYPES else input.dtype
    loss = input.new_empty((n,) if reduction == 0 else (), dtype=loss_dtype)
    lse = input.new_empty((n,), dtype=acc)
    empty = input.new_empty((0,))
    grads = (
        input.new_empty(input.shape) if output_mask[0] else empty,
        linear_weight.new_empty(linear_weight.shape) if output_mask[1] else input.new_empty((0,)),
        linear_bias.new_empty(linear_bias.shape) if output_mask[2] else input.new_empty((0,)),
        target.new_empty(target.shape) if output_mask[3] else input.new_empty((0,)),
    )
    return (loss, lse) + grads


class LinearCrossEntropyFunction(torch.autograd.Function):
    """For mean and sum the op computes the gradients in forward (each chunk's dlogits are consumed by
    the gradient GEMMs while they are in the buffer) and backward only scales them by the upstream
    gradient (nothing to do for plain loss.backward()). Reduction 'none', and a second backward through a
    retained graph, recompute chunk by chunk with the upstream gradient applied inside the kernel."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                float32_loss, chunk_size, fp32_grad_weight, target_values, z_loss, target_b, lam, lam_value):
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2] and linear_bias is not None, needs[3] and target.is_floating_point()]
        ctx.mask = mask
        ctx.ext = dict(target_values=target_values, z_loss=z_loss, target_b=target_b, lam=lam, lam_value=lam_value)
        ctx.args = (ignore_index, reduction, label_smoothing, float32_loss, chunk_size, fp32_grad_weight)
        fuse = reduction != REDUCTIONS["none"]
        outputs = _function._ops.linear_forward(
            input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, float32_loss,
            mask if fuse else [False] * 4, chunk_size, fp32_grad_weight, **ctx.ext)
        loss, grads = outputs[0], outputs[2:]
        # Eager: the fused gradients are handed out once (they may become .grad); a second backward
        # recomputes. Compiled graphs are functional: there they are saved tensors, scaled out of place.
        compiled = fuse and torch.compiler.is_compiling()
        ctx.fused = grads if fuse and not compiled else None
        ctx.compiled = compiled
        saved = (input, linear_weight, linear_bias, target, weight, target_b, lam)
        ctx.save_for_backward(*(saved + (grads if compiled else ())))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * _APPLY_ARGS
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(ctx, grad_loss)
        mask = ctx.mask
        saved = ctx.saved_tensors
        if ctx.fused is not None:
            grads, ctx.fused = ctx.fused, None
            for g, wanted in zip(grads, mask):
                if wanted:
                    _function._ops.scale_grad_(g, grad_loss)
        elif ctx.compiled:
            grads = tuple(g * grad_loss.to(g.dtype) if wanted else None for g, wanted in zip(saved[7:], mask))
        else:
            input, linear_weight, linear_bias, target, weight, target_b, lam = saved[:7]
            ext = dict(ctx.ext, target_b=target_b, lam=lam)
            ignore_index, reduction, label_smoothing, float32_loss, chunk_size, fp32_grad_weight = ctx.args
            grads = _function._ops.linear_forward(
                input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                float32_loss, mask, chunk_size, fp32_grad_weight, grad_loss, **ext)[2:]
        grads = tuple(g if wanted else None for g, wanted in zip(grads, mask))
        return grads + (None,) * (_APPLY_ARGS - 4)


_APPLY_ARGS = 16  # LinearCrossEntropyFunction.forward's arguments after ctx


def _differentiable_backward(ctx, grad_loss):
    """Gradients autograd can differentiate again, from the reference loss on F.linear's logits (full
    N×V logits: only under create_graph=True)."""
    from . import reference

    input, linear_weight, linear_bias, target, weight, target_b, lam = ctx.saved_tensors[:7]
    ignore_index, reduction, label_smoothing = ctx.args[:3]
    ext = dict(ctx.ext, target_b=target_b, lam=lam)
    inputs = (input, linear_weight, linear_bias, target)
    wanted = [t for t, needed in zip(inputs, ctx.mask) if needed]
    with torch.enable_grad():
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        loss = reference.loss_with_options(logits, target, weight, ignore_index, _REDUCTION_NAMES[reduction],
                                           label_smoothing, **ext)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    out = tuple(next(grads) if needed else None for needed in ctx.mask)
    return out + (None,) * (_APPLY_ARGS - 4)


def chunk_rows(n: int, h: int, v: int, dtype: torch.dtype, *, device: str = "cpu", chunk_size: Optional[int] = None,
               fp32_grad_weight: bool = True, needs_weight_grad: bool = True) -> int:
    """Rows per chunk of linear_cross_entropy on (n, h) input and (v, h) weight (csrc/linear.cpp's rule):
    chunk_size when given, else ⌈N·H/V⌉ rows (a chunk of logits about the input's size), at least 128, at
    most 128 MiB of logits, evened out over the chunks; on CPU, half weights whose gradient accumulates in
    fp32 take as few chunks as 128 MiB each allows."""
    fewest = device == "cpu" and dtype in _HALF_DTYPES and fp32_grad_weight and needs_weight_grad
    return _C.linear_chunk_rows(n, h, v, dtype.itemsize, int(chunk_size or 0), fewest)


def linear_cross_entropy_impl(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                              ignore_index=-100, label_smoothing=0.0, smoothing="uniform", target_values=None,
                              z_loss=0.0, chunk_size=None, fp32_grad_weight=True, mixup=False, target_b=None,
                              lam=None, where="smoothce.linear_cross_entropy"):
    _check_tensor(where, "input", input)
    _check_tensor(where, "linear_weight", linear_weight)
    _check_tensor(where, "target_a" if mixup else "target", target)
    _check_tensor(where, "linear_bias", linear_bias, optional=True)
    _check_tensor(where, "weight", weight, optional=True)
    label_smoothing = _check_loss_args(where, ignore_index, reduction, label_smoothing)
    if chunk_size is not None:
        _check_number("chunk_size", chunk_size, numbers.Integral, where)
        if chunk_size < 1:
            raise ValueError(f"{where}: chunk_size must be a positive number of rows or None (automatic), "
                             f"got {chunk_size}")
    if not isinstance(fp32_grad_weight, bool):
        raise TypeError(f"{where}: fp32_grad_weight must be a bool, got {fp32_grad_weight!r}")
    if input.dim() < 1:
        raise ValueError(f"{where}: input must have shape (..., H), got a 0-d tensor")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{where}: linear_weight must have shape (V, H) with H = {input.shape[-1]} (the input's last "
                         f"dimension), got shape {tuple(linear_weight.shape)}")
    num_classes = linear_weight.shape[0]
    leading = input.shape[:-1]
    soft = target.is_floating_point()
    expected = tuple(leading) + ((num_classes,) if soft else ())
    if tuple(target.shape) != expected:
        kind = "a probability (floating) target" if soft else "a target of class indices"
        raise ValueError(f"{where}: {kind} must have shape {expected} (the input's leading dimensions"
                         f"{' and V' if soft else ''}), got {tuple(target.shape)}")
    label_smoothing, op_target_values = _extension_args(where, input, target, label_smoothing, smoothing,
                                                        target_values, z_loss, False, num_classes=num_classes)
    z_loss = float(z_loss)
    lam_tensor, lam_value = (_mixup_lam(where, input, target, target_b, lam, positions=leading) if mixup
                             else (None, 1.0))
    _check_kernel_device(input)
    named_target = {"target_a": target} if mixup else {}  # (mixup's first target goes by its own name)
    _check_devices(where, input, None if mixup else target, weight, target_b, linear_weight=linear_weight,
                   linear_bias=linear_bias, **named_target)

    # Under autocast the linear layer runs in the autocast dtype (as F.linear would) and the loss is fp32.
    float32_loss = torch.is_autocast_enabled(input.device.type)
    if float32_loss:
        dtype = torch.get_autocast_dtype(input.device.type)

        def cast(t):
            return t.to(dtype) if t is not None and t.dtype in (torch.float32,) + _HALF_DTYPES else t

        input, linear_weight, linear_bias = cast(input), cast(linear_weight), cast(linear_bias)
        if soft and target.dtype not in (input.dtype, torch.float32):
            target = target.float()  # (an fp32 target is read with the chunks' logits in fp32, as autocast does)

    n = leading.numel()
    x = input.reshape(n, input.shape[-1])
    t = target.reshape((n, num_classes) if soft else (n,))
    t_b = target_b.reshape(n) if mixup else None
    lam_flat = lam_tensor.reshape(n) if lam_tensor is not None else None
    ext = (op_target_values, z_loss, t_b, lam_flat, lam_value)
    args = (int(ignore_index), REDUCTIONS[reduction], label_smoothing, float32_loss, int(chunk_size or 0),
            fp32_grad_weight)
    grad_needed = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, linear_weight, linear_bias, t if soft else None))
    if grad_needed:
        loss = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, t, weight, *args, *ext)
    else:
        loss = _function._ops.linear_forward(x, linear_weight, linear_bias, t, weight, args[0], args[1], args[2],
                                             args[3], [False] * 4, args[4], args[5], target_values=ext[0],
                                             z_loss=ext[1], target_b=ext[2], lam=ext[3], lam_value=ext[4])[0]
    return loss.reshape(leading) if reduction == "none" else loss
