"""timm, fused: swap three imports of a timm training script for these.

    from smoothce.integrations.timm import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, Mixup

- ``LabelSmoothingCrossEntropy(smoothing)`` and ``SoftTargetCrossEntropy()``: timm's constructors, call
  signatures and values (they subclass timm's classes), computed by smoothce's fused kernels.
- ``Mixup(...)`` and ``FastCollateMixup(...)``: timm's classes (same arguments, same random draws, same
  mixed images) whose target is a ``smoothce.MixupTarget`` — the two label tensors and lam — instead of
  the dense N×C ``mixup_target``. ``SoftTargetCrossEntropy`` and ``smoothce.mixup_cross_entropy`` take
  it; ``target.dense()`` builds timm's dense target for a loss that needs one. Multi-label mixup
  (``multi_label=True``) is timm's own path and returns timm's dense target.
"""
from __future__ import annotations

import torch

from .. import _function
from .._mixup_target import MixupTarget
from ._common import classes_second, import_library

import_library("timm", "timm")
from timm import loss as _timm_loss  # noqa: E402
from timm.data import mixup as _timm_mixup  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

__all__ = ["LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy", "Mixup", "FastCollateMixup", "MixupTarget"]

# timm's losses have no ignore_index: every label must be a class, as there (an out-of-range label is
# an error rather than a silently ignored position).
_NO_IGNORE = -(2**63)


def _loss(where, *args, **kwargs):
    """smoothce's loss for a timm adapter; an out-of-range label's error does not mention the sentinel."""
    try:
        return _function.cross_entropy_impl(*args, where=where, **kwargs)
    except IndexError as error:
        message = str(error).replace(f" or ignore_index ({_NO_IGNORE})", " (timm's losses have no ignore_index)")
        raise IndexError(message.replace("smoothce.cross_entropy:", where + ":", 1)) from None


class LabelSmoothingCrossEntropy(_timm_loss.LabelSmoothingCrossEntropy):
    """timm's ``LabelSmoothingCrossEntropy(smoothing)``: (1 − ε)·nll + ε·mean_c(−log p), mean over the
    rows; logits (..., C) with the classes last, labels (...)."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        where = "smoothce.integrations.timm.LabelSmoothingCrossEntropy"
        if isinstance(target, MixupTarget):
            raise TypeError(f"{where}: got a MixupTarget; mixup targets go to SoftTargetCrossEntropy (as in timm, "
                            f"whose Mixup output needs SoftTargetCrossEntropy)")
        return _loss(where, classes_second(x), target, None, _NO_IGNORE, "mean", self.smoothing)


class SoftTargetCrossEntropy(_timm_loss.SoftTargetCrossEntropy):
    """timm's ``SoftTargetCrossEntropy()``: mean over the rows of −Σ_c target·log p. target: a dense
    (..., C) target shaped like the logits, or the ``MixupTarget`` of this module's ``Mixup`` (no dense
    target is built then)."""

    def forward(self, x: torch.Tensor, target) -> torch.Tensor:
        where = "smoothce.integrations.timm.SoftTargetCrossEntropy"
        if isinstance(target, MixupTarget):
            if x.dim() != 2:
                raise ValueError(f"{where}: a MixupTarget needs logits (N, C), got shape {tuple(x.shape)}")
            target_a, target_b, lam, smoothing = target.unpack(where, x, 0.0)
            # timm's dense target is fp32, so its loss is fp32 for half logits too.
            return _loss(where, x, target_a, None, _NO_IGNORE, "mean", smoothing, mixup=True, target_b=target_b,
                         lam=lam, float32_loss=True)
        if not isinstance(target, torch.Tensor) or not target.is_floating_point():
            raise TypeError(f"{where}: target must be a dense floating target shaped like the logits or a "
                            f"MixupTarget, got {type(target).__name__}"
                            + (f" of dtype {target.dtype}" if isinstance(target, torch.Tensor) else ""))
        if target.shape != x.shape:
            raise ValueError(f"{where}: a dense target must have the logits' shape {tuple(x.shape)}, got "
                             f"{tuple(target.shape)}")
        # timm's −target·log_softmax(x) promotes the two dtypes (e.g. fp32 mixup targets, bf16 logits).
        common = torch.promote_types(x.dtype, target.dtype)
        x, target = x.to(common), target.to(common)
        return _loss(where, classes_second(x), classes_second(target), None, _NO_IGNORE, "mean", 0.0)


def _light_target(mixup, target: torch.Tensor, lam, count: int) -> MixupTarget:
    """The MixupTarget of timm's mixup_target(target, num_classes, lam, label_smoothing)[:count]: row i
    mixes label i with label N − 1 − i (timm's flip(0)) by lam[i]."""
    target = target.reshape(-1).long()
    if isinstance(lam, torch.Tensor):
        lam = lam.reshape(-1)[:count]
    else:
        lam = float(lam)
    return MixupTarget(target[:count], target.flip(0)[:count], lam, mixup.label_smoothing, mixup.num_classes)


class Mixup(_timm_mixup.Mixup):
    """timm's ``Mixup`` (same constructor, modes batch / pair / elem, mixup, cutmix, switching,
    correct_lam): mixes the images in place as timm does and returns ``(x, MixupTarget)``."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if getattr(self, "multi_label", False):
            return super().__call__(x, target)
        assert len(x) % 2 == 0, 'Batch size should be even when using this'
        if self.mode == 'elem':
            lam = self._mix_elem(x)
        elif self.mode == 'pair':
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)
        return x, _light_target(self, target, lam, len(x))


class FastCollateMixup(_timm_mixup.FastCollateMixup):
    """timm's ``FastCollateMixup`` (the collate function of timm's prefetching loader; modes batch /
    pair / elem / half): returns ``(uint8 images, MixupTarget)``; the target moves with ``.to`` as a
    tensor would."""

    def __call__(self, batch, _=None):
        if getattr(self, "multi_label", False):
            return super().__call__(batch, _)
        batch_size = len(batch)
        assert batch_size % 2 == 0, 'Batch size should be even when using this'
        half = 'half' in self.mode
        if half:
            batch_size //= 2
        output = torch.zeros((batch_size, *batch[0][0].shape), dtype=torch.uint8)
        if self.mode == 'elem' or self.mode == 'half':
            lam = self._mix_elem_collate(output, batch, half=half)
        elif self.mode == 'pair':
            lam = self._mix_pair_collate(output, batch)
        else:
            lam = self._mix_batch_collate(output, batch)
        target = default_collate([b[1] for b in batch])
        return output, _light_target(self, target, lam, batch_size)
