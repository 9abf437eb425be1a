"""smoothce.distributed: the vocab-parallel losses, on real gloo process groups of 1 to 4 CPU processes.

Each world size starts its W processes once (tests/_distributed_worker.py; a module-scoped fixture, on
first use) and they run every case of that world size; the tests below read the results back, one test per
case (or per world size for the named tests), so a failure names its case, rank and the difference.

What each rank checks (see the worker): the loss equals smoothce's single-process loss on the concatenated
logits, on every rank; the gradient of the rank's shard (and of its probability-target shard) equals the
matching slice of the single-process gradient; ranks that disagree get an error on every rank, quickly, and
the process group still works afterwards.

DTensor (torch.distributed.tensor) logits on a 1-D device mesh of every rank go through smoothce.cross_entropy,
mixup_cross_entropy and CrossEntropyLoss themselves (dtensor_cases): torchtitan's loss_parallel layout
Shard(class dim), and Replicate(), Shard(0), Shard(2), which smoothce redistributes; targets and weights plain or
DTensor. The loss must be a replicated DTensor equal to the single-process loss on the full tensors, the
gradients DTensors in their tensors' placements whose full_tensor() is the single-process gradient (a plain
probability target's gradient: this rank's torch.chunk piece, zero elsewhere). A 2-D mesh, inplace_backward and
a DTensor on another mesh must raise ValueError on every rank. (gloo has no all_to_all: DTensor falls back.)
The dt-empty-shard cases (worlds 3 and 4: torch.chunk leaves the last rank no classes): an empty shard.
The plain API takes empty shards too (the empty-* cases, worlds 2-4): rank 0's or the last rank's shard (N, 0),
its weight (0,), its probability-target slice (N, 0); explicit vocab_start anywhere in [0, C] for an empty one.

The fused linear form (linear_cases, "lin-*"): vocab_parallel_linear_cross_entropy and its mixup form, the
input (N, H) or (B, T, H) the same on every rank, the output layer's V = 37 rows (V = 1001 as [1, 600, 400] at
world 3) split over the ranks (an empty (0, H) shard included), against smoothce.linear_cross_entropy on the
whole layer: the loss on every rank, the rank's rows of linear_weight.grad / linear_bias.grad, the input's
gradient (with reduce_input_grad=False: each rank's partial sum, all-reduced in the worker), a probability
target's slice; chunk_size 7 (several chunks, each its own all-gather), a second backward (2x), forward only.
Errors: the ranks disagree on the input's shape or on H; one rank's linear_weight has the wrong H.

A known smoothce bug is marked on its case ("xfail", or "crashes" when it kills the process: {backend: reason})
and its test is then xfail(strict=True); a crashing case runs after every other case of its world size, on a
group with a short timeout, and test_workers_exit_cleanly accepts a rank that died in it. None is marked now:
the three found by these cases (an empty shard with probability targets, ranks that disagree on H, all targets
ignored in the fused form) are fixed.

SMOOTHCE_TEST_BACKEND: cpu (default) runs smoothce's CPU kernels; emu runs every smoothce call in the workers
(the vocab-parallel ones and the single-process reference) on the CPU emulation of the CUDA kernels
(tests/emulator.py, with its SMOOTHCE_EMU_ARITH / SMOOTHCE_EMU_SCHEDULE), built once in the pytest process
before the workers start; each result says which kernels ran and the tests check it. Under emu the full case
list runs: about 55-65 s on 2 cores (cpu: about 40-45 s), most of it the processes' start (importing torch,
loading the emulator), not the cases. cuda: skipped (gloo and CPU tensors only).

SMOOTHCE_DIST_STANDIN=1 runs the worker's own stand-in implementation instead of smoothce.distributed: only
to check this harness (the DTensor cases always call smoothce's own functions); the known-bug cases then
XPASS (strict: reported as failures), the stand-in having none of those bugs.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

BACKEND = os.environ.get("SMOOTHCE_TEST_BACKEND", "cpu")
if BACKEND not in ("cpu", "emu"):
    pytest.skip(f"smoothce.distributed runs on CPU tensors (gloo): its tests run with SMOOTHCE_TEST_BACKEND=cpu or "
                f"emu, not {BACKEND!r}", allow_module_level=True)

import torch  # noqa: E402

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this build of torch",
                allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"
WORLDS = (1, 2, 3, 4)
TIMEOUT_S = 240  # hard limit for one world size's processes (they normally take a few seconds)
STANDIN = os.environ.get("SMOOTHCE_DIST_STANDIN") == "1"
EXPECTED_OPS = {"cpu": "smoothce", "emu": "smoothce_emu"}[BACKEND]  # the worker reports which it used

DTYPES = ("float64", "float32", "bfloat16", "float16")
N, C = 16, 37  # C = 37 splits unevenly over 2, 3 and 4 ranks
LN, H = 32, 24  # the fused linear cases: positions and hidden size
LINEAR_DTYPES = ("float64", "float32", "bfloat16")


def even_split(total, world):
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def one_class_first(total, world):
    """A split whose rank 0 holds a single class."""
    return [1] + even_split(total - 1, world - 1) if world > 1 else [total]


# Known bugs of smoothce (see each reason). A case's "xfail" (or "crashes": the bug kills the worker process,
# so such cases run after every other case of their world size) is {backend: reason}, for the backends where
# it fails; its test is then xfail(strict=True), so a fix shows up as an XPASS to clear.
def known(case, key):
    """The reason a case fails (key "xfail") or crashes (key "crashes") on this backend, or None."""
    value = case.get(key)
    return value.get(BACKEND) if isinstance(value, dict) else value


def empty_first(total, world):
    """A split whose rank 0 holds no class (world > 1)."""
    return [0] + even_split(total, world - 1)


def empty_last(total, world):
    """A split whose last rank holds no class (world > 1)."""
    return even_split(total, world - 1) + [0]


# ------------------------------------------------------------------------------------------------ cases

def compare_cases(world):
    """(name, options) of the cases that must match the single-process loss (worker `Case` lists the keys)."""
    cases = []

    def add(name, **options):
        cases.append(dict(options, name=name))

    for dtype in DTYPES:
        for reduction in ("none", "mean", "sum"):
            add(f"basic-{dtype}-{reduction}", dtype=dtype, reduction=reduction, label_smoothing=0.1, seed=1)
    add("eps0-float64-mean", dtype="float64")
    add("eps0-weight-float32-sum", dtype="float32", reduction="sum", weight=True)
    add("eps1-float64-mean", dtype="float64", label_smoothing=1.0)
    add("eps1-weight-float32-none", dtype="float32", reduction="none", label_smoothing=1.0, weight=True)
    for dtype, reduction in (("float64", "mean"), ("float32", "none"), ("bfloat16", "sum"), ("float16", "mean")):
        add(f"weight-{dtype}-{reduction}", dtype=dtype, reduction=reduction, label_smoothing=0.1, weight=True)
    add("ignore-weight-float64-mean", dtype="float64", label_smoothing=0.1, weight=True, ignore_frac=0.3)
    add("ignore-float32-none", dtype="float32", reduction="none", label_smoothing=0.1, ignore_frac=0.3)
    add("ignore-index-5-float64-mean", dtype="float64", label_smoothing=0.1, ignore_index=5, ignore_frac=0.3)
    add("ignore-index-5-uint8-float32-sum", dtype="float32", reduction="sum", label_smoothing=0.1, ignore_index=5,
        ignore_frac=0.3, target_dtype="uint8", weight=True)
    add("ignore-bfloat16-mean", dtype="bfloat16", label_smoothing=0.1, ignore_frac=0.3, weight=True)
    # Every position ignored: mean is 0/0 = NaN, like single-process (compared with equal NaN).
    add("all-ignored-float64-mean", dtype="float64", label_smoothing=0.1, ignore_frac=1.0)
    add("all-ignored-weight-float32-mean", dtype="float32", weight=True, ignore_frac=1.0)
    add("all-ignored-float32-sum", dtype="float32", reduction="sum", label_smoothing=0.1, ignore_frac=1.0)
    add("all-ignored-float64-none", dtype="float64", reduction="none", ignore_frac=1.0)
    add("uint8-float32-mean", dtype="float32", label_smoothing=0.1, target_dtype="uint8")
    # Unbatched (C,) and spatial (N, C, d1, d2).
    add("1d-weight-float64-mean", shape=[C], dtype="float64", label_smoothing=0.1, weight=True)
    add("1d-float32-none", shape=[C], dtype="float32", reduction="none", label_smoothing=0.2)
    add("1d-soft-grad-float64-sum", shape=[C], dtype="float64", reduction="sum", soft=True, soft_grad=True,
        label_smoothing=0.1)
    add("1d-ignored-float64-mean", shape=[C], dtype="float64", ignore_frac=1.0)
    add("4d-weight-float32-mean", shape=[4, C, 3, 2], dtype="float32", label_smoothing=0.1, weight=True)
    add("4d-float64-none", shape=[4, C, 3, 2], dtype="float64", reduction="none", label_smoothing=0.1,
        ignore_frac=0.2)
    add("4d-bfloat16-sum", shape=[4, C, 3, 2], dtype="bfloat16", reduction="sum", label_smoothing=0.1)
    # smoothing='others', target_values, z_loss.
    add("others-float64-mean", dtype="float64", smoothing="others", label_smoothing=0.2)
    add("others-weight-float32-none", dtype="float32", reduction="none", smoothing="others", label_smoothing=0.2,
        weight=True)
    add("others-eps1-float64-sum", dtype="float64", reduction="sum", smoothing="others", label_smoothing=1.0,
        ignore_frac=0.2)
    add("others-float16-mean", dtype="float16", smoothing="others", label_smoothing=0.1)
    add("target-values-float64-mean", dtype="float64", target_values=[0.9, 0.01])
    add("target-values-weight-float32-sum", dtype="float32", reduction="sum", target_values=[0.8, 0.05],
        weight=True, ignore_frac=0.2)
    add("target-values-4d-float64-none", shape=[4, C, 3, 2], dtype="float64", reduction="none",
        target_values=[1.0, 0.02])
    add("zloss-float64-mean", dtype="float64", z_loss=1e-2)
    add("zloss-eps-weight-float32-none", dtype="float32", reduction="none", z_loss=1e-3, label_smoothing=0.1,
        weight=True)
    add("zloss-ignore-float64-sum", dtype="float64", reduction="sum", z_loss=0.05, ignore_frac=0.3)
    add("zloss-bfloat16-mean", dtype="bfloat16", z_loss=1e-2, label_smoothing=0.1)
    add("zloss-others-float64-mean", dtype="float64", z_loss=1e-2, smoothing="others", label_smoothing=0.1)
    # Probability targets (this rank's slice of them), with and without requires_grad.
    add("soft-float64-mean", dtype="float64", soft=True, label_smoothing=0.1)
    add("soft-grad-weight-float64-mean", dtype="float64", soft=True, soft_grad=True, label_smoothing=0.1,
        weight=True)
    add("soft-grad-float32-none", dtype="float32", reduction="none", soft=True, soft_grad=True,
        label_smoothing=0.2)
    add("soft-weight-zloss-float32-sum", dtype="float32", reduction="sum", soft=True, weight=True, z_loss=1e-2)
    add("soft-bfloat16-mean", dtype="bfloat16", soft=True, label_smoothing=0.1)
    add("soft-grad-4d-float64-none", shape=[4, C, 3, 2], dtype="float64", reduction="none", soft=True,
        soft_grad=True, label_smoothing=0.1)
    # Mixup: float lam and per-position tensor lam.
    add("mixup-float-weight-float64-mean", dtype="float64", mixup="float", lam=0.7, label_smoothing=0.1,
        weight=True)
    add("mixup-float-ignore-float32-sum", dtype="float32", reduction="sum", mixup="float", lam=0.3,
        ignore_frac=0.25)
    add("mixup-float-zloss-bfloat16-mean", dtype="bfloat16", mixup="float", lam=0.6, label_smoothing=0.1,
        z_loss=1e-2)
    add("mixup-tensor-float64-mean", dtype="float64", mixup="tensor", label_smoothing=0.1)
    add("mixup-tensor-others-float32-none", dtype="float32", reduction="none", mixup="tensor",
        smoothing="others", label_smoothing=0.2)
    add("mixup-tensor-weight-ignore-float64-mean", dtype="float64", mixup="tensor", weight=True, ignore_frac=0.3,
        label_smoothing=0.1)
    add("mixup-tensor-4d-float64-mean", shape=[4, C, 3, 2], dtype="float64", mixup="tensor", lam_shape=[4, 1, 1],
        label_smoothing=0.1)
    add("mixup-target-values-float64-sum", dtype="float64", reduction="sum", mixup="float", lam=0.4,
        target_values=[0.9, 0.02])
    # Where the shards lie: explicit vocab_start/num_classes, a non-contiguous shard, an explicit group.
    add("explicit-weight-float64-mean", dtype="float64", explicit=True, label_smoothing=0.1, weight=True)
    add("explicit-mixup-float32-none", dtype="float32", reduction="none", explicit=True, mixup="tensor",
        label_smoothing=0.1)
    add("explicit-soft-grad-float64-sum", dtype="float64", reduction="sum", explicit=True, soft=True,
        soft_grad=True, label_smoothing=0.1)
    add("transposed-shard-float32-mean", dtype="float32", transposed=True, label_smoothing=0.1, weight=True)
    add("group-all-float64-mean", dtype="float64", group="all", label_smoothing=0.1, weight=True)
    # inplace_backward: the gradient written over the shard (a copy's for (N, C, d1, d2)), every reduction.
    add("inplace-weight-float32-mean", dtype="float32", inplace=True, label_smoothing=0.1, weight=True)
    add("inplace-zloss-float64-none", dtype="float64", reduction="none", inplace=True, label_smoothing=0.1,
        z_loss=1e-2, ignore_frac=0.2)
    add("inplace-mixup-bfloat16-sum", dtype="bfloat16", reduction="sum", inplace=True, mixup="tensor",
        label_smoothing=0.1)
    add("inplace-soft-4d-float64-mean", shape=[4, C, 3, 2], dtype="float64", inplace=True, soft=True,
        label_smoothing=0.1)
    # Forward only (the logits do not require grad), and the probability target's gradient alone.
    add("forward-only-weight-float32-mean", dtype="float32", grad=False, label_smoothing=0.1, weight=True)
    add("forward-only-mixup-float64-none", dtype="float64", reduction="none", grad=False, mixup="tensor",
        label_smoothing=0.1)
    add("soft-grad-only-float64-mean", dtype="float64", grad=False, soft=True, soft_grad=True,
        label_smoothing=0.1)
    if world > 1:
        # The shards tile [0, C) in reverse rank order: legal with explicit vocab_start.
        sizes = even_split(C, world)
        starts = [sum(sizes[r + 1:]) for r in range(world)]
        add("explicit-reversed-float64-mean", dtype="float64", explicit=True, split=sizes, vocab_starts=starts,
            label_smoothing=0.1, weight=True)
        add("explicit-reversed-soft-grad-float32-none", dtype="float32", reduction="none", explicit=True,
            split=sizes, vocab_starts=starts, soft=True, soft_grad=True, label_smoothing=0.1)
        # A rank holding a single class (and, with C = world, every rank holding one).
        single = one_class_first(C, world)
        add("single-class-rank-float64-mean", dtype="float64", split=single, label_smoothing=0.1, weight=True)
        add("single-class-rank-float32-none", dtype="float32", reduction="none", split=single,
            label_smoothing=0.1, z_loss=1e-3)
        add("single-class-rank-others-float64-sum", dtype="float64", reduction="sum", split=single,
            smoothing="others", label_smoothing=0.2)
        add("single-class-rank-soft-grad-float64-mean", dtype="float64", split=single, soft=True,
            soft_grad=True, label_smoothing=0.1)
        add("single-class-rank-mixup-float32-mean", dtype="float32", split=single, mixup="tensor",
            label_smoothing=0.1)
        add("single-class-rank-explicit-bfloat16-mean", dtype="bfloat16", split=single, explicit=True,
            label_smoothing=0.1)
        add("one-class-per-rank-float64-mean", shape=[N, world], dtype="float64", label_smoothing=0.1,
            weight=True)
        add("one-class-per-rank-others-float32-none", shape=[N, world], dtype="float32", reduction="none",
            smoothing="others", label_smoothing=0.1)
        # A rank with no classes at all (shape (N, 0); its weight (0,), its probability-target slice (N, 0)):
        # rank 0, or the last rank.
        for where, split in (("first", empty_first(C, world)), ("last", empty_last(C, world))):
            for dtype, reduction in (("float64", "none"), ("float32", "mean"), ("float64", "sum")):
                add(f"empty-{where}-weight-{dtype}-{reduction}", dtype=dtype, reduction=reduction, split=split,
                    weight=True, label_smoothing=0.1)
            add(f"empty-{where}-soft-grad-weight-float64-mean", dtype="float64", split=split, soft=True,
                soft_grad=True, weight=True, label_smoothing=0.1)
            add(f"empty-{where}-soft-grad-float32-none", dtype="float32", reduction="none", split=split, soft=True,
                soft_grad=True, label_smoothing=0.2)
            add(f"empty-{where}-soft-float64-sum", dtype="float64", reduction="sum", split=split, soft=True,
                label_smoothing=0.1)
            add(f"empty-{where}-mixup-tensor-weight-float64-mean", dtype="float64", split=split, mixup="tensor",
                weight=True, label_smoothing=0.1)
            add(f"empty-{where}-mixup-tensor-float32-sum", dtype="float32", reduction="sum", split=split,
                mixup="tensor", ignore_frac=0.2)
            add(f"empty-{where}-others-zloss-float64-mean", dtype="float64", split=split, smoothing="others",
                label_smoothing=0.2, z_loss=1e-2)
            add(f"empty-{where}-ignore-bfloat16-mean", dtype="bfloat16", split=split, ignore_frac=0.3,
                label_smoothing=0.1, weight=True)
            add(f"empty-{where}-4d-float64-none", shape=[4, C, 3, 2], dtype="float64", reduction="none",
                split=split, label_smoothing=0.1, weight=True)
            # Explicit placement: contiguous starts (the empty rank's is 0 first, C last).
            add(f"empty-{where}-explicit-weight-float64-mean", dtype="float64", split=split, explicit=True,
                weight=True, label_smoothing=0.1)
        # An empty shard's vocab_start may be any class in [0, C]: 0, C or one in the middle, whichever rank.
        split = empty_last(C, world)
        starts = [sum(split[:r]) for r in range(world)]
        for value in (0, C // 2):
            add(f"empty-last-explicit-start-{value}-soft-grad-float64-sum", dtype="float64", reduction="sum",
                split=split, explicit=True, vocab_starts=starts[:-1] + [value], soft=True, soft_grad=True,
                weight=True, label_smoothing=0.1)
        split = empty_first(C, world)
        add(f"empty-first-explicit-start-{C}-mixup-float32-none", dtype="float32", reduction="none", split=split,
            explicit=True, vocab_starts=[C] + [sum(split[:r]) for r in range(1, world)], mixup="tensor",
            weight=True, label_smoothing=0.1)
    if world >= 3:
        # Two ranks without classes (world 3: only the middle one holds any).
        split = [0] + even_split(C, world - 2) + [0]
        add("two-empty-weight-float64-mean", dtype="float64", split=split, weight=True, label_smoothing=0.1)
        add("two-empty-soft-grad-float32-none", dtype="float32", reduction="none", split=split, soft=True,
            soft_grad=True, label_smoothing=0.1)
    if world >= 3:
        # A group of some ranks only (group ranks != global ranks; the others skip the case).
        members = [1, 2] if world == 3 else [1, 3]
        add("subgroup-float64-mean", dtype="float64", group=members, label_smoothing=0.1, weight=True)
        add("subgroup-soft-grad-float32-none", dtype="float32", reduction="none", group=members, soft=True,
            soft_grad=True, label_smoothing=0.1)
    if world == 3:
        # C = 1001 over 3 ranks, unevenly: [1, 600, 400].
        big = dict(shape=[8, 1001], split=[1, 600, 400])
        for dtype in DTYPES:
            add(f"c1001-weight-{dtype}-mean", dtype=dtype, label_smoothing=0.1, weight=True, **big)
        add("c1001-float32-none", dtype="float32", reduction="none", label_smoothing=0.1, **big)
        add("c1001-zloss-ignore-float64-sum", dtype="float64", reduction="sum", label_smoothing=0.1, z_loss=1e-2,
            ignore_frac=0.25, **big)
        add("c1001-others-float32-mean", dtype="float32", smoothing="others", label_smoothing=0.1, **big)
        add("c1001-target-values-float64-none", dtype="float64", reduction="none", target_values=[0.9, 1e-4],
            **big)
        add("c1001-soft-grad-float64-mean", dtype="float64", soft=True, soft_grad=True, label_smoothing=0.1,
            **big)
        add("c1001-mixup-tensor-float32-sum", dtype="float32", reduction="sum", mixup="tensor",
            label_smoothing=0.1, weight=True, **big)
        add("c1001-explicit-float64-mean", dtype="float64", explicit=True, label_smoothing=0.1, **big)
        add("c1001-4d-float32-mean", dtype="float32", shape=[2, 1001, 2, 2], split=[1, 600, 400],
            label_smoothing=0.1)
        add("c1001-explicit-reversed-bfloat16-none", dtype="bfloat16", reduction="none", explicit=True,
            shape=[8, 1001], split=[1, 600, 400], vocab_starts=[1000, 400, 0], label_smoothing=0.1)
    return cases


def linear_cases(world):
    """(name, options) of the fused linear cases (kind "linear"; worker `Case` lists the keys): the input
    (N, H) or (B, T, H), the output layer's V = C = 37 rows split over the ranks; each must match
    smoothce.linear_cross_entropy (linear_mixup_cross_entropy) on the whole layer."""
    cases = []

    def add(name, **options):
        cases.append(dict(options, name=f"lin-{name}", kind="linear", seed=300 + len(cases)))

    flat, bt = [LN, H], [4, 8, H]  # 32 positions either way; H = 24
    for dtype in LINEAR_DTYPES:
        for reduction in ("none", "mean", "sum"):
            add(f"basic-{dtype}-{reduction}", shape=flat, dtype=dtype, reduction=reduction, label_smoothing=0.1)
    add("eps0-float64-mean", shape=flat, dtype="float64")
    add("eps0-weight-float32-sum", shape=flat, dtype="float32", reduction="sum", weight=True)
    add("n40-h32-float32-mean", shape=[40, 32], dtype="float32", label_smoothing=0.1, bias=True, weight=True)
    add("n24-h16-chunk7-float64-none", shape=[24, 16], dtype="float64", reduction="none", chunk_size=7,
        label_smoothing=0.1)
    add("3d-float64-none", shape=bt, dtype="float64", reduction="none", label_smoothing=0.1)
    add("3d-weight-bias-float32-mean", shape=bt, dtype="float32", label_smoothing=0.1, weight=True, bias=True)
    add("3d-bfloat16-sum", shape=bt, dtype="bfloat16", reduction="sum", label_smoothing=0.1)
    add("weight-float64-mean", shape=flat, dtype="float64", label_smoothing=0.1, weight=True)
    add("weight-bias-float32-none", shape=flat, dtype="float32", reduction="none", label_smoothing=0.1,
        weight=True, bias=True)
    add("bias-float64-sum", shape=flat, dtype="float64", reduction="sum", label_smoothing=0.1, bias=True)
    add("bias-weight-bfloat16-mean", shape=flat, dtype="bfloat16", label_smoothing=0.1, bias=True, weight=True)
    add("others-float64-mean", shape=flat, dtype="float64", smoothing="others", label_smoothing=0.2)
    add("others-weight-float32-none", shape=flat, dtype="float32", reduction="none", smoothing="others",
        label_smoothing=0.2, weight=True)
    add("target-values-float64-mean", shape=flat, dtype="float64", target_values=[0.9, 0.01])
    add("target-values-ignore-bias-float32-sum", shape=bt, dtype="float32", reduction="sum",
        target_values=[0.8, 0.05], ignore_frac=0.2, bias=True)
    add("zloss-float64-mean", shape=flat, dtype="float64", z_loss=1e-2)
    add("zloss-eps-weight-float32-none", shape=flat, dtype="float32", reduction="none", z_loss=1e-3,
        label_smoothing=0.1, weight=True)
    add("zloss-bfloat16-mean", shape=flat, dtype="bfloat16", z_loss=1e-2, label_smoothing=0.1)
    add("ignore-float64-mean", shape=flat, dtype="float64", label_smoothing=0.1, ignore_frac=0.3, weight=True)
    add("ignore-index-5-float32-none", shape=bt, dtype="float32", reduction="none", label_smoothing=0.1,
        ignore_index=5, ignore_frac=0.3)
    # Every position ignored: mean is 0/0 = NaN (like single-process; NaN compared equal).
    add("all-ignored-float64-mean", shape=flat, dtype="float64", label_smoothing=0.1, ignore_frac=1.0)
    add("all-ignored-weight-bias-float32-mean", shape=flat, dtype="float32", weight=True, bias=True,
        ignore_frac=1.0)
    add("all-ignored-forward-only-float32-mean", shape=flat, dtype="float32", grad=False, ignore_frac=1.0,
        label_smoothing=0.1)
    add("all-ignored-float64-none", shape=flat, dtype="float64", reduction="none", ignore_frac=1.0, bias=True)
    add("all-ignored-float64-sum", shape=flat, dtype="float64", reduction="sum", label_smoothing=0.1,
        ignore_frac=1.0)
    # Probability targets (this rank's slice (..., V_local)), with and without requires_grad.
    add("soft-grad-float64-mean", shape=flat, dtype="float64", soft=True, soft_grad=True, label_smoothing=0.1)
    add("soft-grad-weight-bias-float32-none", shape=flat, dtype="float32", reduction="none", soft=True,
        soft_grad=True, weight=True, bias=True, label_smoothing=0.1)
    add("soft-grad-3d-float64-sum", shape=bt, dtype="float64", reduction="sum", soft=True, soft_grad=True,
        z_loss=1e-2)
    add("soft-float32-mean", shape=flat, dtype="float32", soft=True, label_smoothing=0.1)
    add("soft-grad-bfloat16-mean", shape=flat, dtype="bfloat16", soft=True, soft_grad=True, label_smoothing=0.1)
    # Mixup: float lam and per-position tensor lam.
    add("mixup-float-weight-float64-mean", shape=flat, dtype="float64", mixup="float", lam=0.7,
        label_smoothing=0.1, weight=True)
    add("mixup-float-ignore-float32-sum", shape=flat, dtype="float32", reduction="sum", mixup="float", lam=0.3,
        ignore_frac=0.25, bias=True)
    add("mixup-float-bfloat16-mean", shape=flat, dtype="bfloat16", mixup="float", lam=0.6, label_smoothing=0.1)
    add("mixup-tensor-float64-none", shape=flat, dtype="float64", reduction="none", mixup="tensor",
        label_smoothing=0.1, z_loss=1e-3)
    add("mixup-tensor-weight-bias-ignore-float32-mean", shape=flat, dtype="float32", mixup="tensor",
        weight=True, bias=True, ignore_frac=0.3, label_smoothing=0.1)
    add("mixup-tensor-3d-others-float64-mean", shape=bt, dtype="float64", mixup="tensor", smoothing="others",
        label_smoothing=0.2)
    # Several chunks (chunk_size 7 of 32 positions: 5 chunks, each its own all-gather).
    add("chunk7-float64-mean", shape=flat, dtype="float64", chunk_size=7, label_smoothing=0.1, weight=True)
    add("chunk7-bias-float32-none", shape=flat, dtype="float32", reduction="none", chunk_size=7,
        label_smoothing=0.1, bias=True)
    add("chunk7-3d-float64-sum", shape=bt, dtype="float64", reduction="sum", chunk_size=7, label_smoothing=0.1,
        ignore_frac=0.2, z_loss=1e-2)
    add("chunk7-soft-grad-float64-mean", shape=flat, dtype="float64", chunk_size=7, soft=True, soft_grad=True,
        label_smoothing=0.1)
    add("chunk7-mixup-tensor-float32-mean", shape=flat, dtype="float32", chunk_size=7, mixup="tensor",
        weight=True, label_smoothing=0.1)
    add("chunk7-bfloat16-mean", shape=bt, dtype="bfloat16", chunk_size=7, label_smoothing=0.1, bias=True)
    # fp32_grad_weight=False: bf16 gradients of the output layer accumulated in bf16 (both sides).
    add("bf16-grad-weight-bfloat16-mean", shape=flat, dtype="bfloat16", fp32_grad_weight=False,
        label_smoothing=0.1, bias=True)
    add("bf16-grad-weight-chunk7-bfloat16-sum", shape=flat, dtype="bfloat16", reduction="sum",
        fp32_grad_weight=False, chunk_size=7, label_smoothing=0.1, weight=True)
    # reduce_input_grad=False: each rank's input gradient is a partial sum; summed over the ranks, the whole.
    add("partial-input-grad-float64-mean", shape=flat, dtype="float64", reduce_input_grad=False,
        label_smoothing=0.1, weight=True)
    add("partial-input-grad-float32-none", shape=bt, dtype="float32", reduction="none", reduce_input_grad=False,
        label_smoothing=0.1, bias=True)
    add("partial-input-grad-mixup-chunk7-float64-sum", shape=flat, dtype="float64", reduction="sum",
        reduce_input_grad=False, mixup="tensor", chunk_size=7, label_smoothing=0.1)
    add("partial-input-grad-bfloat16-mean", shape=flat, dtype="bfloat16", reduce_input_grad=False,
        label_smoothing=0.1)
    # A second backward (retain_graph): every gradient accumulates to twice the single-process one.
    add("twice-float64-mean", shape=flat, dtype="float64", backward_twice=True, label_smoothing=0.1, weight=True,
        bias=True)
    add("twice-float32-none", shape=flat, dtype="float32", reduction="none", backward_twice=True,
        label_smoothing=0.1)
    add("twice-chunk7-float64-sum", shape=bt, dtype="float64", reduction="sum", backward_twice=True, chunk_size=7,
        label_smoothing=0.1, bias=True)
    add("twice-soft-grad-float64-mean", shape=flat, dtype="float64", backward_twice=True, soft=True,
        soft_grad=True, label_smoothing=0.1)
    add("twice-partial-input-grad-mixup-float64-mean", shape=flat, dtype="float64", backward_twice=True,
        reduce_input_grad=False, mixup="float", lam=0.4)
    # Forward only; a frozen input (only the output layer learns); a frozen output layer.
    add("forward-only-float32-mean", shape=flat, dtype="float32", grad=False, label_smoothing=0.1, weight=True)
    add("forward-only-mixup-tensor-float64-none", shape=bt, dtype="float64", reduction="none", grad=False,
        mixup="tensor", label_smoothing=0.1, bias=True)
    add("no-grad-mode-float64-sum", shape=flat, dtype="float64", reduction="sum", no_grad=True,
        label_smoothing=0.1, bias=True)
    add("layer-grad-only-float64-mean", shape=flat, dtype="float64", requires=["linear_weight", "linear_bias"],
        bias=True, label_smoothing=0.1)
    add("input-grad-only-float32-sum", shape=flat, dtype="float32", reduction="sum", requires=["input"],
        bias=True, label_smoothing=0.1)
    add("soft-grad-only-float64-mean", shape=flat, dtype="float64", grad=False, soft=True, soft_grad=True,
        label_smoothing=0.1)
    # Where the shards lie.
    add("explicit-weight-bias-float64-mean", shape=flat, dtype="float64", explicit=True, weight=True, bias=True,
        label_smoothing=0.1)
    add("group-all-float32-mean", shape=flat, dtype="float32", group="all", label_smoothing=0.1)
    if world > 1:
        sizes = even_split(C, world)
        starts = [sum(sizes[r + 1:]) for r in range(world)]
        add("explicit-reversed-soft-grad-float64-none", shape=flat, dtype="float64", reduction="none",
            explicit=True, split=sizes, vocab_starts=starts, soft=True, soft_grad=True, bias=True,
            label_smoothing=0.1)
        add("explicit-reversed-mixup-float32-mean", shape=flat, dtype="float32", explicit=True, split=sizes,
            vocab_starts=starts, mixup="tensor", weight=True, label_smoothing=0.1)
        single = one_class_first(C, world)
        add("single-class-rank-weight-bias-float64-mean", shape=flat, dtype="float64", split=single, weight=True,
            bias=True, label_smoothing=0.1)
        add("single-class-rank-chunk7-float32-none", shape=flat, dtype="float32", reduction="none", split=single,
            chunk_size=7, label_smoothing=0.1, z_loss=1e-3)
        # A rank whose output-layer shard is empty: linear_weight (0, H), bias and class weights (0,), a
        # probability target's slice (..., 0).
        for where, split in (("first", empty_first(C, world)), ("last", empty_last(C, world))):
            add(f"empty-{where}-weight-bias-float64-mean", shape=flat, dtype="float64", split=split, weight=True,
                bias=True, label_smoothing=0.1)
            add(f"empty-{where}-chunk7-float32-none", shape=bt, dtype="float32", reduction="none", split=split,
                chunk_size=7, label_smoothing=0.1, bias=True)
            add(f"empty-{where}-soft-grad-float64-sum", shape=flat, dtype="float64", reduction="sum", split=split,
                soft=True, soft_grad=True, weight=True, label_smoothing=0.1)
            add(f"empty-{where}-mixup-tensor-partial-input-grad-float64-mean", shape=flat, dtype="float64",
                split=split, mixup="tensor", reduce_input_grad=False, label_smoothing=0.1)
            add(f"empty-{where}-bfloat16-mean", shape=flat, dtype="bfloat16", split=split, label_smoothing=0.1)
            add(f"empty-{where}-twice-float64-mean", shape=flat, dtype="float64", split=split, backward_twice=True,
                bias=True, label_smoothing=0.1)
        split = empty_last(C, world)
        add(f"empty-last-explicit-start-{C}-float64-mean", shape=flat, dtype="float64", split=split, explicit=True,
            bias=True, weight=True, label_smoothing=0.1)  # (contiguous: the empty rank's start is C)
        add("empty-last-explicit-start-0-float32-sum", shape=flat, dtype="float32", reduction="sum", split=split,
            explicit=True, vocab_starts=[sum(split[:r]) for r in range(world - 1)] + [0], label_smoothing=0.1)
    if world >= 3:
        members = [1, 2] if world == 3 else [1, 3]
        add("subgroup-bias-float64-mean", shape=flat, dtype="float64", group=members, bias=True,
            label_smoothing=0.1)
    if world == 3:
        # V = 1001 over 3 ranks, unevenly: [1, 600, 400].
        big = dict(classes=1001, split=[1, 600, 400])
        add("c1001-weight-bias-float64-mean", shape=flat, dtype="float64", weight=True, bias=True,
            label_smoothing=0.1, **big)
        add("c1001-chunk7-float32-none", shape=flat, dtype="float32", reduction="none", chunk_size=7,
            label_smoothing=0.1, **big)
        add("c1001-bfloat16-mean", shape=bt, dtype="bfloat16", label_smoothing=0.1, z_loss=1e-3, **big)
        add("c1001-soft-grad-float64-mean", shape=flat, dtype="float64", soft=True, soft_grad=True,
            label_smoothing=0.1, **big)
        add("c1001-mixup-tensor-partial-input-grad-float32-sum", shape=flat, dtype="float32", reduction="sum",
            mixup="tensor", reduce_input_grad=False, label_smoothing=0.1, **big)
        add("c1001-others-float64-mean", shape=bt, dtype="float64", smoothing="others",
            label_smoothing=0.1, **big)
        add("c1001-explicit-reversed-float64-sum", shape=flat, dtype="float64", reduction="sum", explicit=True,
            vocab_starts=[1000, 400, 0], bias=True, label_smoothing=0.1, **big)
    return cases


def linear_error_cases(world):
    """The fused form with ranks that disagree: every rank calls it; every rank raises (no hang)."""
    if world == 1:
        return []
    last = str(world - 1)
    base = dict(kind="linear_error", dtype="float32", shape=[LN, H], label_smoothing=0.1, seed=17)
    return [
        # The input (the same tensor on every rank, by contract) differs in shape on the last rank.
        dict(base, name="lin-disagree-input-shape", per_rank={last: {"shape": [LN - 1, H]}},
             match=r"shape|position|size"),
        # The same positions, shaped differently (the targets' values agree, their shapes do not).
        dict(base, name="lin-disagree-input-shape-3d", shape=[4, 8, H], per_rank={last: {"shape": [8, 4, H]}},
             match=r"shape|position|size"),
        # The last rank's input AND its linear_weight have H + 1 columns: each rank's own arguments are
        # consistent, the ranks disagree on H (the input's gradient could not be all-reduced).
        dict(base, name="lin-disagree-hidden-size", per_rank={last: {"shape": [LN, H + 1]}},
             match=r"shape|hidden|H\b|size|input"),
        # Only the last rank's linear_weight has the wrong H: it raises its own ValueError (naming
        # linear_weight), the others a RuntimeError naming the rank that failed.
        dict(base, name="lin-one-rank-wrong-hidden-size", bias=True, raises=["RuntimeError"],
             match=rf"\b{last}\b", per_rank={last: {"bad_hidden": True, "raises": ["ValueError"],
                                                   "match": r"linear_weight"}}),
    ]


def wrong_formula_cases(world):
    """ε > 0 over uneven shards (one with a single class): a local class count or a local sum gives a
    clearly different loss (the worker checks that it does, and that the vocab-parallel loss is the right one)."""
    if world == 1:
        return []
    shape, split = ([8, 1001], [1, 600, 400]) if world == 3 else ([N, C], one_class_first(C, world))
    common = dict(shape=shape, split=split, dtype="float64", reduction="mean", label_smoothing=0.1, seed=5)
    return [dict(common, name="smoothing-global-count", check="global_count"),
            dict(common, name="smoothing-global-sum", check="global_sum")]


def error_cases(world):
    """Ranks that disagree: every rank calls the function; every rank must raise (ValueError/RuntimeError
    naming what differs). On rank world-1 (the last) the option differs."""
    if world == 1:
        return []
    last = str(world - 1)
    sizes = even_split(C, world)
    starts = [sum(sizes[:r]) for r in range(world)]
    base = dict(kind="error", dtype="float32", label_smoothing=0.1, seed=7)
    cases = [
        dict(base, name="disagree-target-shape", per_rank={last: {"shape": [N - 1, C]}},
             match=r"shape|position|size"),
        dict(base, name="disagree-label-smoothing", per_rank={last: {"label_smoothing": 0.2}},
             match=r"label.?smoothing"),
        dict(base, name="disagree-reduction", per_rank={last: {"reduction": "sum"}}, match=r"reduction"),
        dict(base, name="disagree-ignore-index", per_rank={last: {"ignore_index": -1}}, match=r"ignore.?index"),
        dict(base, name="disagree-z-loss", per_rank={last: {"z_loss": 1e-3}}, match=r"z.?loss"),
        dict(base, name="disagree-smoothing", per_rank={last: {"smoothing": "others"}}, match=r"smoothing"),
        dict(base, name="disagree-dtype", per_rank={last: {"dtype": "float64"}}, match=r"dtype|float"),
        # Explicit placement that does not tile [0, C): the last shard overlaps its neighbour (and the last
        # class is missing); the last shard starts one class late (a gap); the ranks disagree on C.
        dict(base, name="vocab-overlap", explicit=True, split=sizes,
             vocab_starts=starts[:-1] + [starts[-1] - 1], match=r"vocab|num_classes|overlap|gap|tile|cover|shard"),
        dict(base, name="vocab-gap", explicit=True, split=sizes[:-1] + [sizes[-1] - 1],
             vocab_starts=starts[:-1] + [starts[-1] + 1], match=r"vocab|num_classes|overlap|gap|tile|cover|shard"),
        dict(base, name="disagree-num-classes", explicit=True, per_rank={last: {"num_classes": C + 1}},
             match=r"vocab|num_classes|class|tile|cover|shard"),
        # Some ranks place their shard explicitly, the last one relies on the default.
        dict(base, name="disagree-explicit-placement", explicit=True, per_rank={last: {"explicit": False}},
             match=r"vocab_start|num_classes"),
    ]
    return cases


def bad_input_cases(world):
    """The same bad input on every rank: each rank must raise (no collective needed to see it)."""
    base = dict(kind="bad", dtype="float32", label_smoothing=0.1, seed=9, raises=["IndexError", "ValueError"])
    cases = [dict(base, name="bad-target-too-large", bad_target=C, match=r"target|class|index|bound|range"),
             dict(base, name="bad-target-negative", bad_target=-3, match=r"target|class|index|bound|range"),
             dict(base, name="bad-target-too-large-explicit", bad_target=C, explicit=True,
                  match=r"target|class|index|bound|range"),
             dict(base, name="bad-vocab-start-without-num-classes", explicit="start_only",
                  raises=["ValueError", "TypeError"], match=r"vocab_start|num_classes"),
             dict(base, name="bad-mixup-target-b-too-large", mixup="float", lam=0.5, bad_target_b=C + 5,
                  match=r"target|class|index|bound|range")]
    return cases


def dtensor_cases(world):
    """DTensor logits through smoothce.cross_entropy / mixup_cross_entropy / CrossEntropyLoss (kind "dtensor";
    worker `Case` lists the keys): the loss and the gradients' full_tensor() match the single-process ones."""
    cases = []

    def add(name, **options):
        cases.append(dict(options, name=f"dt-{name}", kind="dtensor", seed=100 + len(cases)))

    # torchtitan's loss_parallel layout: Shard(class dim) (C = 37: uneven over 2, 3 and 4 ranks).
    for dtype in ("float64", "float32"):
        for reduction in ("none", "mean", "sum"):
            add(f"shard1-{dtype}-{reduction}", dtype=dtype, reduction=reduction, label_smoothing=0.1)
    add("shard1-bfloat16-mean", dtype="bfloat16", label_smoothing=0.1)
    add("shard1-weight-float64-mean", dtype="float64", label_smoothing=0.1, weight=True)
    add("shard1-weight-dtensor-float32-sum", dtype="float32", reduction="sum", label_smoothing=0.1, weight=True,
        weight_placement="shard:0")
    add("shard1-weight-replicated-dtensor-float64-none", dtype="float64", reduction="none", weight=True,
        weight_placement="replicate", ignore_frac=0.2)
    add("shard1-target-dtensor-float64-mean", dtype="float64", label_smoothing=0.1, target_placement="replicate")
    add("shard1-target-dtensor-shard0-float32-none", dtype="float32", reduction="none", label_smoothing=0.1,
        target_placement="shard:0", weight=True, weight_placement="shard:0")
    add("shard1-ignore-index-5-float64-mean", dtype="float64", label_smoothing=0.1, ignore_index=5, ignore_frac=0.3,
        weight=True)
    add("shard1-all-ignored-float64-mean", dtype="float64", label_smoothing=0.1, ignore_frac=1.0)
    add("shard1-others-zloss-float64-mean", dtype="float64", smoothing="others", label_smoothing=0.2, z_loss=1e-2)
    add("shard1-target-values-float32-sum", dtype="float32", reduction="sum", target_values=[0.9, 0.01])
    add("shard1-forward-only-float32-mean", dtype="float32", label_smoothing=0.1, grad=False)
    add("1d-shard0-weight-float64-mean", shape=[C], dtype="float64", label_smoothing=0.1, weight=True)
    add("1d-shard0-weight-dtensor-float32-none", shape=[C], dtype="float32", reduction="none", label_smoothing=0.2,
        weight=True, weight_placement="shard:0")
    add("4d-shard1-weight-float32-mean", shape=[4, C, 3, 2], dtype="float32", label_smoothing=0.1, weight=True)
    add("4d-shard1-float64-none", shape=[4, C, 3, 2], dtype="float64", reduction="none", label_smoothing=0.1,
        ignore_frac=0.2, target_placement="replicate")
    # Probability targets, requires_grad: a DTensor Shard(class dim) (loss_parallel) or the plain full tensor.
    add("soft-dtensor-grad-float64-mean", dtype="float64", soft=True, soft_grad=True, label_smoothing=0.1,
        target_placement="shard:class", weight=True, weight_placement="shard:0")
    add("soft-plain-grad-float64-none", dtype="float64", reduction="none", soft=True, soft_grad=True,
        label_smoothing=0.1)
    add("soft-plain-grad-weight-float32-sum", dtype="float32", reduction="sum", soft=True, soft_grad=True,
        weight=True)
    add("soft-dtensor-float32-mean", dtype="float32", soft=True, target_placement="shard:class", z_loss=1e-2)
    add("soft-dtensor-grad-4d-float64-sum", shape=[4, C, 3, 2], dtype="float64", reduction="sum", soft=True,
        soft_grad=True, target_placement="shard:class", label_smoothing=0.1)
    add("1d-soft-dtensor-grad-float64-mean", shape=[C], dtype="float64", soft=True, soft_grad=True,
        target_placement="shard:class", label_smoothing=0.1)
    # Mixup with a float lam (targets plain or DTensor).
    add("mixup-float-float64-mean", dtype="float64", mixup="float", lam=0.7, label_smoothing=0.1, weight=True)
    add("mixup-float-dtensor-targets-float32-none", dtype="float32", reduction="none", mixup="float", lam=0.3,
        target_placement="replicate", target_b_placement="shard:0", weight=True, weight_placement="shard:0",
        ignore_frac=0.2)
    add("mixup-float-bfloat16-sum", dtype="bfloat16", reduction="sum", mixup="float", lam=0.6, label_smoothing=0.1)
    add("mixup-tensor-float64-mean", dtype="float64", mixup="tensor", label_smoothing=0.1)
    # smoothce.CrossEntropyLoss.
    add("module-float32-mean", dtype="float32", api="module", label_smoothing=0.1)
    add("module-weight-dtensor-float64-sum", dtype="float64", api="module", reduction="sum", label_smoothing=0.1,
        weight=True, weight_placement="shard:0")
    # Other placements of the logits: redistributed to Shard(class dim); the gradient comes back in theirs.
    add("replicate-float64-mean", placement="replicate", dtype="float64", label_smoothing=0.1)
    add("replicate-weight-float32-none", placement="replicate", dtype="float32", reduction="none",
        label_smoothing=0.1, weight=True)
    add("replicate-soft-plain-grad-float64-sum", placement="replicate", dtype="float64", reduction="sum", soft=True,
        soft_grad=True, label_smoothing=0.1)
    add("replicate-mixup-float-float32-mean", placement="replicate", dtype="float32", mixup="float", lam=0.4,
        label_smoothing=0.1)
    add("shard0-float64-sum", placement="shard:0", dtype="float64", reduction="sum", label_smoothing=0.1)
    add("shard0-weight-dtensor-float32-mean", placement="shard:0", dtype="float32", label_smoothing=0.1,
        weight=True, weight_placement="shard:0")
    add("shard0-uneven-rows-float64-none", placement="shard:0", shape=[10, C], dtype="float64", reduction="none",
        label_smoothing=0.1, target_placement="shard:0")
    add("shard0-soft-dtensor-grad-float64-mean", placement="shard:0", dtype="float64", soft=True, soft_grad=True,
        target_placement="shard:0", label_smoothing=0.1)
    add("shard0-module-bfloat16-mean", placement="shard:0", dtype="bfloat16", api="module", label_smoothing=0.1)
    add("4d-shard0-float32-mean", placement="shard:0", shape=[4, C, 3, 2], dtype="float32", label_smoothing=0.1)
    add("4d-shard2-float64-none", placement="shard:2", shape=[4, C, 3, 2], dtype="float64", reduction="none",
        label_smoothing=0.1)
    add("1d-replicate-float64-sum", placement="replicate", shape=[C], dtype="float64", reduction="sum",
        label_smoothing=0.1, weight=True)
    add("1d-replicate-target-dtensor-float32-mean", placement="replicate", shape=[C], dtype="float32",
        label_smoothing=0.1, target_placement="replicate", weight=True, weight_placement="replicate")
    add("1d-replicate-soft-plain-grad-float64-none", placement="replicate", shape=[C], dtype="float64",
        reduction="none", soft=True, soft_grad=True, label_smoothing=0.1)
    if world >= 3:
        # torch.chunk leaves the last rank no classes (C = 2(W-1) in pieces of 2): an empty shard, a legal
        # Shard(1) layout, which the loss takes like any other.
        empty = dict(shape=[N, 2 * (world - 1)], dtype="float64", label_smoothing=0.1)
        add("empty-shard-float64-mean", **empty)
        add("empty-shard-weight-dtensor-soft-grad-float64-none", reduction="none", weight=True,
            weight_placement="shard:0", soft=True, soft_grad=True, target_placement="shard:class", **empty)
    return cases


