"""MixupTarget: the labels of a mixup/cutmix batch, kept as two index tensors and lam instead of the
dense N×C target that timm's ``mixup_target`` builds."""
from __future__ import annotations

from typing import Optional, Union

import torch


class MixupTarget:
    """q = lam·q(target_a) + (1 − lam)·q(target_b), with q(t) the one-hot target of class indices t
    smoothed by ``label_smoothing`` (ε/C to every class, 1 − ε + ε/C at the class: timm's and torch's
    rule). ``smoothce.mixup_cross_entropy(logits, mixup_target)`` and the timm integration's
    ``SoftTargetCrossEntropy`` take it where timm passes the dense target.

    target_a, target_b: class indices (N,); target_b is usually target_a.flip(0).
    lam: a float in [0, 1] (one for the batch) or a tensor (N,) (one per sample).
    label_smoothing: ε in [0, 1]. num_classes: C, checked against the logits when given; needed by
        ``dense()``.
    """

    __slots__ = ("target_a", "target_b", "lam", "label_smoothing", "num_classes")

    def __init__(self, target_a: torch.Tensor, target_b: torch.Tensor, lam: Union[float, torch.Tensor],
                 label_smoothing: float = 0.0, num_classes: Optional[int] = None) -> None:
        self.target_a = target_a
        self.target_b = target_b
        self.lam = lam
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def _replace(self, convert) -> "MixupTarget":
        lam = convert(self.lam) if isinstance(self.lam, torch.Tensor) else self.lam
        return MixupTarget(convert(self.target_a), convert(self.target_b), lam, self.label_smoothing,
                           self.num_classes)

    def to(self, *args, **kwargs) -> "MixupTarget":
        """Moves the tensors to a device (``tensor.to``'s arguments; a dtype is not applied: the
        labels stay class indices and lam keeps its precision)."""
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None:
            return self
        return self._replace(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MixupTarget":
        """For DataLoader(pin_memory=True), which pins any batch element with this method."""
        return self._replace(lambda t: t.pin_memory())

    @property
    def device(self) -> torch.device:
        return self.target_a.device

    def __len__(self) -> int:
        return len(self.target_a)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, num_classes) target this stands for, as timm's ``mixup_target`` builds it (for
        a loss that needs it, e.g. timm's BinaryCrossEntropy)."""
        if self.num_classes is None:
            raise ValueError("MixupTarget.dense: num_classes is not set; construct the target with num_classes=C")
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off

        def one_hot(t):
            return torch.full((t.numel(), self.num_classes), off, dtype=dtype, device=t.device).scatter_(
                1, t.long().view(-1, 1), on)

        lam = self.lam.to(dtype).view(-1, 1) if isinstance(self.lam, torch.Tensor) else self.lam
        return one_hot(self.target_a) * lam + one_hot(self.target_b) * (1.0 - lam)

    def unpack(self, where: str, input: torch.Tensor, label_smoothing: float):
        """(target_a, target_b, lam, label_smoothing) for a loss on logits `input` (class dim 1, or 0
        when unbatched); a label_smoothing passed to that loss as well must agree with this target's."""
        if self.num_classes is not None and input.dim() >= 1:
            classes = input.shape[0 if input.dim() == 1 else 1]
            if classes != self.num_classes:
                raise ValueError(f"{where}: the MixupTarget was made for num_classes={self.num_classes}, but the "
                                 f"logits have {classes} classes (shape {tuple(input.shape)})")
        if label_smoothing and label_smoothing != self.label_smoothing:
            raise ValueError(f"{where}: label_smoothing={label_smoothing} disagrees with the MixupTarget's "
                             f"label_smoothing={self.label_smoothing}; the target carries its own smoothing")
        return self.target_a, self.target_b, self.lam, self.label_smoothing

    def __getattr__(self, name: str):
        # Reached only for attributes a MixupTarget lacks, e.g. a loss that expects the dense tensor
        # (timm's BinaryCrossEntropy asks for .shape): say what to do instead of a bare AttributeError.
        raise AttributeError(
            f"'MixupTarget' object has no attribute {name!r}: it is not a tensor but the labels and lam of a "
            f"mixup batch, for smoothce.mixup_cross_entropy and smoothce.integrations.timm.SoftTargetCrossEntropy; "
            f"a loss that needs the dense (N, C) target can take target.dense() (or use timm's own Mixup)")

    def __repr__(self) -> str:
        lam = f"tensor of shape {tuple(self.lam.shape)}" if isinstance(self.lam, torch.Tensor) else self.lam
        return (f"MixupTarget(N={len(self)}, lam={lam}, label_smoothing={self.label_smoothing}, "
                f"num_classes={self.num_classes}, device={self.device})")
