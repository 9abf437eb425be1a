"""Label-smoothing variants (docs/semantics.md §3, §3.5): each smoothce keyword against the plain-PyTorch code
users run for it today, timed in the same process with bench/harness.py's round-robin machinery.

    python -m bench                     # the standard table, then these rows (into the same JSON and .md)
    python -m bench --variants-only     # these rows only: <out>/<device>-variants.json, .md, .png
    python -m bench --no-variants       # the standard table only

Every pair is checked before it is timed: the losses (fp32) must agree to CHECK_RTOL relative and the
gradients to CHECK_RTOL of the largest gradient entry, or the pair is reported as failed and not timed
(and `python -m bench` exits with status 1), so a contender computing something else is never timed.
"""
from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import report
from bench.harness import (LABEL_SMOOTHING, MEMORY_METHOD, MODE_WEIGHT, QUICK_RUNS, SEGMENTATION_IGNORE_INDEX,
                           IGNORED_FRACTION, TARGET_RUNS, TIMING_METHOD, RunPlanner, Task, error_reason, run_rounds,
                           synchronize, warm_up)

DTYPE = torch.float32  # the pairs are checked against each other in fp32 before they are timed
CHECK_RTOL = 1e-4
LAM = 0.7                    # mixup's mixing weight (timm draws it from Beta(α, α) per batch)
Z_LOSS = 1e-4                # PaLM's z-loss coefficient
LB_POS, LB_NEG = 0.9, 0.005  # LabelSmoothSoftmaxCE's defaults (with C = 21: 0.9 + 20 × 0.005 = 1)

# (N, C) shapes for the classification variants, (N, C, H, W) for target_values. On CPU the vocabulary
# row is 1024 × 32000 (not 4096 × 32000): the dense-q plain versions take ~0.3 s a call there, so each
# pair still gets its 20 runs inside the budget.
SHAPES = {
    "cpu": {"classification": ((4096, 1000), (1024, 32000)), "segmentation": ((8, 21, 128, 128),)},
    "cuda": {"classification": ((4096, 1000), (4096, 32000)), "segmentation": ((8, 21, 256, 256),)},
}
QUICK_SHAPES = {"classification": ((64, 100),), "segmentation": ((2, 5, 8, 8),)}
DEFAULT_BUDGET_S = {"cpu": 100.0, "cuda": 120.0}

PLAIN = "plain"  # the baseline contender of every group (report.VARIANT_BASELINE)

Loss = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------- the variants

@dataclass
class Inputs:
    leaves: list[torch.Tensor]  # the tensors that require grad: .grad is reset before each call
    target: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass
class Contender:
    name: str
    code: str   # what the timed call runs, shown in the report
    loss: Loss


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str                # "classification" | "segmentation"
    title: str               # where it comes from
    modes: tuple[str, ...]
    setup: str = ""          # what the step does besides the loss (the same for every contender)


VARIANTS = (
    Variant("others", "classification", "ε over the C−1 other classes (the common LabelSmoothingLoss)",
            ("fwd+bwd", "fwd")),
    Variant("z_loss", "classification", "PaLM's z-loss (Chowdhery et al. 2022) added to torch's smoothed CE",
            ("fwd+bwd", "fwd")),
    Variant("mixup", "classification", "timm's mixup_target (dense y) + SoftTargetCrossEntropy",
            ("fwd+bwd", "fwd")),
    Variant("target_values", "segmentation", "LabelSmoothSoftmaxCE(lb_pos, lb_neg, lb_ignore=255) on (N, C, H, W)",
            ("fwd+bwd", "fwd")),
    Variant("inplace_backward", "classification", "flash-attn's inplace_backward: the gradient over the logits",
            ("fwd+bwd",),
            "logits = features + bias inside the timed call (a Linear layer's bias add: features (N, C) and "
            "bias (C,) are the leaves), so the logits are a non-leaf whose gradient passes on unchanged"),
)