def dtensor_error_cases(world):
    """The same unsupported DTensor call on every rank: ValueError on every rank, and the group still works."""
    base = dict(kind="dtensor_error", dtype="float32", label_smoothing=0.1, seed=21)
    cases = [dict(base, name="dt-error-inplace-backward", dt_error="inplace", match=r"inplace"),
             dict(base, name="dt-error-target-other-mesh", dt_error="other_mesh", match=r"mesh"),
             dict(base, name="dt-error-weight-other-mesh", dt_error="other_mesh_weight", weight=True,
                  weight_placement="shard:0", match=r"mesh")]
    if world == 4:
        cases.append(dict(base, name="dt-error-2d-mesh", dt_error="mesh2d", match=r"mesh|1-D|2-D"))
    return cases


def cases_for(world):
    cases = compare_cases(world) + wrong_formula_cases(world) + dtensor_cases(world) + linear_cases(world)
    errors = error_cases(world) + bad_input_cases(world) + dtensor_error_cases(world) + linear_error_cases(world)
    after = [dict(name="after-errors-short-group", dtype="float64", group="short", label_smoothing=0.1,
                  weight=True, seed=11),
             dict(name="after-errors-default-group", dtype="float32", label_smoothing=0.1, seed=12)]
    last = []
    if world > 1:
        # The hardest disagreement last: only one rank's own inputs are wrong (a weight too many), so a
        # rank-local check that raises before the collective would leave the other ranks waiting.
        last = [dict(kind="error", name="one-rank-bad-weight", dtype="float32", weight=True, label_smoothing=0.1,
                     per_rank={str(world - 1): {"weight_extra": True, "match": r"weight"}},
                     match=r"weight|rank", seed=13)]  # the others may just name the rank that failed
    cases = cases + errors + after + last
    # Cases that crash the worker on this backend (a known bug) run last, so that every other case has run.
    # They run on a group with a short timeout (the worker's crash_group), so the ranks left waiting give up soon.
    cases = [c for c in cases if not known(c, "crashes")] + [dict(c, crash_group=True) for c in cases
                                                             if known(c, "crashes")]
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


