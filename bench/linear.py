"""Fused linear + cross-entropy: smoothce.linear_cross_entropy against torch's
F.linear_cross_entropy, eager F.linear + F.cross_entropy, torch.compile of that, and on CUDA Liger-Kernel's
and Apple's Cut Cross-Entropy fused kernels, each as one fwd+bwd step (gradients of the input and the
linear weight), with the three matmuls alone as the floor.

    python -m bench                     # the standard table and the variants, then this table
    python -m bench --linear-only       # this table only: <out>/<device>-linear.json, .md, .png
    python -m bench --no-linear         # without it

Every (shape, dtype) runs at ε = 0.1 and at ε = 0 (where torch's chunked path applies). Before a group
is timed, smoothce's loss and gradients are checked against eager's; a group that fails is reported and
not timed (and `python -m bench` exits with status 1). Runs are a fixed number of round-robin rounds
(these steps take up to seconds each on a CPU).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import report
from bench.harness import (DTYPES, IGNORED_FRACTION, LABEL_SMOOTHING, MEMORY_METHOD, QUICK_RUNS, TIMING_METHOD,
                           Task, error_reason, import_optional, release_memory, run_rounds, shape_str, synchronize,
                           warm_up)

IGNORE_INDEX = -100
SMOOTHINGS = (LABEL_SMOOTHING, 0.0)  # ε = 0: where torch's chunked path applies
RUNS = 5                             # timed round-robin rounds per group (--runs N overrides)
# Loss and gradients of smoothce against eager's. fp32: eager's own error grows with V (at 512x256x128256,
# ε = 0.1, its grad_input is 3.9e-5 of the largest entry off a float64 run, smoothce's 1.5e-6), so 5e-4;
# bf16/fp16: both round the logits or the gradients to 8/11 bits, in different places.
CHECK_RTOL = {"fp32": 5e-4, "bf16": 3e-2, "fp16": 5e-3}

# (N, H, V, dtype): rows, hidden size, vocabulary. On CPU sized so the whole table (with torch.compile)
# takes about 4 minutes on 2 cores: torch's chunked path alone takes ~5 s a call at V = 128256 fp32 and
# at V = 32000 bf16 whatever N (its chunks number about V/H, each streaming the whole weight). On CUDA
# the shapes of a language model's head.
SHAPES = {
    "cpu": ((2048, 256, 32000, "fp32"), (512, 256, 128256, "fp32"), (1024, 512, 32000, "bf16")),
    "cuda": ((8192, 4096, 128256, "bf16"), (8192, 2048, 32000, "bf16"), (4096, 4096, 128256, "fp32")),
}
QUICK_SHAPES = ((64, 16, 100, "fp32"), (64, 16, 100, "bf16"))

FLOOR = report.LINEAR_FLOOR
TORCH_WARNING = r"linear_cross_entropy: ``options`` ignored"

Loss = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Cell:
    n: int
    h: int
    v: int
    dtype: str

    @property
    def name(self) -> str:
        return shape_str((self.n, self.h, self.v))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * self.torch_dtype.itemsize


@dataclass
class Inputs:
    x: torch.Tensor        # (N, H) leaf requiring grad
    weight: torch.Tensor   # (V, H) leaf requiring grad
    target: torch.Tensor   # (N,) with ~IGNORED_FRACTION of IGNORE_INDEX
    dlogits: torch.Tensor  # (N, V), the floor's preallocated upstream gradient of the logits


@dataclass
class Contender:
    name: str
    loss: Loss
    note: str = ""


def build_inputs(cell: Cell, device: str, seed: int = 0) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = cell.torch_dtype
    x = torch.randn(cell.n, cell.h, generator=generator, device=device).to(dtype)
    # logits ~ N(0, 4): a spread like a trained head's
    weight = (torch.randn(cell.v, cell.h, generator=generator, device=device) * (2 / math.sqrt(cell.h))).to(dtype)
    target = torch.randint(0, cell.v, (cell.n,), generator=generator, device=device)
    target[torch.rand(cell.n, generator=generator, device=device) < IGNORED_FRACTION] = IGNORE_INDEX
    # Filled (not torch.empty): uninitialised memory may hold denormals or NaNs that slow a CPU GEMM.
    dlogits = (torch.randn(cell.n, cell.v, generator=generator, device=device) * 1e-4).to(dtype)
    return Inputs(x.requires_grad_(True), weight.requires_grad_(True), target, dlogits)


def smoothce_chunk_rows(cell: Cell, device: str) -> int:
    """smoothce's default chunk for the cell (the library's own rule, csrc/linear.cpp)."""
    from smoothce import _linear

    return _linear.chunk_rows(cell.n, cell.h, cell.v, cell.torch_dtype, device=device)


@dataclass
class Libraries:
    smoothce: object = None
    torch_options: object = None     # torch.nn.LinearCrossEntropyOptions() or None
    liger_class: object = None
    cce_function: object = None
    versions: dict = None
    reasons: dict = None


def import_libraries(device: str, smoothce, smoothce_reason: Optional[str]) -> Libraries:
    libs = Libraries(smoothce=smoothce, versions={}, reasons={})
    if smoothce is None:
        libs.reasons["smoothce"] = f"smoothce {smoothce_reason}"
    elif not hasattr(smoothce, "linear_cross_entropy"):
        libs.smoothce = None
        libs.reasons["smoothce"] = "this smoothce has no linear_cross_entropy"
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        libs.reasons["torch_lce"] = f"torch {torch.__version__} has no F.linear_cross_entropy with options"
    else:
        libs.torch_options = torch.nn.LinearCrossEntropyOptions()
    if device != "cuda":
        libs.reasons["liger"] = libs.reasons["cce"] = "CUDA only"
        return libs
    libs.liger_class = import_optional(libs.versions, libs.reasons, "liger", "liger_kernel",
                                       "liger_kernel.transformers.fused_linear_cross_entropy",
                                       "LigerFusedLinearCrossEntropyLoss")
    libs.cce_function = import_optional(libs.versions, libs.reasons, "cce", "cut_cross_entropy", "cut_cross_entropy",
                                        "linear_cross_entropy")
    return libs


def takes_keyword(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def torch_chunking(cell: Cell, options, device: str) -> Optional[dict]:
    """The chunk torch's chunked path picks for this cell (its private options._adjust())."""
    if options is None:
        return None
    try:
        adjusted = options._adjust(num_batches=cell.n, in_features=cell.h, num_classes=cell.v,
                                   dtype=cell.torch_dtype, device=torch.device(device))
    except Exception:  # private API: describe what can be described
        return None
    return {"batch_chunk_size": adjusted.batch_chunk_size, "chunking_method": adjusted.chunking_method,
            "acc_policy": adjusted.acc_policy, "acc_dtype": str(adjusted.acc_dtype).replace("torch.", "")}


