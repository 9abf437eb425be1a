"""The library integrations: smoothce.integrations.timm and smoothce.integrations.transformers against
the timm and transformers code they replace, each as one training step's loss (forward + backward).

    python -m bench                         # the other tables, then these rows (into the same JSON and .md)
    python -m bench --integrations-only     # these rows only: <out>/<device>-integrations.json, .md, .png
    python -m bench --no-integrations       # without them

The groups (each a pair, the library's call and smoothce's drop-in, on the same inputs):

- timm_mixup: the timm training recipe's loss step: ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0,
  label_smoothing=0.1, num_classes=C)(images, labels)`` then ``SoftTargetCrossEntropy()(logits, target)``
  and its backward. timm's Mixup builds the dense N×C target; smoothce's returns a MixupTarget (two
  label tensors and lam) that its SoftTargetCrossEntropy reads. The Mixup call is inside the timed step,
  on small images (N, 3, 32, 32): mixing them is the same work in both (the same code, the same random
  draws) and about half of smoothce's step at these shapes, so it dilutes the ratio rather than
  dominating it (ImageNet's 224×224 images would dominate it). Its flipped copy of the images (N·3·32·32
  fp32: 3 MiB at N = 256) is in both peaks too, and is most of smoothce's (its gradient of the logits is
  N·C elements). The logits (N, C) are a leaf standing for the model's output on the mixed images.
  Before every call the images are restored (untimed) and numpy's global generator is seeded: a
  contender's i-th call uses seed SEED + i, the same for both, so in each round both draw the same lam
  and the same mixup/cutmix choice.
- hf_label_smoother: the Trainer's label smoothing (``label_smoothing_factor`` = 0.1):
  ``trainer_pt_utils.LabelSmoother(epsilon=0.1)({"logits": logits}, labels, shift_labels=True)``.
- hf_causal_lm_loss: a causal LM's loss function (ε = 0): ``loss_utils.ForCausalLMLoss(logits, labels,
  V, num_items_in_batch=n)``, n a tensor as the Trainer passes it; transformers copies bf16 logits to
  fp32 first, smoothce reads them as they are.
The transformers groups use logits (B, T, V) that require grad and labels with ~5% -100.

Before a group is timed, smoothce's loss and gradient are checked against the library's (and, for
Mixup, the mixed images must be identical); a group that fails is reported and not timed (and
`python -m bench` exits with status 1). Without timm or transformers, their groups are skipped with
the reason. Runs: adaptive within a budget (the harness's RunPlanner), fixed under --quick or --runs.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench import report
from bench.harness import (DTYPES, LABEL_SMOOTHING, MEMORY_METHOD, TIMING_METHOD, Task, error_reason, import_optional,
                           planner_for, release_memory, run_rounds, shape_str, warm_up)

IGNORE_INDEX = -100
HF_IGNORED_FRACTION = 0.05  # of the labels that are IGNORE_INDEX (padding, prompt tokens)
MIXUP_ARGS = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": LABEL_SMOOTHING}  # timm's ImageNet recipe
HF_EPSILON = LABEL_SMOOTHING      # the Trainer's label_smoothing_factor
CAUSAL_LM_SMOOTHING = 0.0         # transformers' model losses have none
IMAGE_SHAPE = (3, 32, 32)
QUICK_IMAGE_SHAPE = (3, 8, 8)
SEED = 0
# smoothce's loss and gradient against the library's: the loss to rtol relative, the gradient to rtol of
# the library's largest gradient entry. bf16/fp16: the two round in different places (transformers'
# LabelSmoother takes log_softmax and sums its nll in bf16; smoothce accumulates in fp32).
CHECK_RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
DEFAULT_BUDGET_S = {"cpu": 60.0, "cuda": 60.0}  # the adaptive runs of this suite (checks, warm-up and memory aside)

Loss = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Integration:
    name: str
    library: str   # the package, and the name of its contender
    title: str
    note: str = ""


INTEGRATIONS = (
    Integration("timm_mixup", "timm", "timm's recipe: Mixup + SoftTargetCrossEntropy on the mixed batch",
                "the Mixup call also mixes the images (N, *image_shape) in place, the same work in both, and its "
                "flipped copy of them (the cells' images_bytes) is in both peaks; numpy seeded alike before each "
                "call; the logits are a leaf, not computed from the images"),
    Integration("hf_label_smoother", "transformers", f"Trainer label smoothing (label_smoothing_factor={HF_EPSILON})",
                f"logits (B, T, V) requiring grad, labels with {HF_IGNORED_FRACTION:.0%} {IGNORE_INDEX}; "
                "transformers copies the shifted logits (logits[..., :-1, :].contiguous()) and takes their log_softmax"),
    Integration("hf_causal_lm_loss", "transformers", "a causal LM's loss function (ε = 0)",
                f"labels with {HF_IGNORED_FRACTION:.0%} {IGNORE_INDEX}, num_items_in_batch a tensor (the "
                "Trainer's); transformers copies bf16 logits to fp32 (logits.float()), smoothce reads them as they are"),
)

# Shapes per library: timm (N, C, dtype) logits of an image classifier's head; transformers (B, T, V, dtype).
# On CPU sized so the suite takes about a minute and a half on 2 cores (a transformers step takes ~0.2-0.5 s).
SHAPES = {
    "cpu": {"timm": ((256, 1000, "fp32"), (1024, 1000, "bf16")),
            "transformers": ((4, 256, 32000, "fp32"), (4, 256, 32000, "bf16"))},
    "cuda": {"timm": ((1024, 1000, "fp32"), (1024, 1000, "bf16"), (1024, 21843, "bf16")),
             "transformers": ((8, 1024, 32000, "fp32"), (8, 1024, 32000, "bf16"), (4, 2048, 128256, "bf16"))},
}
QUICK_SHAPES = {"timm": ((16, 10, "fp32"), (16, 10, "bf16")),
                "transformers": ((2, 8, 50, "fp32"), (2, 8, 50, "bf16"))}


@dataclass(frozen=True)
class Cell:
    integration: Integration
    shape: tuple[int, ...]
    dtype: str

    @property
    def name(self) -> str:
        return shape_str(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def logits_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass
class Inputs:
    logits: torch.Tensor                     # leaf requiring grad: (N, C) or (B, T, V)
    labels: torch.Tensor                     # (N,) or (B, T)
    images: Optional[torch.Tensor] = None    # timm: (N, 3, H, W), mixed in place by Mixup
    pristine: Optional[torch.Tensor] = None  # timm: the images before mixing
    num_items: Optional[torch.Tensor] = None  # transformers: the non-ignored shifted labels, counted

    def reset(self, seed: int) -> None:
        """Before a call (untimed): no gradient, the unmixed images, numpy seeded for Mixup's draws."""
        self.logits.grad = None
        if self.images is not None:
            import numpy as np

            self.images.copy_(self.pristine)
            np.random.seed(seed)


