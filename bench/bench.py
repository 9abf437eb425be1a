"""Time smoothce.cross_entropy against eager PyTorch, torch.compile, other fused kernels and a copy.

Run from the repository root:

    python -m bench                        # default shapes and dtypes, on cuda if available else cpu
    python bench/bench.py --device all
    python -m bench --shapes 4096x32000,8x21x256x256 --dtypes bf16 --runs 50
    python -m bench --quick --no-compile --out /tmp/bench
    python -m bench --variants-only        # only the label-smoothing variants (bench/variants.py)

All contenders run in one process, round-robin: every repetition runs each contender once, in an
order rotated by one per repetition, so machine noise hits them all alike. Results go to
<out>/<device>-<dtypes>.json, from which bench/report.py draws the .md table and the .png plot. The
label-smoothing variants (bench/variants.py: smoothce's keywords against the plain-PyTorch code users
run for them) follow in the same process and the same files unless --no-variants.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as `python bench/bench.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import report

ROOT = Path(__file__).resolve().parents[1]
LABEL_SMOOTHING = 0.1
GRAD_SCALE = 0.5  # upstream gradient of the "fwd+bwd scaled" mode
SEGMENTATION_IGNORE_INDEX = 255
IGNORED_FRACTION = 0.1  # of the positions of segmentation targets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
DEFAULT_SHAPES = (
    (256, 1000), (4096, 1000),          # classification
    (4096, 32000), (1024, 128256),      # language-model vocabularies
    (8, 21, 256, 256),                  # segmentation (ignore_index 255)
    (65536, 10),                        # many rows, few classes
)
CUDA_ONLY_SHAPES = ((8192, 128256), (4096, 256000))
QUICK_SHAPES = ((64, 100), (2, 5, 8, 8))
QUICK_RUNS = 5

# Run planning (see RunPlanner).
TARGET_RUNS = 20
MIN_RUNS = 5
MAX_RUNS = 100
EXTRA_SECONDS = 1.0          # a cheap measurement may take more than TARGET_RUNS, up to this long
DEFAULT_BUDGET_S = {"cpu": 240.0, "cuda": 600.0}
COMPILE_GUESS_S = 10.0       # torch.compile time per cell assumed until one is measured
MODE_WEIGHT = {"fwd": 0.5, "fwd+bwd": 1.0, "fwd+bwd scaled": 1.0}  # share of the time budget
# Warm-up: whole rounds until WARMUP_SECONDS have passed (2 rounds at least, 1 if a round is slow).
WARMUP_SECONDS = 0.2
WARMUP_MAX_ROUNDS = 10
SLOW_ROUND_S = 0.5

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it "
            "(.grad set to None first, so the new gradient counts).",
    "cpu": "peak of the running sum of CPU allocations minus frees during one call, from "
           "torch.profiler(profile_memory=True) (.grad set to None first, so the new gradient counts).",
}
TIMING_METHOD = {
    "cuda": "CUDA events around each call, device synchronised before and after; .grad set to None "
            "before each call, outside the timed region; Python GC off while timing.",
    "cpu": "time.perf_counter() around each call; .grad set to None before each call, outside the "
           "timed region; Python GC off while timing.",
}

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


def error_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def import_libraries(device: str) -> Libraries:
    libs = Libraries()
    try:
        import smoothce

        libs.smoothce = smoothce
        libs.versions["smoothce"] = smoothce.__version__
    except Exception as error:  # an unbuilt extension raises ImportError or OSError; keep going
        libs.reasons["smoothce"] = f"not importable ({error_reason(error)})"
    if device != "cuda":
        libs.reasons["liger"] = libs.reasons["flash_attn"] = "CUDA only"
        return libs
    try:
        import liger_kernel
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        libs.liger_loss_class = LigerCrossEntropyLoss
        libs.versions["liger"] = getattr(liger_kernel, "__version__", "unknown")
    except Exception as error:
        libs.reasons["liger"] = f"not importable ({error_reason(error)})"
    try:
        import flash_attn
        from flash_attn.losses.cross_entropy import CrossEntropyLoss

        libs.flash_attn_loss_class = CrossEntropyLoss
        libs.versions["flash_attn"] = getattr(flash_attn, "__version__", "unknown")
    except Exception as error:
        libs.reasons["flash_attn"] = f"not importable ({error_reason(error)})"
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

@dataclass
class Task:
    """One contender in one mode: prepare() runs untimed before each timed step() (memory_prepare(),
    when given, instead of it before the call whose peak memory is measured)."""
    name: str
    prepare: Callable[[], None]
    step: Callable[[], None]
    memory_prepare: Optional[Callable[[], None]] = None


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


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step: Callable[[], None], device: str) -> float:
    """Seconds one call of step() takes."""
    if device != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def run_rounds(tasks: list[Task], device: str, rounds: int) -> dict[str, list[float]]:
    """Round-robin: each round runs every task once, starting one task later than the last round."""
    times = {task.name: [] for task in tasks}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(tasks)
            for task in tasks[shift:] + tasks[:shift]:
                task.prepare()
                times[task.name].append(time_step(task.step, device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def warm_up(tasks: list[Task], device: str) -> tuple[int, float, dict[str, Optional[int]]]:
    """Runs whole rounds until allocators, caches and lazy initialisation are warm; the first round
    also measures each task's peak extra memory. Returns the number of rounds, the seconds the last
    one took (the estimate of a round's cost) and the memory per task."""
    start = time.perf_counter()
    memory = {task.name: peak_extra_bytes(task, device) for task in tasks}
    rounds, last = 1, time.perf_counter() - start
    spent = last
    while last <= SLOW_ROUND_S and rounds < WARMUP_MAX_ROUNDS and (rounds < 2 or spent < WARMUP_SECONDS):
        start = time.perf_counter()
        run_rounds(tasks, device, 1)
        last = time.perf_counter() - start
        rounds, spent = rounds + 1, spent + last
    return rounds, last, memory


@dataclass
class RunPlanner:
    """How many timed rounds a measurement gets.

    With fixed runs, always that many. Otherwise a measurement whose TARGET_RUNS rounds fit in
    EXTRA_SECONDS takes as many rounds as fit there (MAX_RUNS at most); a dearer one takes
    TARGET_RUNS, unless the time left (budget minus the torch.compile time still expected) cannot
    pay for them: then each remaining measurement gets a share of it, weighted by mode, and takes
    fewer runs (MIN_RUNS at least). Cells run from the cheapest to the dearest, so what the cheap
    ones leave goes to the dear ones.
    """
    runs: int
    fixed: bool
    deadline: float  # time.perf_counter() value
    compile_times: tuple[float, ...] = ()

    def compile_estimate(self) -> float:
        # The first compile also pays Dynamo's and Inductor's one-time start-up: leave it out.
        later = self.compile_times[1:]
        if later:
            return statistics.median(later)
        return min(self.compile_times + (COMPILE_GUESS_S,))

    def plan(self, round_seconds: float, weight: float, weight_left: float,
             cells_left_to_compile: int) -> tuple[int, bool]:
        """(runs, reduced below the target?) for a measurement whose rounds take round_seconds."""
        if self.fixed:
            return self.runs, False
        cheap_runs = min(MAX_RUNS, int(EXTRA_SECONDS / round_seconds))
        if cheap_runs >= self.runs:  # cheap enough never to matter to the budget
            return cheap_runs, False
        seconds_left = self.deadline - time.perf_counter() - self.compile_estimate() * cells_left_to_compile
        share = max(seconds_left, 0.0) * weight / weight_left
        affordable = int(share / round_seconds)
        if affordable >= self.runs:
            return self.runs, False
        return max(MIN_RUNS, affordable), True


# ----------------------------------------------------------------------------- memory

@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2: the profiler's C++ side prints start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_extra_bytes(step: Callable[[], None]) -> Optional[int]:
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        # The raw event list keeps every allocation in time order (the public events() view folds
        # them into the ops that made them, losing the order a peak needs).
        events = prof.profiler.kineto_results.events()
        cpu = torch._C._autograd.DeviceType.CPU
        changes = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and e.device_type() == cpu)
    except AttributeError:  # the private API moved: report no number rather than a wrong one
        return None
    in_use = peak = 0
    for _, nbytes in changes:
        in_use += nbytes
        peak = max(peak, in_use)
    return peak


