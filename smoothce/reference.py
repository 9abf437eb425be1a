"""Pure-PyTorch label-smoothed cross-entropy: the oracle every smoothce test compares against.

Follows SEMANTICS.md §2-6 literally and is differentiable by autograd (input and probability
target). Accumulates in float32 (float64 for float64 input) and returns the input dtype
(float32 under autocast). Written for clarity, not speed: it validates with host syncs.
"""
import math
import numbers

import torch

__all__ = ["cross_entropy"]

_REDUCTIONS = ("none", "mean", "sum")


def _check_args(input, target, weight, ignore_index, reduction, label_smoothing):
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        seen = input.dtype if isinstance(input, torch.Tensor) else type(input).__name__
        raise TypeError(f"input: expected a floating-point tensor, got {seen}")
    if input.dim() == 0:
        raise ValueError("input: expected a tensor with at least 1 dimension (classes), "
                         "got a 0-d tensor")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
            or math.isnan(label_smoothing) or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing: got {label_smoothing!r}, expected a float in [0, 1]")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a tensor, got {type(target).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")

    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"target: probability targets must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise ValueError(f"ignore_index: got {ignore_index}, but ignore_index >= 0 is not "
                             f"supported for probability (floating) targets; expected a negative value")
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise TypeError(f"target: expected int64 (or uint8) class indices or a floating "
                            f"tensor of probabilities, got {target.dtype}")
        positions = input.shape[1:] if input.dim() == 1 else input.shape[:1] + input.shape[2:]
        if target.shape != positions:
            raise ValueError(f"target: expected shape {tuple(positions)} for input of shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        t = target.long()
        bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
        if bad.any():
            value = t[bad].flatten()[0].item()
            raise IndexError(f"target: value {value} is out of bounds; expected a class index in "
                             f"[0, {num_classes - 1}] or ignore_index={ignore_index}")
    if target.device != input.device:
        raise ValueError(f"target: expected device {input.device}, got {target.device}")

    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise ValueError(f"weight: expected a 1-D tensor of {num_classes} class weights, "
                             f"got shape {tuple(weight.shape)}")
        autocast = input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
            input.device.type)
        if weight.dtype != input.dtype and not autocast:
            raise TypeError(f"weight: expected dtype {input.dtype} (the input's), got {weight.dtype}")
        if weight.device != input.device:
            raise ValueError(f"weight: expected device {input.device}, got {weight.device}")


def class_rows(tensor):
    """(C,) / (N, C, d1..dk) -> (positions, C): one row of classes per position."""
    if tensor.dim() == 1:
        return tensor.unsqueeze(0)
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
    """Same signature and meaning as torch.nn.functional.cross_entropy (see SEMANTICS.md)."""
    _check_args(input, target, weight, ignore_index, reduction, label_smoothing)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        out_dtype = torch.float32

    # -log_softmax is formed as lse - x, one non-negative term per class: autograd then yields
    # p - q with no long sum of upstream gradients (log_softmax's backward loses ~1e-13 at
    # C = 32k in float64), so the float64 result is a ground truth for every kernel. Shifting by
    # the (detached) row max keeps torch's rule that a +inf or NaN logit makes the row NaN.
    rows = class_rows(input.to(acc))
    shifted = rows - rows.detach().amax(dim=-1, keepdim=True)
    neg_lp = torch.logsumexp(shifted, dim=-1, keepdim=True) - shifted
    loss = loss_from_neg_log_probs(neg_lp, input, target, weight, ignore_index, reduction,
                                   float(label_smoothing))
    return loss.to(out_dtype)


def loss_from_neg_log_probs(neg_lp, input, target, weight, ignore_index, reduction, eps):
    """SEMANTICS §2-3 and the reduction, given -log p as (positions, C) rows (in their dtype).

    The tests also call it with |lse| + |x| in place of -log p: the sum of the magnitudes the
    loss adds up, which bounds any implementation's rounding error."""
    acc = neg_lp.dtype
    num_classes = neg_lp.shape[1]
    w = (weight.to(acc) if weight is not None
         else torch.ones(num_classes, dtype=acc, device=neg_lp.device))
    if target.is_floating_point():
        q = (1.0 - eps) * class_rows(target.to(acc)) + eps / num_classes
        loss = (w * q * neg_lp).sum(-1)
        denom = torch.tensor(float(loss.numel()), dtype=acc, device=neg_lp.device)
        positions_shape = input.shape[1:] if input.dim() == 1 else input.shape[:1] + input.shape[2:]
    else:
        t = target.reshape(-1).long()
        valid = t != ignore_index
        t_safe = torch.where(valid, t, torch.zeros_like(t))
        w_t = torch.where(valid, w[t_safe], torch.zeros((), dtype=acc, device=neg_lp.device))
        target_nll = neg_lp.gather(1, t_safe.unsqueeze(1)).squeeze(1)
        # where(), not a product, so ignored rows never form 0 * inf.
        loss = torch.where(valid, w_t * target_nll, torch.zeros_like(target_nll))
        if eps > 0:
            # Only formed when eps > 0: with eps = 0 a -inf logit must not give 0 * inf = NaN.
            smooth = (neg_lp * w).sum(-1)
            smooth = torch.where(valid, smooth, torch.zeros_like(smooth))
            loss = (1.0 - eps) * loss + (eps / num_classes) * smooth
        denom = w_t.sum()
        positions_shape = target.shape

    if reduction == "none":
        return loss.reshape(positions_shape)
    total = loss.sum()
    return total / denom if reduction == "mean" else total