def definitions(libs: Libraries) -> dict:
    """What each contender's timed call runs (code, and a note), shown in the report."""
    fallback = probe_torch_fallback(libs.torch_options)
    return {
        "smoothce": {"code": "smoothce.linear_cross_entropy(x, W, t, label_smoothing=ε)",
                     "note": "default chunk: ⌈N·H/V⌉ rows (a chunk of logits about the input's size), at least "
                             "128, at most 128 MiB of logits, evened out over the chunks; bf16/fp16: the weight's "
                             "gradient accumulates in fp32 (fp32_grad_weight=True, the default): on CUDA by GEMMs "
                             "with fp32 output, on CPU (no such GEMM there) through fp32 GEMMs on fp32 copies, so "
                             "CPU takes as few chunks as fit 128 MiB each (one when the logits fit)"},
        "torch_lce": {
            "code": "F.linear_cross_entropy(x, W, t, label_smoothing=ε, ignore_index=-100, "
                    "options=torch.nn.LinearCrossEntropyOptions())",
            "note": "options=None would be the reference path; LinearCrossEntropyOptions() selects the chunked "
                    "path (chunking_method 'auto' = 'aspect_ratio': chunks of next_pow2(ceil(N / ceil(V/H))) rows, "
                    "capped for the 'compact' policy so the chunked peak stays under the reference's; acc_policy "
                    "'auto': 'accurate' for bf16/fp16 on CPU, else 'compact'). ε = 0: the chunked path. ε > 0: "
                    f"the chunked path has no label smoothing, torch warns ({fallback}; silenced for the timed "
                    "runs) and runs the reference F.linear + F.cross_entropy on the full N×V logits"},
        "eager": {"code": "F.cross_entropy(F.linear(x, W), t, ignore_index=-100, label_smoothing=ε)", "note": ""},
        "compile": {"code": "torch.compile(eager, dynamic=False, fullgraph=True)",
                    "note": "the eager function compiled once per (shape, dtype, ε), compile time not timed"},
        FLOOR: {"code": "x @ W.T; dlogits @ W; dlogits.T @ x",
                "note": "the three GEMMs of the step alone, under no_grad: logits, grad_input, grad_weight; dlogits "
                        "preallocated with the logits' shape, the three outputs allocated per call as autograd "
                        "would"},
        "liger": {"code": "LigerFusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=ε)(W, x, t)",
                  "note": "CUDA only"},
        "cce": {"code": "cut_cross_entropy.linear_cross_entropy(x, W, t, ignore_index=-100, reduction='mean', "
                        "label_smoothing=ε)",
                "note": "CUDA only; label_smoothing passed only when ε > 0 (a version without it is skipped there)"},
    }