@dataclass
class Contender:
    name: str
    code: str   # what the timed call runs, shown in the report
    loss: Loss


def build_inputs(cell: Cell, device: str, image_shape: tuple[int, ...] = IMAGE_SHAPE, seed: int = 0) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    # logits ~ N(0, 4): a spread like a trained head's
    logits = (torch.randn(cell.shape, generator=generator, device=device) * 2).to(cell.torch_dtype)
    if cell.integration.library == "timm":
        n, num_classes = cell.shape
        labels = torch.randint(0, num_classes, (n,), generator=generator, device=device)
        pristine = torch.randn((n, *image_shape), generator=generator, device=device)
        return Inputs(logits.requires_grad_(True), labels, pristine.clone(), pristine)
    batch, tokens, vocab = cell.shape
    labels = torch.randint(0, vocab, (batch, tokens), generator=generator, device=device)
    labels[torch.rand(batch, tokens, generator=generator, device=device) < HF_IGNORED_FRACTION] = IGNORE_INDEX
    num_items = (labels[..., 1:] != IGNORE_INDEX).sum()
    return Inputs(logits.requires_grad_(True), labels, num_items=num_items)


# ----------------------------------------------------------------------------- the libraries

@dataclass
class Libraries:
    smoothce: object = None
    theirs: dict = None    # library -> {name: the library's class or function}
    ours: dict = None      # library -> {name: smoothce.integrations.<library>'s}
    versions: dict = None
    reasons: dict = None   # library (or "smoothce") -> why its groups are skipped


