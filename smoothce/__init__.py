"""smoothce: fused label-smoothed softmax cross-entropy for PyTorch.

Swap ``torch.nn.functional.cross_entropy`` for ``smoothce.cross_entropy`` (or ``nn.CrossEntropyLoss``
for ``smoothce.CrossEntropyLoss``): same arguments, same numbers, one fused kernel for loss and gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._function import cross_entropy_impl
from ._version import __version__

__all__ = ["cross_entropy", "CrossEntropyLoss", "mixup_cross_entropy", "build_info", "empty_cache", "__version__"]

_VARIANTS_DOC = """
    Keyword-only variants (SEMANTICS §7; README "Label-smoothing variants"):
    smoothing: "uniform" (default: ε spread over all C classes, as torch) or "others" (ε spread over
        the C − 1 other classes: q = 1 − ε at the target, ε/(C − 1) elsewhere). Index targets only.
    target_values: (on, off): q = on at the target class, off elsewhere (timm's on/off values,
        LabelSmoothSoftmaxCE's lb_pos/lb_neg); replaces label_smoothing. Index targets only.
    z_loss: α ≥ 0 adds α·lse² per position (PaLM's z-loss), reduced like the loss.
    inplace_backward: write the gradient over the logits in backward, so forward + backward allocate
        no N×C tensor (2 reads + 1 write of the logits instead of 1 read + 1 write). After backward
        the logits hold their gradient; autograd raises if anything else in the graph saved them.
        Refused for a leaf tensor that requires grad (or a view of one)."""


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Softmax cross-entropy with label smoothing, as ``torch.nn.functional.cross_entropy``.

    input: logits (C,), (N, C) or (N, C, d1, ..., dk), any strides (channels_last included).
    target: class indices (int64 or uint8) shaped like input without dim 1, or class probabilities
        shaped like input. weight: per-class weights (C,). ignore_index: index targets equal to it
        contribute nothing. reduction: 'none' | 'mean' | 'sum'. label_smoothing: ε in [0, 1].
    """
    return cross_entropy_impl(input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
                              target_values, z_loss, inplace_backward)


cross_entropy.__doc__ += _VARIANTS_DOC


def mixup_cross_entropy(
    input: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: Union[float, torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy against the mixup/cutmix target q = lam·q(target_a) + (1 − lam)·q(target_b),
    with q(t) the (smoothed) one-hot target of class indices t: timm's ``mixup_target`` + soft-target
    cross-entropy, without building the dense N×C target.

    target_a, target_b: class indices shaped like input without dim 1 (e.g. target and target.flip(0)).
    lam: a float in [0, 1], or a tensor broadcastable to the positions' shape (per sample: (N,) for
        (N, C); per pixel for cutmix on segmentation maps: (N, H, W), or (N, 1, 1) per sample), values
        in [0, 1]; it is a constant (not differentiated).
    An ignored target (ignore_index) contributes nothing; mean divides by
    Σ lam·w[a]·valid_a + (1 − lam)·w[b]·valid_b. Other arguments as ``cross_entropy``.
    """
    return cross_entropy_impl(input, target_a, weight, ignore_index, reduction, label_smoothing, smoothing,
                              target_values, z_loss, inplace_backward, mixup=True, target_b=target_b, lam=lam,
                              where="smoothce.mixup_cross_entropy")


mixup_cross_entropy.__doc__ += _VARIANTS_DOC


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` twin backed by the fused kernels (weight is a buffer, as in torch),
    with the keyword-only variants of ``smoothce.cross_entropy``."""

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        smoothing: str = "uniform",
        target_values: Optional[Tuple[float, float]] = None,
        z_loss: float = 0.0,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.smoothing = smoothing
        self.target_values = None if target_values is None else tuple(target_values)
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy_impl(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                                  self.smoothing, self.target_values, self.z_loss, self.inplace_backward)

    def extra_repr(self) -> str:
        text = f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
        if self.smoothing != "uniform":
            text += f", smoothing={self.smoothing!r}"
        if self.target_values is not None:
            text += f", target_values={self.target_values}"
        if self.z_loss:
            text += f", z_loss={self.z_loss}"
        if self.inplace_backward:
            text += ", inplace_backward=True"
        return text


def build_info() -> dict:
    """What the installed library was built with: version, CPU capability, CUDA (and architectures)."""
    from . import _C

    return dict(_C.build_info)


def empty_cache() -> None:
    """Release the gradient buffer the CPU kernel keeps for reuse across training steps.

    Large CPU allocations come back from the OS as fresh pages whose first touch costs more than the
    kernel itself, so the last gradient buffer is kept and reused once nothing else holds it.
    Set SMOOTHCE_CPU_GRAD_CACHE=0 before the first call to disable the cache altogether.
    """
    from . import _C

    _C.empty_cache()