def probe_torch_fallback(options) -> str:
    """The warning torch gives when ε > 0 meets options (checked on a tiny CPU call)."""
    if options is None:
        return "torch has no chunked path"
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1, options=options)
    texts = [str(w.message) for w in caught if "options" in str(w.message)]
    return f"'{texts[0].split(';')[0]}'" if texts else "no warning seen"


# ----------------------------------------------------------------------------- contenders

def make_contenders(cell: Cell, eps: float, inputs: Inputs, device: str, libs: Libraries, use_compile: bool,
                    ) -> tuple[list[Contender], list[tuple[str, str]], Optional[float]]:
    """The contenders of one group (smoothce first after the floor), the (name, reason) of those
    skipped here, and the torch.compile time."""
    x, w, t = inputs.x, inputs.weight, inputs.target
    contenders, skipped = [], []
    if libs.smoothce is not None:
        smoothce = libs.smoothce
        contenders.append(Contender("smoothce", lambda: smoothce.linear_cross_entropy(x, w, t, label_smoothing=eps)))
    if libs.torch_options is not None:
        options = libs.torch_options
        contenders.append(Contender(
            "torch_lce", lambda: F.linear_cross_entropy(x, w, t, label_smoothing=eps, ignore_index=IGNORE_INDEX,
                                                        options=options),
            "chunked path" if eps == 0 else "reference path (full logits): its chunked path has no label smoothing"))

    def eager(x, w, t):
        return F.cross_entropy(F.linear(x, w), t, ignore_index=IGNORE_INDEX, label_smoothing=eps)

    contenders.append(Contender("eager", lambda: eager(x, w, t)))
    compile_seconds = None
    if use_compile:
        try:
            torch._dynamo.reset()  # one compile per group; keeps Dynamo's recompile limit out of the way
            compiled = torch.compile(eager, dynamic=False, fullgraph=True)
            start = time.perf_counter()
            compiled(x, w, t).backward()
            synchronize(device)
            compile_seconds = time.perf_counter() - start
            contenders.append(Contender("compile", lambda: compiled(x, w, t)))
        except Exception as error:
            skipped.append(("compile", f"torch.compile failed: {error_reason(error)}"))
        x.grad = w.grad = None
    if libs.liger_class is not None:
        module = libs.liger_class(ignore_index=IGNORE_INDEX, label_smoothing=eps)

        def liger():
            out = module(w, x, t)
            return out[0] if isinstance(out, tuple) else out
        trial(contenders, skipped, Contender("liger", liger), inputs)
    if libs.cce_function is not None:
        cce = libs.cce_function
        if eps and not takes_keyword(cce, "label_smoothing"):
            skipped.append(("cce", "cut_cross_entropy.linear_cross_entropy has no label_smoothing argument"))
        else:
            extra = {"label_smoothing": eps} if eps else {}
            trial(contenders, skipped, Contender(
                "cce", lambda: cce(x, w, t, ignore_index=IGNORE_INDEX, reduction="mean", **extra)), inputs)
    return contenders, skipped, compile_seconds


def trial(contenders: list[Contender], skipped: list, contender: Contender, inputs: Inputs) -> None:
    """One fwd+bwd of a third-party contender: it is timed only if that runs."""
    try:
        contender.loss().backward()
        contenders.append(contender)
    except Exception as error:
        skipped.append((contender.name, f"failed on this input: {error_reason(error)}"))
    inputs.x.grad = inputs.weight.grad = None


def contender_task(contender: Contender, inputs: Inputs, empty_cache: Callable[[], None]) -> Task:
    x, w, loss = inputs.x, inputs.weight, contender.loss

    def prepare():
        x.grad = w.grad = None  # as optimizer.zero_grad(set_to_none=True)

    def memory_prepare():
        prepare()
        empty_cache()  # smoothce's CPU gradient cache, as in the variants: every allocation counts

    def step():
        loss().backward()
    return Task(contender.name, prepare, step, memory_prepare)


def floor_task(inputs: Inputs) -> Task:
    x, w, dlogits = inputs.x.detach(), inputs.weight.detach(), inputs.dlogits

    def step():
        with torch.no_grad():
            torch.mm(x, w.t())
            torch.mm(dlogits, w)
            torch.mm(dlogits.t(), x)
    return Task(FLOOR, lambda: None, step)