# library -> (the library's names and modules, smoothce's module for it)
LIBRARY_IMPORTS = {
    "timm": ({"Mixup": "timm.data.mixup", "SoftTargetCrossEntropy": "timm.loss"}, "smoothce.integrations.timm"),
    "transformers": ({"LabelSmoother": "transformers.trainer_pt_utils",
                      "ForCausalLMLoss": "transformers.loss.loss_utils"}, "smoothce.integrations.transformers"),
}


def import_libraries(smoothce, smoothce_reason: Optional[str]) -> Libraries:
    """timm's and transformers' classes and smoothce's integrations of them; a library that cannot be
    imported (or whose smoothce integration cannot) gets a reason instead."""
    libs = Libraries(smoothce=smoothce, theirs={}, ours={}, versions={}, reasons={})
    if smoothce is None:
        libs.reasons["smoothce"] = f"smoothce {smoothce_reason}"
        return libs
    for library, (names, our_module) in LIBRARY_IMPORTS.items():
        theirs = {name: import_optional(libs.versions, libs.reasons, library, library, module, name)
                  for name, module in names.items()}
        if any(found is None for found in theirs.values()):
            continue
        scratch_versions, scratch_reasons = {}, {}
        ours = {name: import_optional(scratch_versions, scratch_reasons, library, "smoothce", our_module, name)
                for name in names}
        if any(found is None for found in ours.values()):
            libs.reasons[library] = f"{our_module} {scratch_reasons[library]}"
            continue
        libs.theirs[library], libs.ours[library] = theirs, ours
    return libs


def contenders_for(cell: Cell, inputs: Inputs, libs: Libraries) -> list[Contender]:
    """The library's call first, then smoothce's drop-in for it."""
    integration, library = cell.integration, cell.integration.library
    theirs, ours = libs.theirs[library], libs.ours[library]
    logits, labels = inputs.logits, inputs.labels
    if integration.name == "timm_mixup":
        num_classes = cell.shape[1]
        images = inputs.images
        steps = []
        for where in (theirs, ours):
            mixup, loss = where["Mixup"](**MIXUP_ARGS, num_classes=num_classes), where["SoftTargetCrossEntropy"]()

            def step(mixup=mixup, loss=loss):
                _, target = mixup(images, labels)
                return loss(logits, target)
            steps.append(step)
        arguments = ", ".join(f"{key}={value}" for key, value in MIXUP_ARGS.items())
        return [Contender(library, f"x, y = timm.data.Mixup({arguments}, num_classes=C)(images, labels); "
                                   "timm.loss.SoftTargetCrossEntropy()(logits, y)  # y: the dense N×C target", steps[0]),
                Contender("smoothce", f"x, y = Mixup({arguments}, num_classes=C)(images, labels); "
                                      "SoftTargetCrossEntropy()(logits, y)  # from smoothce.integrations.timm; "
                                      "y: a smoothce.MixupTarget", steps[1])]
    if integration.name == "hf_label_smoother":
        outputs = {"logits": logits}
        their_smoother, our_smoother = theirs["LabelSmoother"](epsilon=HF_EPSILON), ours["LabelSmoother"](epsilon=HF_EPSILON)
        call = f"LabelSmoother(epsilon={HF_EPSILON})({{'logits': logits}}, labels, shift_labels=True)"
        return [Contender(library, f"transformers.trainer_pt_utils.{call}",
                          lambda: their_smoother(outputs, labels, shift_labels=True)),
                Contender("smoothce", f"smoothce.integrations.transformers.{call}",
                          lambda: our_smoother(outputs, labels, shift_labels=True))]
    if integration.name == "hf_causal_lm_loss":
        vocab, num_items = cell.shape[-1], inputs.num_items
        their_loss, our_loss = theirs["ForCausalLMLoss"], ours["ForCausalLMLoss"]
        call = "ForCausalLMLoss(logits, labels, V, num_items_in_batch=n)"
        return [Contender(library, f"transformers.loss.loss_utils.{call}",
                          lambda: their_loss(logits, labels, vocab, num_items_in_batch=num_items)),
                Contender("smoothce", f"smoothce.integrations.transformers.{call}",
                          lambda: our_loss(logits, labels, vocab, num_items_in_batch=num_items))]
    raise ValueError(f"unknown integration {integration.name!r}")