def peak_extra_bytes(task: Task, device: str) -> Optional[int]:
    """Memory one call of the task allocates at its peak, above what was allocated before it."""
    (task.memory_prepare or task.prepare)()
    if device != "cuda":
        return cpu_peak_extra_bytes(task.step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    task.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


# ----------------------------------------------------------------------------- one device

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


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


def benchmark_device(device: str, cells: list[Cell], args: argparse.Namespace) -> dict:
    """Measures every cell on one device; returns the JSON document (derived numbers included)."""
    started = time.perf_counter()
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S[device]
    fixed = args.quick or args.runs is not None
    planner = RunPlanner(runs=args.runs or (QUICK_RUNS if args.quick else TARGET_RUNS), fixed=fixed,
                         deadline=started + budget)
    libs = import_libraries(device)
    use_compile = not args.no_compile
    if device == "cpu":
        # Compile in this process: a pool of compile workers starting up would compete with the
        # timed calls for the CPU cores.
        # (not `import torch._inductor.config`: that would make `torch` a local name of this
        # function, unbound on the cuda path)
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    name = device_name(device)
    load_before = load_average()
    print(f"== {device}: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"smoothce {libs.versions.get('smoothce', '(not importable)')}", flush=True)
    if load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"   warning: load average {load_before:.1f} on {os.cpu_count()} CPUs: other work is running "
              f"and will disturb the timings", flush=True)
    skipped = [{"contender": contender, "shape_str": None, "dtype": None, "reason": reason}
               for contender, reason in libs.reasons.items()]
    if not use_compile:
        skipped.append({"contender": "compile", "shape_str": None, "dtype": None, "reason": "--no-compile"})
    for skip in skipped:
        print(f"   skip {skip['contender']}: {skip['reason']}", flush=True)

    # Cheapest first: the time budget the cheap cells leave over goes to the dear ones.
    order = sorted(cells, key=lambda cell: (cell.numel * cell.itemsize, cell.numel))
    progress = {"done": 0, "total": len(cells) * len(report.MODES),
                "weight_left": len(cells) * sum(MODE_WEIGHT.values()),
                "cells_left_to_compile": len(cells) if use_compile else 0}
    measurements, cell_info = [], {}
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
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    variant_section = None
    if args.variants:
        from bench import variants  # imports this module: loaded here, not at the top

        variant_section = variants.run(device, args, libs.smoothce, libs.reasons.get("smoothce"))

    elapsed = time.perf_counter() - started
    reduced = sum(1 for row in measurements if row["reduced_runs"])
    notes = []
    load_after = load_average()
    if load_before is not None:
        busy = load_before > 0.5 * (os.cpu_count() or 1)
        notes.append(f"1-minute load average {load_before:.2f} before the run ({load_after:.2f} after it, this "
                     f"run's own load included) on {os.cpu_count()} CPUs"
                     + ("; other work was running and disturbed the timings." if busy else "."))
    if reduced:
        notes.append(f"{reduced} of {len(measurements)} measurements took fewer than {planner.runs} runs "
                     f"(at least {MIN_RUNS}) to fit the {budget:.0f} s time budget; their IQR is wider. "
                     f"`--runs N` forces N runs everywhere.")
    data = {
        "schema": 1,
        "meta": run_metadata(device, name, args, libs, planner, budget, elapsed, notes),
        "cells": [cell_info[cell] for cell in cells],  # requested order
        "skipped": skipped,
        "measurements": sorted(measurements, key=lambda row: cells.index(Cell(tuple(row["shape"]), row["dtype"]))),
    }
    if variant_section is not None:
        data["variants"] = variant_section
    return report.derive(data)


def run_metadata(device: str, name: str, args: argparse.Namespace, libs: Libraries,
                 planner: RunPlanner, budget: float, elapsed: float, notes: list[str]) -> dict:
    if planner.fixed:
        runs_policy = f"{planner.runs} timed runs per measurement after warm-up (fixed)."
    else:
        runs_policy = (f"adaptive: {planner.runs} timed runs per measurement after warm-up; as many as fit in "
                       f"{EXTRA_SECONDS:g} s (up to {MAX_RUNS}) where {planner.runs} take less; fewer (at least "
                       f"{MIN_RUNS}) where {planner.runs} would not fit a {budget:.0f} s budget for the whole run.")
    smoothce_build = None
    if libs.smoothce is not None and hasattr(libs.smoothce, "build_info"):
        with contextlib.suppress(Exception):
            smoothce_build = libs.smoothce.build_info()
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_version": torch.version.cuda if device == "cuda" else None,
        "torch_version": torch.__version__,
        "smoothce_version": libs.versions.get("smoothce"),
        "smoothce_build": smoothce_build,
        "contender_versions": libs.versions,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + " ".join(args.argv),
        "quick": args.quick,
        "variants": args.variants,
        "variants_only": args.variants_only,
        "dtypes": list(dict.fromkeys(args.dtypes_for[device])),
        "label_smoothing": LABEL_SMOOTHING,
        "grad_scale": GRAD_SCALE,
        "segmentation_ignore_index": SEGMENTATION_IGNORE_INDEX,
        "ignored_fraction": IGNORED_FRACTION,
        "modes": report.MODES,
        "timing_method": TIMING_METHOD[device],
        "memory_method": MEMORY_METHOD[device],
        "runs_policy": runs_policy,
        "budget_s": None if planner.fixed else budget,
        "elapsed_s": round(elapsed, 1),
        "notes": notes,
    }