CASES = {world: cases_for(world) for world in WORLDS}


def group_members(case, world):
    group = case.get("group")
    return sorted(group) if isinstance(group, list) else list(range(world))


# ---------------------------------------------------------------------------------------------- launching

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorldRun:
    """The results of one world size's processes: results[(name, rank)] -> dict."""

    def __init__(self, world, directory):
        self.world = world
        self.directory = directory
        self.results = {}
        self.returncodes = []
        self.timed_out = False
        self.seconds = 0.0
        self.logs = []

    def launch(self):
        cases_file = self.directory / "cases.json"
        cases_file.write_text(json.dumps(CASES[self.world]))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        for attempt in range(3):
            out = self.directory / f"results{attempt}"
            out.mkdir()
            port = free_port()
            self._run(port, cases_file, out, env, attempt)
            address_in_use = any("address already in use" in log.lower() for log in self._log_texts())
            if not (address_in_use and not any(out.iterdir())):
                break
        for path in out.glob("*.json"):
            result = json.loads(path.read_text())
            self.results[(result["name"], result["rank"])] = result

    def _run(self, port, cases_file, out, env, attempt):
        procs, self.logs = [], []
        start = time.monotonic()
        try:
            for rank in range(self.world):
                log = self.directory / f"rank{rank}.try{attempt}.log"
                self.logs.append(log)
                with open(log, "wb") as sink:
                    cmd = [sys.executable, str(WORKER), "--rank", str(rank), "--world", str(self.world),
                           "--port", str(port), "--cases", str(cases_file), "--out", str(out)]
                    if STANDIN:
                        cmd.append("--standin")
                    cmd += ["--backend", BACKEND]
                    procs.append(subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
            deadline = start + TIMEOUT_S
            first_failure = None
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if now > deadline:
                    self.timed_out = True
                    break
                if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                    first_failure = now  # a crashed rank: give the others a little time, then stop them
                if first_failure is not None and now > first_failure + 20:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            self.returncodes = [p.returncode for p in procs]
            self.seconds = time.monotonic() - start

    def _log_texts(self):
        return [log.read_text(errors="replace") if log.exists() else "" for log in self.logs]

    def crashed_in_known_crash(self, rank):
        """The name of the case a crashed rank was running, when that case is known to crash (else None)."""
        text = self._log_texts()[rank] if rank < len(self.logs) else ""
        started = [line.split("] ", 1)[1] for line in text.splitlines() if line.startswith(f"[rank {rank}] ")]
        case = next((c for c in CASES[self.world] if started and c["name"] == started[-1]), None)
        return case["name"] if case is not None and known(case, "crashes") else None

    def why_missing(self, rank):
        text = self._log_texts()[rank] if rank < len(self.logs) else ""
        state = "timed out (killed)" if self.timed_out else f"exit code {self.returncodes[rank]}"
        return f"rank {rank}: no result ({state}); its output ends with:\n{text[-3000:]}"

    def case(self, name):
        """Fails the test unless every rank of the case's group reported the case as passed."""
        case = next(c for c in CASES[self.world] if c["name"] == name)
        failures = []
        for rank in group_members(case, self.world):
            result = self.results.get((name, rank))
            if result is None:
                failures.append(self.why_missing(rank))
            elif result.get("ops") != EXPECTED_OPS:
                failures.append(f"rank {rank}: ran on the kernels {result.get('ops')!r}, not {EXPECTED_OPS!r} "
                                f"(SMOOTHCE_TEST_BACKEND={BACKEND})")
            elif not result["ok"]:
                extra = f"\n{result['traceback']}" if result.get("traceback") else ""
                failures.append(f"rank {rank}: {result.get('error')}{extra}")
        if failures:
            pytest.fail(f"{name} (world size {self.world}):\n" + "\n".join(failures), pytrace=False)
        return {rank: self.results[(name, rank)] for rank in group_members(case, self.world)}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """world size -> its WorldRun; each world size's processes run once, on first use."""
    if BACKEND == "emu":
        # Build (or find up to date) the emulator here, once, before any worker starts: the workers then
        # only load the cached build (build/emu), instead of W processes racing to compile it.
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        import emulator  # noqa: PLC0415

        emulator.load()
    runs = {}

    def get(world):
        if world not in runs:
            run = WorldRun(world, tmp_path_factory.mktemp(f"world{world}"))
            run.launch()
            runs[world] = run
        return runs[world]

    return get


def params(kind_filter):
    def marks(case):
        reason = known(case, "xfail") or known(case, "crashes")
        return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return [pytest.param(world, c["name"], id=f"w{world}-{c['name']}", marks=marks(c))
            for world in WORLDS for c in CASES[world] if kind_filter(c)]


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("world", WORLDS)
def test_workers_exit_cleanly(worlds, world):
    run = worlds(world)
    assert not run.timed_out, f"world size {world}: the processes ran past {TIMEOUT_S} s and were killed"
    # (a rank that died in a case known to crash it, run after all the others, is that case's xfail)
    bad = [run.why_missing(rank) for rank, rc in enumerate(run.returncodes)
           if rc != 0 and not run.crashed_in_known_crash(rank)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("world, name", params(lambda c: c.get("kind", "compare") == "compare"
                                                and not c.get("check")))
def test_matches_single_process(worlds, world, name):
    """Loss on every rank, and each rank's gradient slice, equal smoothce's single-process ones."""
    worlds(world).case(name)


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_returns_the_same_loss(worlds, world):
    """The loss is bit-for-bit the same on every rank of a group (every case that ran)."""
    run = worlds(world)
    differ = []
    for case in CASES[world]:
        if case.get("kind", "compare") not in ("compare", "dtensor", "linear"):
            continue
        losses = {rank: run.results.get((case["name"], rank), {}).get("loss")
                  for rank in group_members(case, world)}
        values = [v for v in losses.values() if v is not None]
        if values and any(v != values[0] for v in values):
            differ.append(f"{case['name']}: " + "; ".join(
                f"rank {r}: {[float.fromhex(h) for h in v][:4]}" for r, v in losses.items() if v is not None))
    assert not differ, "ranks return different losses:\n" + "\n".join(differ)


@pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
def test_smoothing_uses_the_global_class_count(worlds, world):
    """ε/C with C the TOTAL class count: a loss using the rank's own class count (ε/C_r, or Megatron's mean
    over the local shard) is clearly different here, and the vocab-parallel loss is the single-process one."""
    worlds(world).case("smoothing-global-count")


@pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
def test_smoothing_sum_runs_over_all_classes(worlds, world):
    """The smoothing term sums -log p (Σx) over ALL classes: a sum over the local shard only (the
    Transformer-Engine-style bug) is clearly different here, and the vocab-parallel loss is the right one."""
    worlds(world).case("smoothing-global-sum")


def _error_test(name):
    @pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
    def test(worlds, world):
        worlds(world).case(name)
    test.__doc__ = f"Ranks that disagree ({name}): every rank raises, quickly, and the group still works."
    return test


test_ranks_disagree_on_target_shape = _error_test("disagree-target-shape")
test_ranks_disagree_on_label_smoothing = _error_test("disagree-label-smoothing")
test_ranks_disagree_on_reduction = _error_test("disagree-reduction")
test_ranks_disagree_on_ignore_index = _error_test("disagree-ignore-index")
test_ranks_disagree_on_z_loss = _error_test("disagree-z-loss")
test_ranks_disagree_on_smoothing = _error_test("disagree-smoothing")
test_ranks_disagree_on_logits_dtype = _error_test("disagree-dtype")
test_vocab_start_overlap = _error_test("vocab-overlap")
test_vocab_start_gap = _error_test("vocab-gap")
test_ranks_disagree_on_num_classes = _error_test("disagree-num-classes")
test_ranks_disagree_on_explicit_placement = _error_test("disagree-explicit-placement")
test_one_rank_with_a_bad_weight_raises_everywhere = _error_test("one-rank-bad-weight")


@pytest.mark.parametrize("world, name", params(lambda c: c.get("kind") == "bad"))
def test_bad_input_raises_on_every_rank(worlds, world, name):
    """The same bad input on every rank (a target out of the global range [0, C); vocab_start without
    num_classes): IndexError or ValueError (TypeError) on every rank."""
    worlds(world).case(name)


@pytest.mark.parametrize("world", WORLDS)
def test_group_usable_after_errors(worlds, world):
    """After all the error cases, ordinary calls on the same (short-timeout) group and on the default group
    still give the single-process result."""
    run = worlds(world)
    run.case("after-errors-short-group")
    run.case("after-errors-default-group")


# ------------------------------------------------------------------------------------------- DTensor

def _loss_parallel_layout(case):
    placement = case.get("placement", "shard:class")
    class_dim = 0 if len(case.get("shape", [N, C])) == 1 else 1
    return placement in ("shard:class", f"shard:{class_dim}")


@pytest.mark.parametrize("world, name", params(lambda c: c.get("kind") == "dtensor" and _loss_parallel_layout(c)))
def test_dtensor_loss_parallel_layout(worlds, world, name):
    """DTensor logits in torchtitan's loss_parallel layout, Shard(class dim) (C = 37: uneven over 2-4 ranks),
    through smoothce.cross_entropy / mixup_cross_entropy / CrossEntropyLoss: the loss is a replicated DTensor
    whose to_local() and full_tensor() equal the single-process loss on the full tensors; the logits'
    gradient is a DTensor with their placement whose full_tensor() is the single-process gradient (and
    likewise a probability target's, DTensor or plain)."""
    worlds(world).case(name)


@pytest.mark.parametrize("world, name", params(lambda c: c.get("kind") == "dtensor"
                                                and not _loss_parallel_layout(c)))
def test_dtensor_other_placements(worlds, world, name):
    """DTensor logits in another placement (Replicate(), Shard(0) of (N, C), Shard(2)): redistributed to
    Shard(class dim); the same checks, the gradient coming back in the logits' own placement."""
    worlds(world).case(name)


@pytest.mark.parametrize("world, name", params(lambda c: c.get("kind") == "dtensor_error"))
def test_dtensor_unsupported_raises_on_every_rank(worlds, world, name):
    """A 2-D device mesh, inplace_backward=True, a target or weight DTensor on another mesh: ValueError on
    every rank, and the default group still works afterwards."""
    worlds(world).case(name)


# ------------------------------------------------------------------------------------------- fused linear

@pytest.mark.parametrize("world, name", params(lambda c: c.get("kind") == "linear"))
def test_linear_matches_single_process(worlds, world, name):
    """vocab_parallel_linear_cross_entropy (and its mixup form) with the output layer's rows split over the
    ranks: the loss on every rank, each rank's rows of linear_weight.grad and linear_bias.grad, the input's
    gradient (all-reduced, or summed over the ranks with reduce_input_grad=False) and a probability target's
    slice of gradient equal smoothce.linear_cross_entropy's on the whole layer."""
    worlds(world).case(name)


def named_params(name):
    """The world sizes > 1 for the case `name`, xfail(strict) where it is a known failure on this backend."""
    out = []
    for world in WORLDS[1:]:
        case = next(c for c in CASES[world] if c["name"] == name)
        reason = known(case, "xfail") or known(case, "crashes")
        out.append(pytest.param(world, marks=[pytest.mark.xfail(strict=True, reason=reason)] if reason else []))
    return out


@pytest.mark.parametrize("world", named_params("lin-disagree-input-shape"))
def test_linear_ranks_disagree_on_input_shape(worlds, world):
    """The fused form's input differs in shape on one rank: every rank raises, quickly; the group works."""
    worlds(world).case("lin-disagree-input-shape")


@pytest.mark.parametrize("world", named_params("lin-disagree-input-shape-3d"))
def test_linear_ranks_disagree_on_input_shape_3d(worlds, world):
    """(B, T, H) on some ranks, (T, B, H) on another (the same targets' values): every rank raises."""
    worlds(world).case("lin-disagree-input-shape-3d")


@pytest.mark.parametrize("world", named_params("lin-disagree-hidden-size"))
def test_linear_ranks_disagree_on_hidden_size(worlds, world):
    """One rank's input and linear_weight have another H (each consistent on its own): every rank raises,
    quickly (no all-reduce of input gradients of different sizes), and the group still works."""
    worlds(world).case("lin-disagree-hidden-size")


@pytest.mark.parametrize("world", named_params("lin-one-rank-wrong-hidden-size"))
def test_linear_one_rank_wrong_hidden_size(worlds, world):
    """Only the last rank's linear_weight has the wrong H: it raises ValueError naming linear_weight, the
    others RuntimeError naming that rank; none waits for a collective that never comes."""
    worlds(world).case("lin-one-rank-wrong-hidden-size")