# ----------------------------------------------------------------------------- check, then time

def loss_and_grad(contender: Contender, inputs: Inputs) -> tuple[float, str, torch.Tensor, Optional[torch.Tensor]]:
    """(loss, its dtype, the logits' gradient, the mixed images) of one call with the check's seed."""
    inputs.reset(SEED)
    value = contender.loss()
    value.backward()
    grad = inputs.logits.grad.detach().float().clone()
    images = inputs.images.clone() if inputs.images is not None else None
    inputs.reset(SEED)
    return value.detach().float().item(), str(value.dtype).replace("torch.", ""), grad, images


def check(cell: Cell, contenders: list[Contender], inputs: Inputs) -> dict:
    """smoothce's loss and gradient (and, for Mixup, the mixed images) against the library's."""
    library, mine = contenders
    rtol = CHECK_RTOL[cell.dtype]
    entry = {"integration": cell.integration.name, "shape_str": cell.name, "dtype": cell.dtype,
             "contender": mine.name, "reference": library.name, "rtol": rtol}
    try:
        ref_loss, ref_dtype, ref_grad, ref_images = loss_and_grad(library, inputs)
        loss, loss_dtype, grad, images = loss_and_grad(mine, inputs)
    except Exception as error:  # a call that raises is a failed check, not a crash of the whole run
        return dict(entry, passed=False, error=error_reason(error))
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_rel = (grad - ref_grad).abs().max().item() / max(ref_grad.abs().max().item(), 1e-30)
    same_images = None if images is None else bool(torch.equal(images, ref_images))
    passed = math.isfinite(loss) and loss_rel <= rtol and grad_rel <= rtol and same_images is not False
    result = dict(entry, reference_loss=ref_loss, reference_loss_dtype=ref_dtype, loss=loss, loss_dtype=loss_dtype,
                  loss_rel_diff=loss_rel, grad_rel_diff=grad_rel, passed=passed)
    if same_images is not None:
        result["same_mixed_images"] = same_images
    return result


def contender_task(contender: Contender, inputs: Inputs, empty_cache: Callable[[], None]) -> Task:
    calls = itertools.count()  # the i-th call of every contender gets the same seed

    def prepare():
        inputs.reset(SEED + next(calls))  # as optimizer.zero_grad(set_to_none=True); unmixed images

    def memory_prepare():
        prepare()
        empty_cache()  # smoothce's CPU gradient cache, as in the other suites: every allocation counts

    def step():
        contender.loss().backward()
    return Task(contender.name, prepare, step, memory_prepare)


def cells_for(device: str, quick: bool, dtypes: Optional[list[str]]) -> list[Cell]:
    """Every integration's (shape, dtype), cheapest logits first; --dtypes, when given, keeps those only."""
    shapes = QUICK_SHAPES if quick else SHAPES[device]
    cells = [Cell(integration, tuple(shape), dtype) for integration in INTEGRATIONS
             for *shape, dtype in shapes[integration.library] if not dtypes or dtype in dtypes]
    return sorted(cells, key=lambda cell: math.prod(cell.shape))  # stable: INTEGRATIONS' order within a size


