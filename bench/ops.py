"""The main table: smoothce.cross_entropy against eager PyTorch, torch.compile, other fused kernels and
a copy of the logits (the floor), in three modes (fwd+bwd, fwd+bwd with a scaled loss, fwd).

Run by `python -m bench` (bench/bench.py) on the standard shapes or those of --shapes; the timing and
memory machinery is bench/harness.py's.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import report
from bench.harness import (DTYPES, IGNORED_FRACTION, LABEL_SMOOTHING, MODE_WEIGHT, SEGMENTATION_IGNORE_INDEX,
                           RunPlanner, Task, error_reason, import_optional, import_smoothce, release_memory, run_rounds,
                           synchronize, warm_up)

GRAD_SCALE = 0.5  # upstream gradient of the "fwd+bwd scaled" mode

DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
DEFAULT_SHAPES = (
    (256, 1000), (4096, 1000),          # classification
    (4096, 32000), (1024, 128256),      # language-model vocabularies
    (8, 21, 256, 256),                  # segmentation (ignore_index 255)
    (65536, 10),                        # many rows, few classes
)
CUDA_ONLY_SHAPES = ((8192, 128256), (4096, 256000))
QUICK_SHAPES = ((64, 100), (2, 5, 8, 8))
# Per-call overhead: fwd+bwd on an input so small that the time is the call's fixed cost (Python,
# autograd, dispatch, allocation, thread start), each timed run a loop of OVERHEAD_CALLS calls.
OVERHEAD_SHAPE = (8, 10)
OVERHEAD_CALLS = 100
OVERHEAD_ROUNDS = {"full": 30, "quick": 5}
DEFAULT_BUDGET_S = {"cpu": 240.0, "cuda": 600.0}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Cell:
    """One (shape, dtype) to measure; shapes with more than 2 dims are segmentation maps."""
    shape: tuple[int, ...]
    dtype: str

    @property
    def name(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def num_classes(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ignore_index(self) -> int:
        return SEGMENTATION_IGNORE_INDEX if len(self.shape) > 2 else -100

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize


@dataclass
class Inputs:
    logits: torch.Tensor    # leaf requiring grad, shared by the contenders that do not write into it
    target: torch.Tensor
    copy_dst: torch.Tensor  # the floor: copy_dst.copy_(logits) reads and writes the N·C elements once


def build_inputs(cell: Cell, device: str, seed: int = 0) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(cell.shape, generator=generator, device=device, dtype=DTYPES[cell.dtype]) * 2
    positions = (cell.shape[0],) + cell.shape[2:]
    target = torch.randint(0, cell.num_classes, positions, generator=generator, device=device)
    if len(cell.shape) > 2:
        ignored = torch.rand(positions, generator=generator, device=device) < IGNORED_FRACTION
        target[ignored] = cell.ignore_index
    return Inputs(logits.requires_grad_(True), target, torch.empty_like(logits, requires_grad=False))


def cells_for(device: str, shapes: Optional[list[tuple[int, ...]]], quick: bool, dtypes: list[str]) -> list[Cell]:
    """The requested shapes, or the standard set (with the CUDA-only shapes on CUDA), in every dtype."""
    if shapes:
        chosen = shapes
    elif quick:
        chosen = list(QUICK_SHAPES)
    else:
        chosen = list(DEFAULT_SHAPES) + (list(CUDA_ONLY_SHAPES) if device == "cuda" else [])
    return [Cell(tuple(shape), dtype) for shape in chosen for dtype in dtypes]


# ----------------------------------------------------------------------------- contenders

@dataclass
class Contender:
    name: str
    loss: LossFn
    logits: Optional[torch.Tensor] = None  # its own copy of the logits, when it writes into them
    note: str = ""


@dataclass
class Libraries:
    """The optional contenders' entry points on this device, or why each is missing."""
    smoothce: object = None
    liger_loss_class: object = None
    flash_attn_loss_class: object = None
    versions: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)


