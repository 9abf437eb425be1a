"""smoothce: fused label-smoothed softmax cross-entropy for PyTorch.

Swap ``torch.nn.functional.cross_entropy`` for ``smoothce.cross_entropy`` (or ``nn.CrossEntropyLoss``
for ``smoothce.CrossEntropyLoss``): same arguments, same numbers, one fused kernel for loss and gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._function import cross_entropy_impl
from ._version import __version__

__all__ = ["cross_entropy", "CrossEntropyLoss", "build_info", "empty_cache", "__version__"]


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax cross-entropy with label smoothing, as ``torch.nn.functional.cross_entropy``.

    input: logits (C,), (N, C) or (N, C, d1, ..., dk), any strides (channels_last included).
    target: class indices (int64 or uint8) shaped like input without dim 1, or class probabilities
        shaped like input. weight: per-class weights (C,). ignore_index: index targets equal to it
        contribute nothing. reduction: 'none' | 'mean' | 'sum'. label_smoothing: ε in [0, 1].
    """
    return cross_entropy_impl(input, target, weight, ignore_index, reduction, label_smoothing)


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` twin backed by the fused kernels (weight is a buffer, as in torch)."""

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy_impl(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


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
