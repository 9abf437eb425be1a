"""Hugging Face transformers, fused: ``patch_trainer(trainer)`` after building a ``Trainer``.

- ``LabelSmoother(epsilon, ignore_index)``: the Trainer's label smoother (``label_smoothing_factor``),
  same call and value, without the −log_softmax of the logits and its fp32 sum.
- ``ForCausalLMLoss(...)`` / ``ForMaskedLMLoss(...)``: the models' loss functions (signature of
  ``transformers.loss.loss_utils``), reading the logits in their own dtype instead of an fp32 copy,
  plus a ``label_smoothing`` keyword.
- ``patch_model(model)`` / ``patch_trainer(trainer)``: install them; each returns what it changed.
The losses are fp32 (as transformers' are) whatever the logits' dtype.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _function
from ._common import classes_second, import_library

import_library("transformers", "transformers")
from transformers.loss import loss_utils as _loss_utils  # noqa: E402

__all__ = ["LabelSmoother", "ForCausalLMLoss", "ForMaskedLMLoss", "patch_model", "patch_trainer"]


def _token_loss(where, logits, labels, ignore_index, label_smoothing, num_items_in_batch):
    """Σ over the non-ignored tokens of the (smoothed) loss, divided by num_items_in_batch when given
    (the Trainer's count over all gradient-accumulation micro-batches; the kernel applies it to the
    gradient as it writes it), else their mean. logits (..., V) classes last (any strides), labels (...)."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    return _function.cross_entropy_impl(classes_second(logits), labels, None, ignore_index, reduction,
                                        label_smoothing, where=where, float32_loss=True, divisor=num_items_in_batch)


def _shifted(labels, ignore_index):
    """Token t predicts label t + 1: the labels moved one to the left, the last position ignored."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


@dataclass
class LabelSmoother:
    """transformers' ``trainer_pt_utils.LabelSmoother``: (1 − ε)·Σ nll / D + ε·Σ_c(−log p) / (D·C) over
    the tokens whose label is not ignore_index, D = num_items_in_batch if given, else their count."""

    epsilon: float = 0.1
    ignore_index: int = -100

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        where = "smoothce.integrations.transformers.LabelSmoother"
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        if labels.dim() == logits.dim() and labels.shape[-1] == 1:
            labels = labels.squeeze(-1)
        if shift_labels:
            # Shift the labels, not the logits (as ForCausalLMLoss). A slice logits[..., :-1, :] has gaps:
            # flattening it into rows would copy it, and the slice's backward would allocate the full
            # gradient again.
            labels = _shifted(labels, self.ignore_index)
        return _token_loss(where, logits, labels, self.ignore_index, self.epsilon, num_items_in_batch)


def _flat(where, logits, labels, vocab_size):
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"{where}: vocab_size={vocab_size} but the logits' last dim is {logits.shape[-1]} "
                         f"(shape {tuple(logits.shape)})")
    return logits.reshape(-1, vocab_size), labels.reshape(-1).to(logits.device)


def ForCausalLMLoss(logits, labels, vocab_size: int, num_items_in_batch: Optional[torch.Tensor] = None,
                    ignore_index: int = -100, shift_labels: Optional[torch.Tensor] = None,
                    label_smoothing: float = 0.0, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss``: token t predicts label t + 1 (labels padded with ignore_index),
    sum / num_items_in_batch when given, else the mean; label_smoothing ε as torch's cross_entropy."""
    where = "smoothce.integrations.transformers.ForCausalLMLoss"
    if shift_labels is None:
        shift_labels = _shifted(labels, ignore_index)
    logits, shift_labels = _flat(where, logits, shift_labels, vocab_size)
    return _token_loss(where, logits, shift_labels, ignore_index, label_smoothing, num_items_in_batch)


def ForMaskedLMLoss(logits, labels, vocab_size: int, num_items_in_batch: Optional[torch.Tensor] = None,
                    ignore_index: int = -100, label_smoothing: float = 0.0, **kwargs) -> torch.Tensor:
    """transformers' ``ForMaskedLMLoss``: every token against its own label (no shift)."""
    where = "smoothce.integrations.transformers.ForMaskedLMLoss"
    logits, labels = _flat(where, logits, labels, vocab_size)
    return _token_loss(where, logits, labels, ignore_index, label_smoothing, num_items_in_batch)


# transformers' loss function -> ours, for the ones whose every call this module can serve.
_REPLACEMENTS = {_loss_utils.ForCausalLMLoss: ForCausalLMLoss, _loss_utils.ForMaskedLMLoss: ForMaskedLMLoss}


def patch_model(model) -> dict:
    """Makes a transformers model compute its loss with smoothce when its forward calls
    ``self.loss_function`` and that is transformers' ForCausalLMLoss or ForMaskedLMLoss (models whose
    forward builds its own loss, e.g. BertForMaskedLM, are left alone). Returns {"loss_function":
    (old, new)}, or {} when nothing changed."""
    forward = inspect.unwrap(getattr(type(model), "forward", None) or (lambda: None))  # under its decorators
    if "loss_function" not in getattr(getattr(forward, "__code__", None), "co_names", ()):
        return {}
    current = getattr(model, "loss_function", None)
    replacement = _REPLACEMENTS.get(current)
    if replacement is None:
        return {}
    model.loss_function = replacement
    return {"loss_function": (current, replacement)}


def patch_trainer(trainer) -> dict:
    """Makes a ``transformers.Trainer`` compute its training loss with smoothce: its label smoother
    (set when ``label_smoothing_factor`` > 0) becomes this module's ``LabelSmoother``, and its model's
    loss function this module's (``patch_model``). A ``compute_loss_func`` given to the Trainer is left
    alone. Returns what changed, {name: (old, new)}: "label_smoother", "model.loss_function"."""
    from transformers.trainer_pt_utils import LabelSmoother as TransformersLabelSmoother

    changed = {}
    old = getattr(trainer, "label_smoother", None)
    if type(old) is TransformersLabelSmoother:
        trainer.label_smoother = LabelSmoother(epsilon=old.epsilon, ignore_index=old.ignore_index)
        changed["label_smoother"] = (old, trainer.label_smoother)
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    for name, change in patch_model(model).items():
        changed["model." + name] = change
    return changed
