"""The machinery every benchmark suite shares: round-robin timing, run planning, peak-memory
measurement, the machine's description and the settings common to the suites.

The suites (bench/ops.py: smoothce.cross_entropy against other cross-entropies; bench/variants.py: the
label-smoothing variants; bench/linear.py: the fused linear + cross-entropy; bench/integrations.py: the
timm and transformers integrations) each import this module and
never each other; bench/bench.py runs them in turn. This module imports nothing else from bench/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

# The loss settings the suites share.
LABEL_SMOOTHING = 0.1
SEGMENTATION_IGNORE_INDEX = 255
IGNORED_FRACTION = 0.1  # of the positions whose target is ignore_index, where a suite ignores any

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_RUNS = 5

# Run planning (see RunPlanner).
TARGET_RUNS = 20
MIN_RUNS = 5
MAX_RUNS = 100
EXTRA_SECONDS = 1.0          # a cheap measurement may take more than TARGET_RUNS, up to this long
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


# ----------------------------------------------------------------------------- timing

@dataclass
class Task:
    """One contender in one mode: prepare() runs untimed before each timed step() (memory_prepare(),
    when given, instead of it before the call whose peak memory is measured)."""
    name: str
    prepare: Callable[[], None]
    step: Callable[[], None]
    memory_prepare: Optional[Callable[[], None]] = None


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


def planner_for(args: argparse.Namespace, budget: float, started: float) -> RunPlanner:
    """The planner of a suite with an adaptive budget: fixed runs under --quick or --runs N."""
    fixed = args.quick or args.runs is not None
    return RunPlanner(runs=args.runs or (QUICK_RUNS if args.quick else TARGET_RUNS), fixed=fixed,
                      deadline=started + budget)


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
    """Peak of the running sum of CPU allocations minus frees during one call of step(), from the
    profiler's raw memory events; None when torch's private event API is not there."""
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


def release_memory(device: str) -> None:
    """Between cells: collect garbage and hand cached device memory back."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the machine

def run_then_exit(main: Callable[[], None]) -> None:
    """Runs main() in a process of a torch.distributed (gloo) group, then ends the process with os._exit:
    status 0, a SystemExit's code, or 1 after printing the traceback of anything else main() raised.
    main() writes its results and destroys its process group first. Under load such processes now and
    then aborted in the interpreter's teardown after all their work ("terminate called without an
    active exception": a thread of gloo or of the profiler still alive at exit), failing runs whose
    results were all written. A crash inside main() still ends the process with a non-zero status."""
    status = 0
    try:
        main()
    except SystemExit as exc:  # (argparse)
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (reported, then the same quick exit with status 1)
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def error_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def import_optional(versions: dict, reasons: dict, key: str, package: str, module: str, name: str):
    """`name` from `module` (an optional library's class or function), with `package`'s version in
    versions[key]; None, with why in reasons[key], when it cannot be imported."""
    import importlib

    try:
        found = getattr(importlib.import_module(module), name)
        versions[key] = getattr(importlib.import_module(package), "__version__", "unknown")
        return found
    except Exception as error:
        reasons[key] = f"not importable ({error_reason(error)})"
        return None


def import_smoothce() -> tuple[object, Optional[str], Optional[str]]:
    """(the smoothce module or None, its version, why it is missing)."""
    try:
        import smoothce
    except Exception as error:  # an unbuilt extension raises ImportError or OSError; keep going
        return None, None, f"not importable ({error_reason(error)})"
    return smoothce, smoothce.__version__, None


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


def machine_metadata(device: str, name: str) -> dict:
    """The machine and software every result names (device, torch version, ...)."""
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_version": torch.version.cuda if device == "cuda" else None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def shape_str(shape) -> str:
    return "x".join(map(str, shape))


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
