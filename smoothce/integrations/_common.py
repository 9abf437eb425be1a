"""Helpers shared by the integrations."""
from __future__ import annotations

import importlib

import torch


def import_library(name: str, extra: str):
    """The library an integration adapts, or an ImportError that says how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"smoothce.integrations.{extra} needs the {name!r} package: pip install 'smoothce[{extra}]' "
                          f"(or pip install {name})") from error


def classes_second(logits: torch.Tensor) -> torch.Tensor:
    """Logits with the classes in the last dim (timm's and transformers' layout) as smoothce takes them
    (dim 1 of an N-d input): a view with the class dim moved, no copy."""
    return logits.movedim(-1, 1) if logits.dim() > 2 else logits
