"""Pure-PyTorch label-smoothed cross-entropy: the oracle every smoothce test compares against.

Follows docs/semantics.md §1-§3, §5 and §6 literally and is differentiable by autograd (input and
probability target): label smoothing ("uniform" or "others"), explicit target values, z-loss and
mixup pairs. Accumulates in float32 (float64 for float64 input) and returns the input dtype
(float32 under autocast). Written for clarity, not speed: it validates with host syncs.
"""
import math
import numbers

import torch

__all__ = ["cross_entropy", "mixup_cross_entropy", "target_values_of"]

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


def target_values_of(num_classes, label_smoothing, smoothing="uniform", target_values=None):
    """(on, off) of an index target (docs/semantics.md §3.1), or None for uniform smoothing by ε."""
    if target_values is not None:
        return float(target_values[0]), float(target_values[1])
    if smoothing == "others":
        eps = float(label_smoothing)
        return 1.0 - eps, (eps / (num_classes - 1) if num_classes > 1 else 0.0)
    return None


def _check_extensions(input, target, label_smoothing, smoothing, target_values, z_loss):
    if smoothing not in ("uniform", "others"):
        raise ValueError(f"smoothing: expected 'uniform' or 'others', got {smoothing!r}")
    if target_values is not None:
        if (not isinstance(target_values, (tuple, list)) or len(target_values) != 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in target_values)
                or not all(math.isfinite(v) and v >= 0 for v in target_values)):
            raise ValueError(f"target_values: expected a pair (on, off) of finite non-negative floats, "
                             f"got {target_values!r}")
        if label_smoothing != 0 or smoothing != "uniform":
            raise ValueError("target_values: they replace label_smoothing and smoothing; pass only one")
    if (smoothing == "others" or target_values is not None) and target.is_floating_point():
        raise ValueError("smoothing='others' and target_values apply to class-index targets only, "
                         "got a probability (floating) target")
    if (isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real) or not math.isfinite(z_loss)
            or z_loss < 0):
        raise ValueError(f"z_loss: expected a finite float >= 0, got {z_loss!r}")


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, smoothing="uniform", target_values=None, z_loss=0.0,
                  inplace_backward=False):
    """Same signature and meaning as torch.nn.functional.cross_entropy (see docs/semantics.md §1), plus
    the keyword-only variants of docs/semantics.md §3. inplace_backward is accepted and ignored
    (always out of place)."""
    _check_args(input, target, weight, ignore_index, reduction, label_smoothing)
    _check_extensions(input, target, label_smoothing, smoothing, target_values, z_loss)
    return _loss(input, target, None, None, weight, ignore_index, reduction, label_smoothing,
                 smoothing, target_values, z_loss)