def import_libraries(device: str) -> Libraries:
    libs = Libraries()
    libs.smoothce, version, reason = import_smoothce()
    if reason is None:
        libs.versions["smoothce"] = version
    else:
        libs.reasons["smoothce"] = reason
    if device != "cuda":
        libs.reasons["liger"] = libs.reasons["flash_attn"] = "CUDA only"
        return libs
    libs.liger_loss_class = import_optional(libs.versions, libs.reasons, "liger", "liger_kernel",
                                            "liger_kernel.transformers.cross_entropy", "LigerCrossEntropyLoss")
    libs.flash_attn_loss_class = import_optional(libs.versions, libs.reasons, "flash_attn", "flash_attn",
                                                 "flash_attn.losses.cross_entropy", "CrossEntropyLoss")
    return libs


def functional_loss(function, cell: Cell) -> LossFn:
    def loss(logits, target):
        return function(logits, target, ignore_index=cell.ignore_index, label_smoothing=LABEL_SMOOTHING)
    return loss


def rows_of_classes(loss_2d: LossFn, cell: Cell) -> tuple[LossFn, str]:
    """Adapts a loss that takes (rows, C) only; for (N, C, d...) the transposing copy is timed too,
    as a user of that loss would pay it."""
    if len(cell.shape) == 2:
        return loss_2d, ""

    def loss(logits, target):
        return loss_2d(logits.movedim(1, -1).reshape(-1, cell.num_classes), target.reshape(-1))
    return loss, "takes (rows, C) only: (N, C, H, W) input is moved to (N·H·W, C) inside the timed call"


def compile_contender(cell: Cell, inputs: Inputs, device: str) -> tuple[Contender, float]:
    """torch.compile(F.cross_entropy) for this cell, compiled and warmed up for both inference and
    training (Dynamo guards on grad mode). Returns it and the compile time; raises on failure."""
    # One compile per cell with static shapes; resetting also keeps Dynamo's per-function recompile
    # limit from silently sending later cells back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(F.cross_entropy, dynamic=False, fullgraph=True)
    contender = Contender("compile", functional_loss(compiled, cell))
    start = time.perf_counter()
    with torch.no_grad():
        contender.loss(inputs.logits, inputs.target)
    contender.loss(inputs.logits, inputs.target).backward()
    inputs.logits.grad = None
    synchronize(device)
    return contender, time.perf_counter() - start


def make_contenders(cell: Cell, inputs: Inputs, device: str, libs: Libraries,
                    use_compile: bool) -> tuple[list[Contender], list[tuple[str, str]], Optional[float]]:
    """The contenders for one cell, the (name, reason) of those skipped here, and the compile time."""
    contenders = [Contender("eager", functional_loss(F.cross_entropy, cell))]
    skipped = []
    compile_seconds = None
    if use_compile:
        try:
            compiled, compile_seconds = compile_contender(cell, inputs, device)
            contenders.append(compiled)
        except Exception as error:
            inputs.logits.grad = None
            skipped.append(("compile", f"torch.compile failed: {error_reason(error)}"))
    if libs.smoothce is not None:
        contenders.append(Contender("smoothce", functional_loss(libs.smoothce.cross_entropy, cell)))
    if libs.liger_loss_class is not None:
        module = libs.liger_loss_class(ignore_index=cell.ignore_index, label_smoothing=LABEL_SMOOTHING)
        loss, note = rows_of_classes(module, cell)
        # Liger writes the gradient into its input during forward: give it logits of its own.
        own_logits = inputs.logits.detach().clone().requires_grad_(True)
        contenders.append(Contender("liger", loss, own_logits,
                                    "; ".join(filter(None, [note, "writes its gradient into its own copy of the logits"]))))
    if libs.flash_attn_loss_class is not None:
        module = libs.flash_attn_loss_class(ignore_index=cell.ignore_index, label_smoothing=LABEL_SMOOTHING)
        loss, note = rows_of_classes(module, cell)
        contenders.append(Contender("flash_attn", loss, note=note))
    return contenders, skipped, compile_seconds