# ----------------------------------------------------------------------------- command line

def parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            shape = tuple(int(size) for size in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected sizes joined by 'x', e.g. 4096x1000") from None
        if len(shape) < 2 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected (N, C) or (N, C, d1, ...), all sizes >= 1")
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError("expected at least one shape, e.g. 4096x1000")
    return shapes


def parse_dtypes(text: str) -> list[str]:
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(DTYPES)}, got {text!r}")
    return dtypes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu", "all"),
                        help="default: cuda if available, else cpu; 'all': cpu, then cuda if available")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny shapes, {QUICK_RUNS} runs; default --out bench/results/scratch")
    parser.add_argument("--shapes", type=parse_shapes, help="e.g. 4096x1000,8x21x256x256 (default: the standard set)")
    parser.add_argument("--dtypes", type=parse_dtypes, help="e.g. fp32,bf16 (default: fp32,bf16; fp16 too on cuda)")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    parser.add_argument("--runs", type=int, help=f"timed runs per measurement, fixed (default: adaptive, {TARGET_RUNS} targeted)")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole adaptive run per device (default: "
                             + ", ".join(f"{d} {s:.0f}" for d, s in DEFAULT_BUDGET_S.items()) + ")")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="after the table, time the label-smoothing variants (smoothing='others', target_values, "
                             "mixup, z_loss, inplace_backward) against their plain-PyTorch versions (default: on)")
    parser.add_argument("--variants-only", action="store_true",
                        help="only the variants; writes <device>-variants.json (.md, .png)")
    parser.add_argument("--variant-budget", type=float,
                        help="seconds for the adaptive variant rows per device (default: cpu 100, cuda 120)")
    args = parser.parse_args(argv)
    if args.variants_only and not args.variants:
        parser.error("--variants-only and --no-variants exclude each other")
    if args.runs is not None and args.runs < 1:
        parser.error(f"--runs: expected at least 1, got {args.runs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this PyTorch")
    args.argv = argv
    return args