def mixup_cross_entropy(input, target_a, target_b, lam, weight=None, ignore_index=-100,
                        reduction="mean", label_smoothing=0.0, *, smoothing="uniform",
                        target_values=None, z_loss=0.0, inplace_backward=False):
    """Cross-entropy against q = lam·q(target_a) + (1 − lam)·q(target_b) (docs/semantics.md §3.2): lam
    a float or a tensor broadcastable to the positions; mean divides by
    Σ lam·w[a]·valid_a + (1 − lam)·w[b]·valid_b."""
    for name, t in (("target_a", target_a), ("target_b", target_b)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point():
            raise ValueError(f"{name}: mixup targets must be class-index tensors")
    _check_args(input, target_a, weight, ignore_index, reduction, label_smoothing)
    _check_args(input, target_b, weight, ignore_index, reduction, label_smoothing)
    _check_extensions(input, target_a, label_smoothing, smoothing, target_values, z_loss)
    positions = target_a.shape
    if isinstance(lam, torch.Tensor):
        try:
            ok = torch.broadcast_shapes(lam.shape, positions) == positions
        except RuntimeError:
            ok = False
        if not ok or not lam.is_floating_point():
            raise ValueError(f"lam: expected a float or a floating tensor broadcastable to {tuple(positions)}, "
                             f"got {lam.dtype} of shape {tuple(lam.shape)}")
        if not bool(((lam >= 0) & (lam <= 1)).all()):
            raise ValueError("lam: values must be in [0, 1]")
    elif isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a float in [0, 1] or a tensor, got {lam!r}")
    return _loss(input, target_a, target_b, lam, weight, ignore_index, reduction, label_smoothing,
                 smoothing, target_values, z_loss)


def loss_with_options(input, target, weight, ignore_index, reduction, label_smoothing, *, target_values=None,
                      z_loss=0.0, target_b=None, lam=None, lam_value=1.0):
    """The loss in the terms of torch.ops.smoothce.forward's extension arguments (target_values already
    resolved to (on, off); lam a per-position tensor or lam_value): the differentiable backward
    (create_graph=True) of smoothce's autograd.Function uses it."""
    if target_b is not None and lam is None:
        lam = lam_value
    return _loss(input, target, target_b, lam, weight, ignore_index, reduction, label_smoothing, "uniform",
                 target_values, z_loss)


def _loss(input, target, target_b, lam, weight, ignore_index, reduction, label_smoothing, smoothing,
          target_values, z_loss):
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        out_dtype = torch.float32

    # -log_softmax is formed as lse - x, one non-negative term per class: autograd then yields
    # p - q with no long sum of upstream gradients (log_softmax's backward loses ~1e-13 at
    # C = 32k in float64), so the float64 result is a ground truth for every kernel. Shifting by
    # the (detached) row max keeps torch's rule that a +inf or NaN logit makes the row NaN.
    rows = class_rows(input.to(acc))
    row_max = rows.detach().amax(dim=-1, keepdim=True)
    shifted = rows - row_max
    log_sum = torch.logsumexp(shifted, dim=-1, keepdim=True)
    neg_lp = log_sum - shifted
    lse = (log_sum + row_max).squeeze(-1) if z_loss else None
    num_classes = rows.shape[1]
    loss = loss_from_neg_log_probs(neg_lp, input, target, weight, ignore_index, reduction,
                                   float(label_smoothing),
                                   target_values=target_values_of(num_classes, label_smoothing, smoothing,
                                                                  target_values),
                                   z_loss=float(z_loss), lse=lse, target_b=target_b, lam=lam)
    return loss.to(out_dtype)


def loss_from_neg_log_probs(neg_lp, input, target, weight, ignore_index, reduction, eps, *,
                            target_values=None, z_loss=0.0, lse=None, target_b=None, lam=None):
    """docs/semantics.md §2.1-§2.5 and §3 (formulas, variants, reduction), given -log p as
    (positions, C) rows (in their dtype) and, for the z-loss, lse per position.

    The tests also call it with |lse| + |x| in place of -log p: the sum of the magnitudes the
    loss adds up, which bounds any implementation's rounding error."""
    acc = neg_lp.dtype
    num_classes = neg_lp.shape[1]
    device = neg_lp.device
    zero = torch.zeros((), dtype=acc, device=device)
    w = (weight.to(acc) if weight is not None
         else torch.ones(num_classes, dtype=acc, device=device))
    if target.is_floating_point():
        q = (1.0 - eps) * class_rows(target.to(acc)) + eps / num_classes
        loss = (w * q * neg_lp).sum(-1)
        mass = torch.ones_like(loss)
        denom = torch.tensor(float(loss.numel()), dtype=acc, device=device)
        positions_shape = input.shape[1:] if input.dim() == 1 else input.shape[:1] + input.shape[2:]
    else:
        on, off = target_values if target_values is not None else (
            1.0 - eps + eps / num_classes, eps / num_classes)
        # q = Σ_k share_k·[(on − off)·onehot(t_k) + off] over the position's targets (one, or the
        # mixup pair with shares lam and 1 − lam); an ignored target has share 0.
        if lam is None:
            lam = 1.0
        lam = torch.as_tensor(lam, dtype=acc, device=device).expand(target.shape).reshape(-1)
        pairs = [(target, lam)] + ([(target_b, 1.0 - lam)] if target_b is not None else [])
        smooth = None
        loss = torch.zeros(neg_lp.shape[0], dtype=acc, device=device)
        mass = torch.zeros_like(loss)
        denom = zero
        for t, share in pairs:
            t = t.reshape(-1).long()
            valid = t != ignore_index
            t_safe = torch.where(valid, t, torch.zeros_like(t))
            k = torch.where(valid, share, zero)
            w_t = torch.where(valid, w[t_safe], zero)
            target_nll = neg_lp.gather(1, t_safe.unsqueeze(1)).squeeze(1)
            # where(), not a product, so ignored (or zero-share) targets never form 0 * inf.
            loss = loss + torch.where(k * w_t != 0, (on - off) * k * w_t * target_nll, zero)
            mass = mass + k
            denom = denom + (k * w_t).sum()
        if off != 0:
            # Only formed when off > 0: with off = 0 a -inf logit must not give 0 * inf = NaN.
            smooth = (neg_lp * w).sum(-1)
            loss = loss + torch.where(mass != 0, off * mass * smooth, zero)
        positions_shape = target.shape
    if z_loss:
        loss = loss + torch.where(mass != 0, z_loss * mass * lse.reshape(-1) ** 2, zero)

    if reduction == "none":
        return loss.reshape(positions_shape)
    total = loss.sum()
    return total / denom if reduction == "mean" else total