def make_inputs(variant: Variant, shape: tuple[int, ...], device: str, seed: int = 0) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    positions = (shape[0],) + shape[2:]
    logits = torch.randn(shape, generator=generator, device=device, dtype=DTYPE) * 2
    target = torch.randint(0, shape[1], positions, generator=generator, device=device)
    if variant.kind == "segmentation":
        target[torch.rand(positions, generator=generator, device=device) < IGNORED_FRACTION] = SEGMENTATION_IGNORE_INDEX
    if variant.name == "inplace_backward":
        bias = torch.randn(shape[1], generator=generator, device=device, dtype=DTYPE) * 0.1
        return Inputs([logits.requires_grad_(True), bias.requires_grad_(True)], target)
    return Inputs([logits.requires_grad_(True)], target)


def timm_one_hot(target: torch.Tensor, num_classes: int, on_value: float, off_value: float) -> torch.Tensor:
    """timm.data.mixup.one_hot: a dense (N, C) target, off_value everywhere and on_value at the target."""
    index = target.long().view(-1, 1)
    return torch.full((index.size(0), num_classes), off_value, device=target.device).scatter_(1, index, on_value)


def timm_mixup_target(target: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """timm.data.mixup.mixup_target: the batch mixed with its own reverse, smoothed uniformly."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = timm_one_hot(target, num_classes, on_value, off_value)
    y2 = timm_one_hot(target.flip(0), num_classes, on_value, off_value)
    return y1 * lam + y2 * (1.0 - lam)


def contenders_for(variant: Variant, inputs: Inputs, smoothce) -> list[Contender]:
    """The plain-PyTorch version first (the baseline), then smoothce's call(s)."""
    eps, target = LABEL_SMOOTHING, inputs.target
    x = inputs.leaves[0]
    num_classes = x.shape[1]

    if variant.name == "others":
        def plain():
            log_prob = F.log_softmax(x, dim=1)
            with torch.no_grad():
                q = torch.full_like(log_prob, eps / (num_classes - 1)).scatter_(1, target.unsqueeze(1), 1 - eps)
            return -(q * log_prob).sum(1).mean()
        return [Contender(PLAIN, "q = full_like(lp, ε/(C−1)).scatter_(1, t, 1−ε); −(q·log_softmax(x)).sum(1).mean()",
                          plain),
                Contender("smoothce", f"cross_entropy(x, t, label_smoothing={eps}, smoothing='others')",
                          lambda: smoothce.cross_entropy(x, target, label_smoothing=eps, smoothing="others"))]

    if variant.name == "z_loss":
        def plain():
            return (F.cross_entropy(x, target, label_smoothing=eps)
                    + Z_LOSS * (torch.logsumexp(x, dim=1) ** 2).mean())
        return [Contender(PLAIN, f"F.cross_entropy(x, t, label_smoothing={eps}) + {Z_LOSS:g}·(logsumexp(x, 1)²).mean()",
                          plain),
                Contender("smoothce", f"cross_entropy(x, t, label_smoothing={eps}, z_loss={Z_LOSS:g})",
                          lambda: smoothce.cross_entropy(x, target, label_smoothing=eps, z_loss=Z_LOSS))]

    if variant.name == "mixup":
        def plain():
            # timm's Mixup builds the dense target in the training step, outside autograd.
            with torch.no_grad():
                y = timm_mixup_target(target, num_classes, LAM, eps)
            return torch.sum(-y * F.log_softmax(x, dim=-1), dim=-1).mean()
        return [Contender(PLAIN, f"y = mixup_target(t, C, lam={LAM}, smoothing={eps}); "
                                 "(−y·log_softmax(x, −1)).sum(−1).mean()", plain),
                Contender("smoothce", f"mixup_cross_entropy(x, t, t.flip(0), {LAM}, label_smoothing={eps})",
                          lambda: smoothce.mixup_cross_entropy(x, target, target.flip(0), LAM, label_smoothing=eps))]

    if variant.name == "target_values":
        ignore_index = SEGMENTATION_IGNORE_INDEX

        def plain():
            # LabelSmoothSoftmaxCE's forward, with the ignore mask kept on the device (the original
            # compares label.data.cpu(): a host copy, free on CPU).
            log_prob = F.log_softmax(x, dim=1)
            with torch.no_grad():
                ignore = target == ignore_index
                n_valid = (~ignore).sum()
                label = target.masked_fill(ignore, 0)
                one_hot = torch.zeros_like(log_prob).scatter_(1, label.unsqueeze(1), 1)
                q = LB_POS * one_hot + LB_NEG * (1 - one_hot)
            loss = -torch.sum(log_prob * q, dim=1)
            loss[ignore] = 0
            return loss.sum() / n_valid
        return [Contender(PLAIN, f"q = {LB_POS}·onehot + {LB_NEG}·(1−onehot) (scatter); ℓ = −(q·log_softmax(x, 1)).sum(1); "
                                 f"ℓ[t == {ignore_index}] = 0; ℓ.sum() / #non-ignored", plain),
                Contender("smoothce", f"cross_entropy(x, t, target_values=({LB_POS}, {LB_NEG}), ignore_index={ignore_index})",
                          lambda: smoothce.cross_entropy(x, target, target_values=(LB_POS, LB_NEG),
                                                         ignore_index=ignore_index))]

    if variant.name == "inplace_backward":
        features, bias = inputs.leaves
        return [Contender(PLAIN, f"F.cross_entropy(features + bias, t, label_smoothing={eps})",
                          lambda: F.cross_entropy(features + bias, target, label_smoothing=eps)),
                Contender("smoothce", f"cross_entropy(features + bias, t, label_smoothing={eps})",
                          lambda: smoothce.cross_entropy(features + bias, target, label_smoothing=eps)),
                Contender("smoothce_inplace", f"cross_entropy(features + bias, t, label_smoothing={eps}, "
                                              "inplace_backward=True)",
                          lambda: smoothce.cross_entropy(features + bias, target, label_smoothing=eps,
                                                         inplace_backward=True))]
    raise ValueError(f"unknown variant {variant.name!r}")


# ----------------------------------------------------------------------------- check, then time

def loss_and_grads(contender: Contender, inputs: Inputs) -> tuple[float, list[torch.Tensor]]:
    for leaf in inputs.leaves:
        leaf.grad = None
    loss = contender.loss()
    loss.backward()
    grads = [leaf.grad.detach().clone() for leaf in inputs.leaves]
    for leaf in inputs.leaves:
        leaf.grad = None
    return loss.item(), grads


def check_pair(variant: Variant, shape_str: str, contenders: list[Contender], inputs: Inputs) -> list[dict]:
    """Loss and gradients of every smoothce contender against the plain version's."""
    plain_loss, plain_grads = loss_and_grads(contenders[0], inputs)
    grad_scale = max(g.abs().max().item() for g in plain_grads)
    checks = []
    for contender in contenders[1:]:
        loss, grads = loss_and_grads(contender, inputs)
        loss_rel = abs(loss - plain_loss) / max(abs(plain_loss), 1e-30)
        grad_rel = max((g - p).abs().max().item() for g, p in zip(grads, plain_grads)) / max(grad_scale, 1e-30)
        passed = math.isfinite(loss) and loss_rel <= CHECK_RTOL and grad_rel <= CHECK_RTOL
        checks.append({"variant": variant.name, "shape_str": shape_str, "contender": contender.name,
                       "plain_loss": plain_loss, "loss": loss, "loss_rel_diff": loss_rel,
                       "grad_rel_diff": grad_rel, "rtol": CHECK_RTOL, "passed": passed})
    return checks


def variant_task(contender: Contender, mode: str, inputs: Inputs, empty_cache: Callable[[], None]) -> Task:
    leaves, loss = inputs.leaves, contender.loss

    def prepare():
        for leaf in leaves:
            leaf.grad = None

    def memory_prepare():
        # The CPU kernel reuses its last gradient buffer (README "Memory"); empty it so the peak counts
        # every gradient a call allocates, as on a first call or with SMOOTHCE_CPU_GRAD_CACHE=0.
        prepare()
        empty_cache()

    if mode == "fwd":
        def step():
            with torch.no_grad():
                loss()
    elif mode == "fwd+bwd":
        def step():
            loss().backward()
    else:
        raise ValueError(f"variant mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    return Task(contender.name, prepare, step, memory_prepare)


def shapes_for(device: str, quick: bool) -> dict[str, tuple[tuple[int, ...], ...]]:
    return QUICK_SHAPES if quick else SHAPES[device]


def method(device: str) -> dict:
    return {
        "timing": TIMING_METHOD[device] + " Each group (variant, shape, mode) runs round-robin: the plain "
                  "version and smoothce's call(s) alternate in every round.",
        "memory": MEMORY_METHOD[device] + (" smoothce's CPU gradient cache is emptied before the measured call, "
                                           "so a gradient it would reuse counts too." if device == "cpu" else ""),
        "check": f"before timing, each smoothce call's loss (fp32) must equal the plain version's to {CHECK_RTOL:g} "
                 f"relative and its gradients to {CHECK_RTOL:g} of the plain gradient's largest entry; "
                 f"a pair that fails is not timed.",
    }


def run(device: str, args: argparse.Namespace, smoothce, reason: Optional[str]) -> dict:
    """Checks and times every variant on one device; returns the JSON section (derived numbers included)."""
    started = time.perf_counter()
    budget = args.variant_budget if args.variant_budget is not None else DEFAULT_BUDGET_S[device]
    fixed = args.quick or args.runs is not None
    planner = RunPlanner(runs=args.runs or (QUICK_RUNS if args.quick else TARGET_RUNS), fixed=fixed,
                         deadline=started + budget)
    shapes = shapes_for(device, args.quick)
    section = {
        "dtype": "fp32",
        "settings": {"label_smoothing": LABEL_SMOOTHING, "lam": LAM, "z_loss": Z_LOSS,
                     "target_values": [LB_POS, LB_NEG], "ignore_index": SEGMENTATION_IGNORE_INDEX,
                     "ignored_fraction": IGNORED_FRACTION},
        "method": method(device),
        "budget_s": None if fixed else budget,
        "definitions": [], "cells": [], "checks": [], "skipped": [], "measurements": [],
    }
    groups = [(variant, shape) for variant in VARIANTS for shape in shapes[variant.kind]]
    if smoothce is None:
        section["skipped"] = [{"variant": v.name, "shape_str": None, "reason": f"smoothce {reason}"} for v in VARIANTS]
        return report.derive_variants(section)

    order = sorted(groups, key=lambda group: math.prod(group[1]))  # cheapest first, as the main table
    total = sum(len(variant.modes) for variant, _ in groups)
    weight_left = sum(MODE_WEIGHT[mode] for variant, _ in groups for mode in variant.modes)
    done = 0
    print(f"== {device} variants: fp32, ε = {LABEL_SMOOTHING}, budget "
          f"{'fixed runs' if fixed else f'{budget:.0f} s'}", flush=True)
    for variant in VARIANTS:
        probe = make_inputs(variant, QUICK_SHAPES[variant.kind][0], "cpu")
        section["definitions"].append({"variant": variant.name, "title": variant.title, "setup": variant.setup,
                                       "contenders": {c.name: c.code for c in contenders_for(variant, probe, smoothce)}})
    for variant, shape in order:
        shape_str = "x".join(map(str, shape))
        section["cells"].append({"variant": variant.name, "shape": list(shape), "shape_str": shape_str})
        inputs = make_inputs(variant, shape, device)
        contenders = contenders_for(variant, inputs, smoothce)
        try:
            checks = check_pair(variant, shape_str, contenders, inputs)
        except Exception as error:  # a call that raises is a failed check, not a crash of the whole run
            checks = [{"variant": variant.name, "shape_str": shape_str, "contender": c.name, "passed": False,
                       "error": error_reason(error), "rtol": CHECK_RTOL} for c in contenders[1:]]
        section["checks"] += checks
        failed = [c for c in checks if not c["passed"]]
        if failed:
            reason = "; ".join(f"{c['contender']}: " + (c.get("error") or
                               f"loss {c['loss']:.9g} vs plain {c['plain_loss']:.9g} (rel {c['loss_rel_diff']:.2g}), "
                               f"gradient rel {c['grad_rel_diff']:.2g}") for c in failed)
            print(f"   CHECK FAILED {variant.name} {shape_str}: {reason} — not timed", flush=True)
            section["skipped"].append({"variant": variant.name, "shape_str": shape_str,
                                       "reason": f"check failed (not timed): {reason}"})
            done += len(variant.modes)
            weight_left -= sum(MODE_WEIGHT[mode] for mode in variant.modes)
            continue
        for mode in variant.modes:
            tasks = [variant_task(c, mode, inputs, smoothce.empty_cache) for c in contenders]
            gc.collect()
            warmup_rounds, round_seconds, memory = warm_up(tasks, device)
            runs, reduced = planner.plan(round_seconds, MODE_WEIGHT[mode], weight_left, 0)
            times = run_rounds(tasks, device, runs)
            weight_left -= MODE_WEIGHT[mode]
            group = [{"variant": variant.name, "shape": list(shape), "shape_str": shape_str, "dtype": "fp32",
                      "mode": mode, "contender": task.name, "runs": runs, "warmup_rounds": warmup_rounds,
                      "reduced_runs": reduced, "peak_extra_bytes": memory[task.name],
                      "times_ms": [round(t * 1e3, 6) for t in times[task.name]]} for task in tasks]
            report.derive_variants({"measurements": group})
            done += 1
            print(f"variants [{done}/{total}] {variant.name} {shape_str} fp32 {mode} ({device})", flush=True)
            for row in group:
                ratio = f"{row['speedup_vs_plain']:.2f}x plain" if row["speedup_vs_plain"] else ""
                print(f"      {row['contender']:<17} {report.fmt_ms(row['median_ms']):>8} ms "
                      f"[IQR {report.fmt_ms(row['q1_ms'])}-{report.fmt_ms(row['q3_ms'])}]  {ratio:>12}  "
                      f"{report.fmt_bytes(row['peak_extra_bytes']):>13}  ({runs} runs{', reduced' if reduced else ''})",
                      flush=True)
            section["measurements"] += group
        for leaf in inputs.leaves:
            leaf.grad = None
        del inputs, contenders
        gc.collect()
        synchronize(device)
        if device == "cuda":
            torch.cuda.empty_cache()
    smoothce.empty_cache()
    section["elapsed_s"] = round(time.perf_counter() - started, 1)
    reduced = sum(1 for row in section["measurements"] if row["reduced_runs"])
    section["runs_policy"] = (f"{planner.runs} timed runs per measurement after warm-up (fixed)." if fixed else
                              f"adaptive, as the main table, within a {budget:.0f} s budget for the variant rows"
                              + (f"; {reduced} of {len(section['measurements'])} measurements took fewer than "
                                 f"{planner.runs} runs to fit it" if reduced else "") + ".")
    rank = {(v.name, "x".join(map(str, s))): i for i, (v, s) in enumerate(groups)}
    section["cells"].sort(key=lambda cell: rank[(cell["variant"], cell["shape_str"])])
    section["measurements"].sort(key=lambda row: rank[(row["variant"], row["shape_str"])])
    section["checks"].sort(key=lambda check: rank[(check["variant"], check["shape_str"])])
    return report.derive_variants(section)