def method(device: str) -> dict:
    return {
        "timing": TIMING_METHOD[device] + " Each group (integration, shape, dtype) runs round-robin: the "
                  "library's call and smoothce's alternate, the order rotated each round. Before each call "
                  "(untimed) the logits' .grad is set to None and, for Mixup, the images are restored and numpy "
                  "is seeded (the i-th call of both with the same seed).",
        "memory": MEMORY_METHOD[device].replace(".grad set to None first, so the new gradient counts",
                                                "the logits' .grad set to None first, so the new gradient counts")
                  + (" smoothce's CPU gradient cache is emptied first." if device == "cpu" else ""),
        "check": "before a group is timed, smoothce's loss must equal the library's to rtol relative and its "
                 "gradient of the logits to rtol of the library's largest entry (rtol "
                 + ", ".join(f"{k} {v:g}" for k, v in CHECK_RTOL.items()) + "), and Mixup's mixed images must "
                 "be identical; a group that fails is not timed.",
    }


def definitions(libs: Libraries) -> dict:
    """integration -> its title, note and what each contender's timed call runs (for the report)."""
    result = {}
    for integration in INTEGRATIONS:
        entry = {"title": integration.title, "library": integration.library, "note": integration.note}
        if integration.library in libs.theirs:
            probe_shape, dtype = {"timm": ((4, 3), "fp32"), "transformers": ((1, 3, 5), "fp32")}[integration.library]
            probe = Cell(integration, probe_shape, dtype)
            probe_inputs = build_inputs(probe, "cpu", QUICK_IMAGE_SHAPE)
            entry["contenders"] = {c.name: c.code for c in contenders_for(probe, probe_inputs, libs)}
        else:
            entry["contenders"] = {}
        result[integration.name] = entry
    return result