def devices_for(choice: Optional[str]) -> list[str]:
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if choice is None:
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    return [choice]


def cells_for(device: str, args: argparse.Namespace) -> list[Cell]:
    if args.variants_only:
        return []
    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = list(QUICK_SHAPES)
    else:
        shapes = list(DEFAULT_SHAPES) + (list(CUDA_ONLY_SHAPES) if device == "cuda" else [])
    return [Cell(tuple(shape), dtype) for shape in shapes for dtype in args.dtypes_for[device]]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = args.out or ROOT / "bench" / "results" / ("scratch" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    devices = devices_for(args.device)
    if args.device == "all" and "cuda" not in devices:
        print("   no CUDA device: measuring cpu only", flush=True)
    args.dtypes_for = {device: args.dtypes or list(DEFAULT_DTYPES[device]) for device in devices}
    failed_checks = 0
    for device in devices:
        data = benchmark_device(device, cells_for(device, args), args)
        stem = "-".join([device] + (["variants"] if args.variants_only else data["meta"]["dtypes"]))
        json_path = out / f"{stem}{'-quick' if args.quick else ''}.json"
        json_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        md_path, png_path = report.write_reports(data, json_path)
        print("\n".join(summary_lines_with_notes(data)), flush=True)
        print(f"wrote {json_path}, {md_path.name}, {png_path.name} in {data['meta']['elapsed_s']:.0f} s", flush=True)
        failed_checks += sum(1 for check in data.get("variants", {}).get("checks", []) if not check["passed"])
    if failed_checks:
        print(f"error: {failed_checks} variant check(s) failed: smoothce and the plain-PyTorch version disagree "
              f"(see 'CHECK FAILED' above); those pairs were not timed", flush=True)
        return 1
    return 0


def summary_lines_with_notes(data: dict) -> list[str]:
    lines = report.summary_lines(data["summary"]) if data["measurements"] else []
    if data.get("variants"):
        lines += report.variant_summary_lines(data["variants"])
    lines += [f"note: {note}" for note in data["meta"]["notes"]]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