# ----------------------------------------------------------------------------- timing

def contender_task(contender: Contender, mode: str, inputs: Inputs) -> Task:
    logits = contender.logits if contender.logits is not None else inputs.logits
    target, loss = inputs.target, contender.loss

    def prepare():
        logits.grad = None  # as optimizer.zero_grad(set_to_none=True): backward allocates a fresh one

    if mode == "fwd":
        def step():
            with torch.no_grad():
                loss(logits, target)
    elif mode == "fwd+bwd":
        def step():
            loss(logits, target).backward()
    elif mode == "fwd+bwd scaled":
        def step():
            (loss(logits, target) * GRAD_SCALE).backward()
    else:
        raise ValueError(f"mode must be one of {list(report.MODES)}, got {mode!r}")
    return Task(contender.name, prepare, step)


def copy_task(inputs: Inputs) -> Task:
    source, destination = inputs.logits.detach(), inputs.copy_dst
    return Task(report.FLOOR, lambda: None, lambda: destination.copy_(source))


def describe_row(row: dict) -> str:
    ratio = f"{row['speedup_vs_eager']:.2f}x eager" if row["speedup_vs_eager"] is not None else ""
    copy = f"{row['pct_of_copy']:.0f}% of copy" if row["pct_of_copy"] is not None else ""
    runs = f"{row['runs']} runs{', reduced' if row['reduced_runs'] else ''}"
    return (f"{row['contender']:<10} {report.fmt_ms(row['median_ms']):>8} ms "
            f"[IQR {report.fmt_ms(row['q1_ms'])}-{report.fmt_ms(row['q3_ms'])}]  {ratio:>12}  "
            f"{row['gbps']:7.1f} GB/s  {copy:>12}  {report.fmt_bytes(row['peak_extra_bytes']):>13}  ({runs})")


def measure_cell(cell: Cell, inputs: Inputs, contenders: list[Contender], device: str,
                 planner: RunPlanner, progress: dict) -> list[dict]:
    """Times every mode of one cell; returns the measurement rows."""
    rows = []
    for mode in report.MODES:
        tasks = [copy_task(inputs)] + [contender_task(c, mode, inputs) for c in contenders]
        gc.collect()
        warmup_rounds, round_seconds, memory = warm_up(tasks, device)
        runs, reduced = planner.plan(round_seconds, MODE_WEIGHT[mode], progress["weight_left"],
                                     progress["cells_left_to_compile"])
        times = run_rounds(tasks, device, runs)
        progress["weight_left"] -= MODE_WEIGHT[mode]
        notes = {c.name: c.note for c in contenders}
        group = []
        for task in tasks:
            group.append({
                "shape": list(cell.shape), "shape_str": cell.name, "num_classes": cell.num_classes,
                "dtype": cell.dtype, "ignore_index": cell.ignore_index, "mode": mode,
                "contender": task.name, "note": notes.get(task.name, ""),
                "runs": runs, "warmup_rounds": warmup_rounds, "reduced_runs": reduced,
                "bytes": report.minimal_bytes(cell.numel, cell.itemsize,
                                              "fwd+bwd" if task.name == report.FLOOR else mode),
                "peak_extra_bytes": memory[task.name],
                "times_ms": [round(t * 1e3, 6) for t in times[task.name]],
            })
        report.derive({"measurements": group})
        progress["done"] += 1
        print(f"[{progress['done']:>3}/{progress['total']}] {device} {cell.name} {cell.dtype} {mode}", flush=True)
        for row in group:
            print("      " + describe_row(row), flush=True)
        rows += group
    for contender in contenders:
        if contender.logits is not None:
            contender.logits.grad = None
    inputs.logits.grad = None
    return rows