def run(device: str, args: argparse.Namespace, smoothce, reason: Optional[str]) -> dict:
    """Checks and times every integration group on one device; returns the JSON section (derived
    numbers included)."""
    started = time.perf_counter()
    budget = DEFAULT_BUDGET_S[device]
    planner = planner_for(args, budget, started)
    libs = import_libraries(smoothce, reason)
    all_cells = cells_for(device, args.quick, getattr(args, "dtypes", None))
    image_shape = QUICK_IMAGE_SHAPE if args.quick else IMAGE_SHAPE
    section = {
        "settings": {"mixup": dict(MIXUP_ARGS), "image_shape": list(image_shape),
                     "hf_label_smoothing": HF_EPSILON, "causal_lm_label_smoothing": CAUSAL_LM_SMOOTHING,
                     "ignore_index": IGNORE_INDEX, "ignored_fraction": HF_IGNORED_FRACTION, "seed": SEED},
        "method": method(device),
        "definitions": definitions(libs),
        "versions": dict(libs.versions, torch=torch.__version__),
        "budget_s": None if planner.fixed else budget,
        "cells": [], "checks": [], "skipped": [], "measurements": [],
    }
    for name, why in libs.reasons.items():
        skipped = [i.name for i in INTEGRATIONS if name in ("smoothce", i.library)]
        for integration in skipped:
            section["skipped"].append({"integration": integration, "contender": name, "shape_str": None,
                                       "dtype": None, "reason": why})
    cells = [cell for cell in all_cells if cell.integration.library in libs.theirs]
    print(f"== {device} integrations: {len(cells)} groups ({', '.join(sorted(libs.theirs)) or 'none'}), "
          f"budget {'fixed runs' if planner.fixed else f'{budget:.0f} s'}", flush=True)
    for name, why in libs.reasons.items():
        print(f"   skip {name}: {why}", flush=True)
    if libs.smoothce is None or not cells:
        section["runs_policy"] = "nothing measured."
        section["elapsed_s"] = round(time.perf_counter() - started, 1)
        return report.derive_integrations(section)

    weight_left = float(len(cells))
    for done, cell in enumerate(cells, 1):
        inputs = build_inputs(cell, device, image_shape)
        section["measurements"] += measure_group(cell, inputs, device, libs, planner, weight_left, section,
                                                 f"{done}/{len(cells)}")
        weight_left -= 1.0
        del inputs
        release_memory(device)
    libs.smoothce.empty_cache()
    rank = {(c.integration.name, c.name, c.dtype): i for i, c in
            enumerate(sorted(cells, key=lambda c: [i.name for i in INTEGRATIONS].index(c.integration.name)))}
    for key in ("cells", "checks", "measurements"):  # shown per integration, in INTEGRATIONS' order
        section[key].sort(key=lambda row: rank[(row["integration"], row["shape_str"], row["dtype"])])
    reduced = sum(1 for row in section["measurements"] if row["reduced_runs"])
    section["runs_policy"] = (f"{planner.runs} timed round-robin rounds per group after warm-up (fixed)." if planner.fixed
                              else f"adaptive, as the main table, within a {budget:.0f} s budget for these rows"
                              + (f"; {reduced} of {len(section['measurements'])} measurements took fewer than "
                                 f"{planner.runs} runs to fit it" if reduced else "") + ".")
    section["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report.derive_integrations(section)


def measure_group(cell: Cell, inputs: Inputs, device: str, libs: Libraries, planner, weight_left: float,
                  section: dict, progress: str) -> list[dict]:
    name = cell.integration.name
    section["cells"].append({"integration": name, "library": cell.integration.library, "shape": list(cell.shape),
                             "shape_str": cell.name, "dtype": cell.dtype, "logits_bytes": cell.logits_bytes,
                             **({"image_shape": list(inputs.images.shape),
                                 "images_bytes": inputs.images.numel() * inputs.images.element_size()}
                                if inputs.images is not None else {})})
    where = f"{name} {cell.name} {cell.dtype}"
    contenders = contenders_for(cell, inputs, libs)
    result = check(cell, contenders, inputs)
    section["checks"].append(result)
    if not result["passed"]:
        why = result.get("error") or (
            f"loss {result['loss']:.9g} vs {result['reference']} {result['reference_loss']:.9g} (rel "
            f"{result['loss_rel_diff']:.2g}), gradient rel {result['grad_rel_diff']:.2g} (rtol {result['rtol']:g})"
            + (", mixed images differ" if result.get("same_mixed_images") is False else ""))
        print(f"   CHECK FAILED integrations {where}: smoothce: {why} — not timed", flush=True)
        section["skipped"].append({"integration": name, "contender": "smoothce", "shape_str": cell.name,
                                   "dtype": cell.dtype, "reason": f"check failed (group not timed): {why}"})
        return []
    tasks = [contender_task(c, inputs, libs.smoothce.empty_cache) for c in contenders]
    gc.collect()
    warmup_rounds, round_seconds, memory = warm_up(tasks, device)
    runs, reduced = planner.plan(round_seconds, 1.0, weight_left, 0)
    times = run_rounds(tasks, device, runs)
    group = [{"integration": name, "library": cell.integration.library, "shape": list(cell.shape),
              "shape_str": cell.name, "dtype": cell.dtype, "contender": task.name, "runs": runs,
              "warmup_rounds": warmup_rounds, "reduced_runs": reduced, "peak_extra_bytes": memory[task.name],
              "times_ms": [round(t * 1e3, 6) for t in times[task.name]]}
             for task in tasks]
    report.derive_integrations({"measurements": group})
    print(f"integrations [{progress}] {where} fwd+bwd ({device}, {runs} runs{', reduced' if reduced else ''})",
          flush=True)
    for row in group:
        mine = (f"smoothce speed-up {row['smoothce_speedup']:.2f}x" if row["contender"] != "smoothce" else "")
        memory_ratio = (f"memory {row['memory_vs_smoothce']:.2f}x" if row["contender"] != "smoothce"
                        and row.get("memory_vs_smoothce") is not None else "")
        print(f"      {row['contender']:<13} {report.fmt_ms(row['median_ms']):>8} ms "
              f"[IQR {report.fmt_ms(row['q1_ms'])}-{report.fmt_ms(row['q3_ms'])}]  {mine:>24}  "
              f"{report.fmt_bytes(row['peak_extra_bytes']):>13}  {memory_ratio}", flush=True)
    inputs.logits.grad = None
    return group