# ----------------------------------------------------------------------------- check, then time

def loss_and_grads(loss: Loss, inputs: Inputs) -> tuple[float, list[torch.Tensor]]:
    inputs.x.grad = inputs.weight.grad = None
    value = loss()
    value.backward()
    grads = [inputs.x.grad.detach().float().clone(), inputs.weight.grad.detach().float().clone()]
    inputs.x.grad = inputs.weight.grad = None
    return value.float().item(), grads


def check(cell: Cell, eps: float, contenders: list[Contender], inputs: Inputs) -> dict:
    """smoothce's loss and gradients (input, linear weight) against eager's."""
    by_name = {c.name: c for c in contenders}
    rtol = CHECK_RTOL[cell.dtype]
    entry = {"shape_str": cell.name, "dtype": cell.dtype, "label_smoothing": eps, "contender": "smoothce",
             "reference": "eager", "rtol": rtol}
    try:
        ref_loss, ref_grads = loss_and_grads(by_name["eager"].loss, inputs)
        loss, grads = loss_and_grads(by_name["smoothce"].loss, inputs)
    except Exception as error:  # a call that raises is a failed check, not a crash of the whole run
        return dict(entry, passed=False, error=error_reason(error))
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_rel = {name: (g - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
                for name, g, r in zip(("input", "linear_weight"), grads, ref_grads)}
    passed = math.isfinite(loss) and loss_rel <= rtol and all(v <= rtol for v in grad_rel.values())
    return dict(entry, reference_loss=ref_loss, loss=loss, loss_rel_diff=loss_rel,
                grad_rel_diff=max(grad_rel.values()), grad_rel_diff_input=grad_rel["input"],
                grad_rel_diff_linear_weight=grad_rel["linear_weight"], passed=passed)


def cells_for(device: str, quick: bool, dtypes: Optional[list[str]]) -> list[Cell]:
    """The table's (N, H, V, dtype); --dtypes, when given, keeps those dtypes only."""
    shapes = QUICK_SHAPES if quick else SHAPES[device]
    return [Cell(n, h, v, dtype) for n, h, v, dtype in shapes if not dtypes or dtype in dtypes]


def method(device: str) -> dict:
    return {
        "timing": TIMING_METHOD[device] + " Each group (shape, dtype, ε) runs round-robin: every contender "
                  "once per round, the order rotated by one each round.",
        "memory": MEMORY_METHOD[device].replace(".grad set to None first, so the new gradient counts",
                                                "the input's and the weight's .grad set to None first, so the new "
                                                "gradients count")
                  + (" smoothce's CPU gradient cache is emptied first." if device == "cpu" else ""),
        "check": "before a group is timed, smoothce's loss and gradients (input, linear weight) must equal "
                 "eager's: the loss to rtol relative, each gradient to rtol of eager's largest entry (rtol "
                 + ", ".join(f"{k} {v:g}" for k, v in CHECK_RTOL.items()) + "); a group that fails is not timed.",
        "floor": "the contender's median time over the matmul floor's (the three GEMMs of a linear layer's "
                 "fwd+bwd, no loss), measured in the same round-robin.",
    }


def run(device: str, args: argparse.Namespace, smoothce, reason: Optional[str]) -> dict:
    """Checks and times every (shape, dtype, ε) group on one device; returns the JSON section (derived
    numbers included)."""
    started = time.perf_counter()
    runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    use_compile = not getattr(args, "no_compile", False)
    libs = import_libraries(device, smoothce, reason)
    cells = cells_for(device, args.quick, getattr(args, "dtypes", None))
    section = {
        "settings": {"label_smoothing": list(SMOOTHINGS), "ignore_index": IGNORE_INDEX,
                     "ignored_fraction": IGNORED_FRACTION, "reduction": "mean"},
        "method": method(device),
        "definitions": definitions(libs),
        "versions": dict(libs.versions, torch=torch.__version__),
        "runs_policy": f"{runs} timed round-robin rounds per group after warm-up (fixed).",
        "cells": [], "checks": [], "skipped": [], "measurements": [],
    }
    for name, why in libs.reasons.items():
        section["skipped"].append({"contender": name, "shape_str": None, "dtype": None, "label_smoothing": None,
                                   "reason": why})
    if not use_compile:
        section["skipped"].append({"contender": "compile", "shape_str": None, "dtype": None, "label_smoothing": None,
                                   "reason": "--no-compile"})
    print(f"== {device} fused linear + cross-entropy: {len(cells)} shapes x ε {', '.join(f'{e:g}' for e in SMOOTHINGS)}, "
          f"{runs} runs each", flush=True)
    for skip in section["skipped"]:
        print(f"   skip {skip['contender']}: {skip['reason']}", flush=True)
    if libs.smoothce is None:
        return report.derive_linear(section)

    total, done = len(cells) * len(SMOOTHINGS), 0
    with warnings.catch_warnings():
        # torch's fallback to its reference path at ε > 0 (recorded in the definitions) would print per call
        warnings.filterwarnings("ignore", message=TORCH_WARNING)
        for cell in cells:
            inputs = build_inputs(cell, device)
            for eps in SMOOTHINGS:
                done += 1
                section["measurements"] += measure_group(cell, eps, inputs, device, libs, use_compile, runs,
                                                         section, f"{done}/{total}")
            del inputs
            release_memory(device)
    libs.smoothce.empty_cache()
    section["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report.derive_linear(section)


def measure_group(cell: Cell, eps: float, inputs: Inputs, device: str, libs: Libraries, use_compile: bool,
                  runs: int, section: dict, progress: str) -> list[dict]:
    contenders, skips, compile_seconds = make_contenders(cell, eps, inputs, device, libs, use_compile)
    section["cells"].append({"shape": [cell.n, cell.h, cell.v], "shape_str": cell.name, "dtype": cell.dtype,
                             "label_smoothing": eps, "logits_bytes": cell.logits_bytes,
                             "smoothce_chunk_rows": smoothce_chunk_rows(cell, device),
                             "torch_chunking": torch_chunking(cell, libs.torch_options, device) if eps == 0 else None,
                             "compile_seconds": compile_seconds})
    where = f"{cell.name} {cell.dtype} ε={eps:g}"
    if compile_seconds is not None:
        print(f"   {where}: torch.compile took {compile_seconds:.1f} s", flush=True)
    for name, why in skips:
        print(f"   skip {name} for {where}: {why}", flush=True)
        section["skipped"].append({"contender": name, "shape_str": cell.name, "dtype": cell.dtype,
                                   "label_smoothing": eps, "reason": why})
    result = check(cell, eps, contenders, inputs)
    section["checks"].append(result)
    if not result["passed"]:
        why = result.get("error") or (f"loss {result['loss']:.9g} vs eager {result['reference_loss']:.9g} (rel "
                                      f"{result['loss_rel_diff']:.2g}), gradient rel {result['grad_rel_diff']:.2g} "
                                      f"(rtol {result['rtol']:g})")
        print(f"   CHECK FAILED linear {where}: smoothce: {why} — not timed", flush=True)
        section["skipped"].append({"contender": "smoothce", "shape_str": cell.name, "dtype": cell.dtype,
                                   "label_smoothing": eps, "reason": f"check failed (group not timed): {why}"})
        return []
    tasks = [floor_task(inputs)] + [contender_task(c, inputs, libs.smoothce.empty_cache) for c in contenders]
    gc.collect()
    warmup_rounds, _, memory = warm_up(tasks, device)
    times = run_rounds(tasks, device, runs)
    notes = {c.name: c.note for c in contenders}
    group = [{"shape": [cell.n, cell.h, cell.v], "shape_str": cell.name, "dtype": cell.dtype, "label_smoothing": eps,
              "contender": task.name, "note": notes.get(task.name, ""), "runs": runs, "warmup_rounds": warmup_rounds,
              "peak_extra_bytes": memory[task.name], "times_ms": [round(t * 1e3, 6) for t in times[task.name]]}
             for task in tasks]
    report.derive_linear({"measurements": group})
    print(f"linear [{progress}] {where} fwd+bwd ({device})", flush=True)
    for row in group:
        print("      " + describe_row(row), flush=True)
    inputs.x.grad = inputs.weight.grad = None
    return group


def describe_row(row: dict) -> str:
    floor = f"{row['time_over_floor']:.2f}x floor" if row.get("time_over_floor") is not None else ""
    mine = (f"smoothce speed-up {row['smoothce_speedup']:.2f}x" if row.get("smoothce_speedup") is not None
            and row["contender"] != "smoothce" else "")
    return (f"{row['contender']:<10} {report.fmt_ms(row['median_ms']):>8} ms "
            f"[IQR {report.fmt_ms(row['q1_ms'])}-{report.fmt_ms(row['q3_ms'])}]  {floor:>12}  {mine:>24}  "
            f"{report.fmt_bytes(row['peak_extra_bytes']):>13}")