def run(device: str, cells: list[Cell], libs: Libraries, planner: RunPlanner,
        use_compile: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """Measures every cell on one device, cheapest first; returns the measurement rows (in the requested
    cells' order), the cells' descriptions and the (cell, contender) pairs skipped."""
    # Cheapest first: the time budget the cheap cells leave over goes to the dear ones.
    order = sorted(cells, key=lambda cell: (cell.numel * cell.itemsize, cell.numel))
    progress = {"done": 0, "total": len(cells) * len(report.MODES),
                "weight_left": len(cells) * sum(MODE_WEIGHT.values()),
                "cells_left_to_compile": len(cells) if use_compile else 0}
    measurements, cell_info, skipped = [], {}, []
    for cell in order:
        inputs = build_inputs(cell, device)
        if use_compile:
            progress["cells_left_to_compile"] -= 1
        contenders, cell_skips, compile_seconds = make_contenders(cell, inputs, device, libs, use_compile)
        if compile_seconds is not None:
            planner.compile_times += (compile_seconds,)
            print(f"   {cell.name} {cell.dtype}: torch.compile took {compile_seconds:.1f} s", flush=True)
        for contender, reason in cell_skips:
            print(f"   skip {contender} for {cell.name} {cell.dtype}: {reason}", flush=True)
            skipped.append({"contender": contender, "shape_str": cell.name, "dtype": cell.dtype, "reason": reason})
        measurements += measure_cell(cell, inputs, contenders, device, planner, progress)
        cell_info[cell] = {"shape": list(cell.shape), "shape_str": cell.name, "dtype": cell.dtype,
                           "ignore_index": cell.ignore_index, "compile_seconds": compile_seconds}
        del inputs, contenders
        release_memory(device)
    measurements.sort(key=lambda row: cells.index(Cell(tuple(row["shape"]), row["dtype"])))
    return measurements, [cell_info[cell] for cell in cells], skipped


# ----------------------------------------------------------------------------- per-call overhead

def measure_overhead(device: str, libs: Libraries, use_compile: bool, quick: bool) -> dict:
    """fwd+bwd of every contender on an OVERHEAD_SHAPE fp32 input, round-robin: each timed run is a loop
    of OVERHEAD_CALLS calls (.grad set to None before each, as in the main table); the section for
    report.derive_overhead with the per-call times in µs."""
    cell = Cell(OVERHEAD_SHAPE, "fp32")
    inputs = build_inputs(cell, device)
    contenders, skipped, _ = make_contenders(cell, inputs, device, libs, use_compile)
    # The machine's floor for any autograd loss: the smallest graph torch can differentiate (one sum and
    # its backward), timed as a contender.
    floor = Contender(report.OVERHEAD_FLOOR, lambda logits, target: logits.sum())
    tasks = []
    for single in [contender_task(contender, "fwd+bwd", inputs) for contender in contenders + [floor]]:
        def loop(single=single):
            for _ in range(OVERHEAD_CALLS):
                single.prepare()
                single.step()
        tasks.append(Task(single.name, lambda: None, loop))
    warm_up(tasks, device)
    times = run_rounds(tasks, device, OVERHEAD_ROUNDS["quick" if quick else "full"])
    inputs.logits.grad = None
    rows = [{"contender": name, "calls_per_run": OVERHEAD_CALLS,
             "times_us": [round(t * 1e6 / OVERHEAD_CALLS, 3) for t in seconds]} for name, seconds in times.items()]
    section = {"shape_str": cell.name, "dtype": cell.dtype, "mode": "fwd+bwd", "label_smoothing": LABEL_SMOOTHING,
               "rows": rows, "skipped": [{"contender": name, "reason": reason} for name, reason in skipped]}
    report.derive_overhead(section)
    for row in section["rows"]:
        print(f"   overhead {cell.name} fwd+bwd  {row['contender']:<14} {row['median_us']:8.1f} us per call "
              f"[IQR {row['q1_us']:.1f}-{row['q3_us']:.1f}]", flush=True)
    return section
