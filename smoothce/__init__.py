"""smoothce: fused label-smoothed softmax cross-entropy for PyTorch.

Swap ``torch.nn.functional.cross_entropy`` for ``smoothce.cross_entropy`` (or ``nn.CrossEntropyLoss``
for ``smoothce.CrossEntropyLoss``): same arguments, same numbers, one fused kernel for loss and gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _C, _function
from ._function import cross_entropy_impl
from ._linear import linear_cross_entropy_impl
from ._mixup_target import MixupTarget
from ._version import __version__

__all__ = ["cross_entropy", "CrossEntropyLoss", "mixup_cross_entropy", "MixupTarget", "linear_cross_entropy",
           "linear_mixup_cross_entropy", "LinearCrossEntropyLoss", "build_info", "empty_cache", "__version__"]

# _C.common_cross_entropy runs the common call of cross_entropy and CrossEntropyLoss (plain tensors,
# the variants' defaults: csrc/autograd.cpp) whole, without cross_entropy_impl's Python
# checks, and returns None for any other call, which goes on to cross_entropy_impl. Under
# torch.compile (is_compiling) every call goes there, which Dynamo traces.
_common = _C.common_cross_entropy
_is_compiling = torch.compiler.is_compiling

_VARIANTS_DOC = """
    Keyword-only variants (docs/semantics.md §3; README "Label-smoothing variants"):
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
    if not _is_compiling():  # the common call in one C++ call (None: another case, which goes on below)
        loss = _common(_function._ops.name, input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
                       target_values, z_loss, inplace_backward)
        if loss is not None:
            return loss
    return cross_entropy_impl(input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
                              target_values, z_loss, inplace_backward)


cross_entropy.__doc__ += _VARIANTS_DOC


def mixup_cross_entropy(
    input: torch.Tensor,
    target_a: Union[torch.Tensor, MixupTarget],
    target_b: Optional[torch.Tensor] = None,
    lam: Union[float, torch.Tensor, None] = None,
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
    A ``smoothce.MixupTarget`` in place of target_a carries target_a, target_b, lam and its label
    smoothing (target_b and lam are then not passed).
    """
    where = "smoothce.mixup_cross_entropy"
    if isinstance(target_a, MixupTarget):
        if target_b is not None or lam is not None:
            raise TypeError(f"{where}: given a MixupTarget, target_b and lam come from it; do not pass them too")
        target_a, target_b, lam, label_smoothing = target_a.unpack(where, input, label_smoothing)
    elif target_b is None or lam is None:
        raise TypeError(f"{where}: target_b and lam are required with index tensors as target_a (or pass a "
                        f"smoothce.MixupTarget as target_a)")
    return cross_entropy_impl(input, target_a, weight, ignore_index, reduction, label_smoothing, smoothing,
                              target_values, z_loss, inplace_backward, mixup=True, target_b=target_b, lam=lam,
                              where=where)


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
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             smoothing=self.smoothing, target_values=self.target_values, z_loss=self.z_loss,
                             inplace_backward=self.inplace_backward)

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


_LINEAR_DOC = """
    Fused linear layer (README "Fused linear + cross-entropy"): the loss of logits = input·linear_weightᵀ
    + linear_bias without ever holding the N×V logits. Rows go through in chunks; each chunk's logits
    are written into one reused buffer and turned into their gradient in place, which the gradient
    GEMMs consume at once. Extra memory: the chunk's buffer and O(N + V), plus V×H fp32 for the
    gradient of a half-precision linear_weight.
    chunk_size: rows per chunk (default None: ⌈N·H/V⌉ rows, a chunk of logits about the input's size,
        at least 128 and at most 128 MiB of logits, evened out; smoothce._linear.chunk_rows tells it).
    fp32_grad_weight: accumulate the gradients of a float16/bfloat16 linear_weight and linear_bias in
        fp32 over the chunks (default True; False accumulates in their own dtype)."""


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    fp32_grad_weight: bool = True,
) -> torch.Tensor:
    """``smoothce.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``, fused, with the
    arguments of ``torch.nn.functional.linear_cross_entropy``.

    input: (..., H), any leading dimensions. linear_weight: (V, H) (e.g. a tied embedding, any strides).
    linear_bias: (V,) or None. target: class indices shaped like input's leading dimensions, or class
    probabilities (..., V). weight: per-class weights (V,). Reduction 'none' returns one loss per row,
    shaped like the leading dimensions. Other arguments as ``cross_entropy``.
    """
    return linear_cross_entropy_impl(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                     reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                     smoothing=smoothing, target_values=target_values, z_loss=z_loss,
                                     chunk_size=chunk_size, fp32_grad_weight=fp32_grad_weight)


linear_cross_entropy.__doc__ += _VARIANTS_DOC.split("    inplace_backward")[0] + _LINEAR_DOC


def linear_mixup_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: Union[float, torch.Tensor],
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    fp32_grad_weight: bool = True,
) -> torch.Tensor:
    """``mixup_cross_entropy`` of ``F.linear(input, linear_weight, linear_bias)``, fused as
    ``linear_cross_entropy``: q = lam·q(target_a) + (1 − lam)·q(target_b); lam a float in [0, 1] or a
    tensor broadcastable to input's leading dimensions."""
    return linear_cross_entropy_impl(input, linear_weight, target_a, linear_bias=linear_bias, weight=weight,
                                     reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                     smoothing=smoothing, target_values=target_values, z_loss=z_loss,
                                     chunk_size=chunk_size, fp32_grad_weight=fp32_grad_weight, mixup=True,
                                     target_b=target_b, lam=lam, where="smoothce.linear_mixup_cross_entropy")


class LinearCrossEntropyLoss(torch.nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` twin: owns its ``linear`` (``nn.Linear(in_features,
    num_classes, bias=bias)``) and computes ``linear_cross_entropy(input, linear.weight, target, ...)``
    fused; class weights are a buffer. Keyword arguments as ``linear_cross_entropy``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        weight: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        smoothing: str = "uniform",
        target_values: Optional[Tuple[float, float]] = None,
        z_loss: float = 0.0,
        chunk_size: Optional[int] = None,
        fp32_grad_weight: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.smoothing = smoothing
        self.target_values = None if target_values is None else tuple(target_values)
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.fp32_grad_weight = fp32_grad_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy_impl(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            smoothing=self.smoothing, target_values=self.target_values, z_loss=self.z_loss,
            chunk_size=self.chunk_size, fp32_grad_weight=self.fp32_grad_weight)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, num_classes={self.num_classes}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")
        for name, default in (("smoothing", "uniform"), ("target_values", None), ("z_loss", 0.0),
                              ("chunk_size", None), ("fp32_grad_weight", True)):
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value!r}"
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
