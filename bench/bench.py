"""Time smoothce.cross_entropy against eager PyTorch, torch.compile, other fused kernels and a copy.

Run from the repository root:

    python -m bench                        # default shapes and dtypes, on cuda if available else cpu
    python bench/bench.py --device all
    python -m bench --shapes 4096x32000,8x21x256x256 --dtypes bf16 --runs 50
    python -m bench --quick --no-compile --out /tmp/bench
    python -m bench --variants-only        # only the label-smoothing variants (bench/variants.py)
    python -m bench --linear-only          # only the fused linear + cross-entropy table (bench/linear.py)
    python -m bench --integrations-only    # only the timm / transformers integrations (bench/integrations.py)
    python -m bench --distributed-only     # only the vocabulary-parallel table (bench/distributed.py)

All contenders run in one process, round-robin: every repetition runs each contender once, in an
order rotated by one per repetition, so machine noise hits them all alike. Results go to
<out>/<device>-<dtypes>.json, from which bench/report.py draws the .md table and the .png plot. The
label-smoothing variants (bench/variants.py: smoothce's keywords against the plain-PyTorch code users
run for them) follow in the same process and the same files unless --no-variants, then the fused
linear + cross-entropy table (bench/linear.py) unless --no-linear, then the library integrations
(bench/integrations.py: smoothce.integrations.timm's Mixup + SoftTargetCrossEntropy against timm's,
smoothce.integrations.transformers' LabelSmoother and ForCausalLMLoss against transformers') unless
--no-integrations; without timm or transformers installed, their rows are skipped with the reason.
Last, unless --no-distributed, the vocabulary-parallel table (bench/distributed.py: 2 CPU processes over
gloo) goes to <out>/cpu-distributed.json and .md.

With the main table comes the per-call overhead: fwd+bwd on an 8x10 input, where the time is the
call's fixed cost, next to the autograd floor x.sum().backward() on the same input (what
loss.backward() costs on the machine whatever the loss) and smoothce's time above that floor
(bench/ops.py measure_overhead).

This file is the command line and runs the suites in turn: the main table (bench/ops.py), the variants,
the linear table, the integrations; each suite imports the shared machinery (bench/harness.py) and no
other suite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as `python bench/bench.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import distributed, integrations, linear, ops, report, variants
from bench.harness import (DTYPES, EXTRA_SECONDS, IGNORED_FRACTION, LABEL_SMOOTHING, MAX_RUNS,
                           MEMORY_METHOD, MIN_RUNS, QUICK_RUNS, ROOT, SEGMENTATION_IGNORE_INDEX, TARGET_RUNS,
                           TIMING_METHOD, RunPlanner, device_name, load_average, machine_metadata, parse_dtypes,
                           parse_shapes, planner_for)
from bench.ops import CUDA_ONLY_SHAPES, DEFAULT_BUDGET_S, DEFAULT_DTYPES, DEFAULT_SHAPES, GRAD_SCALE, Cell, Libraries

__all__ = ["main", "parse_args", "cells_for", "devices_for", "benchmark_device", "parse_shapes", "parse_dtypes",
           "DEFAULT_SHAPES", "CUDA_ONLY_SHAPES", "DTYPES"]


# ----------------------------------------------------------------------------- one device

def benchmark_device(device: str, cells: list[Cell], args: argparse.Namespace) -> dict:
    """Runs the suites on one device: the main table's cells, then the variants, the linear table and
    the integrations as asked; returns the JSON document (derived numbers included)."""
    started = time.perf_counter()
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S[device]
    planner = planner_for(args, budget, started)
    libs = ops.import_libraries(device)
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

    measurements, cell_info, cell_skips = ops.run(device, cells, libs, planner, use_compile)
    skipped += cell_skips
    overhead_section = ops.measure_overhead(device, libs, use_compile, args.quick) if cells else None

    variant_section = None
    if runs_variants(args):
        variant_section = variants.run(device, args, libs.smoothce, libs.reasons.get("smoothce"))
    linear_section = None
    if runs_linear(args):
        linear_section = linear.run(device, args, libs.smoothce, libs.reasons.get("smoothce"))
    integration_section = None
    if runs_integrations(args):
        integration_section = integrations.run(device, args, libs.smoothce, libs.reasons.get("smoothce"))

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
        "cells": cell_info,  # requested order
        "skipped": skipped,
        "measurements": measurements,
    }
    if overhead_section is not None:
        data["overhead"] = overhead_section
    if variant_section is not None:
        data["variants"] = variant_section
    if linear_section is not None:
        data["linear"] = linear_section
    if integration_section is not None:
        data["integrations"] = integration_section
    return report.derive(data)


def runs_main_table(args: argparse.Namespace) -> bool:
    return not (args.variants_only or args.linear_only or args.integrations_only or args.distributed_only)


def runs_variants(args: argparse.Namespace) -> bool:
    return args.variants and not (args.linear_only or args.integrations_only or args.distributed_only)


def runs_linear(args: argparse.Namespace) -> bool:
    return args.linear and not (args.variants_only or args.integrations_only or args.distributed_only)


def runs_integrations(args: argparse.Namespace) -> bool:
    return args.integrations and not (args.variants_only or args.linear_only or args.distributed_only)


def runs_distributed(args: argparse.Namespace) -> bool:
    return args.distributed and not (args.variants_only or args.linear_only or args.integrations_only)


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
    machine = machine_metadata(device, name)
    return {
        **{key: machine[key] for key in ("device", "device_name", "threads", "cpu_capability", "cuda_version",
                                         "torch_version")},
        "smoothce_version": libs.versions.get("smoothce"),
        "smoothce_build": smoothce_build,
        "contender_versions": libs.versions,
        **{key: machine[key] for key in ("python_version", "platform", "date")},
        "command": "python -m bench " + " ".join(args.argv),
        "quick": args.quick,
        "variants": runs_variants(args),
        "variants_only": args.variants_only,
        "linear": runs_linear(args),
        "linear_only": args.linear_only,
        "integrations": runs_integrations(args),
        "integrations_only": args.integrations_only,
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
    parser.add_argument("--linear", action=argparse.BooleanOptionalAction, default=True,
                        help="after the variants, time smoothce.linear_cross_entropy against torch's "
                             "F.linear_cross_entropy, eager F.linear + F.cross_entropy, torch.compile and the matmul "
                             f"floor, at ε = 0.1 and 0, {linear.RUNS} runs each (default: on; its shapes are fixed, "
                             "--dtypes filters them)")
    parser.add_argument("--linear-only", action="store_true",
                        help="only the fused linear + cross-entropy table; writes <device>-linear.json (.md, .png)")
    parser.add_argument("--integrations", action=argparse.BooleanOptionalAction, default=True,
                        help="after the linear table, time smoothce.integrations against the library code it "
                             "replaces: timm's Mixup + SoftTargetCrossEntropy, transformers' LabelSmoother and "
                             "ForCausalLMLoss (default: on; skipped with the reason where timm or transformers is "
                             "not installed; its shapes are fixed, --dtypes filters them)")
    parser.add_argument("--integrations-only", action="store_true",
                        help="only the integrations; writes <device>-integrations.json (.md, .png)")
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=True,
                        help="last, the vocabulary-parallel table: 2 CPU processes over gloo, smoothce's "
                             "vocab_parallel_cross_entropy against a plain-PyTorch vocab-parallel loss, DTensor "
                             "loss_parallel() and the loss on the full logits (default: on; its shapes are fixed, "
                             "--dtypes filters them)")
    parser.add_argument("--distributed-only", action="store_true",
                        help="only the vocabulary-parallel table; writes cpu-distributed.json (.md)")
    args = parser.parse_args(argv)
    if args.variants_only and not args.variants:
        parser.error("--variants-only and --no-variants exclude each other")
    if args.linear_only and not args.linear:
        parser.error("--linear-only and --no-linear exclude each other")
    if args.integrations_only and not args.integrations:
        parser.error("--integrations-only and --no-integrations exclude each other")
    if args.distributed_only and not args.distributed:
        parser.error("--distributed-only and --no-distributed exclude each other")
    only = [option for option, given in (("--variants-only", args.variants_only), ("--linear-only", args.linear_only),
                                         ("--integrations-only", args.integrations_only),
                                         ("--distributed-only", args.distributed_only)) if given]
    if len(only) > 1:
        parser.error(f"{' and '.join(only)} exclude each other")
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
    """The main table's cells (none when only the variants, the linear table or the integrations run)."""
    if not runs_main_table(args):
        return []
    return ops.cells_for(device, args.shapes, args.quick, args.dtypes_for[device])


def output_stem(device: str, args: argparse.Namespace, data: dict) -> str:
    only = (["variants"] if args.variants_only else ["linear"] if args.linear_only
            else ["integrations"] if args.integrations_only else data["meta"]["dtypes"])
    return "-".join([device] + only) + ("-quick" if args.quick else "")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = args.out or ROOT / "bench" / "results" / ("scratch" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    devices = devices_for(args.device)
    if args.device == "all" and "cuda" not in devices:
        print("   no CUDA device: measuring cpu only", flush=True)
    args.dtypes_for = {device: args.dtypes or list(DEFAULT_DTYPES[device]) for device in devices}
    failed_checks = {"variant": 0, "linear": 0, "integration": 0, "distributed": 0}
    for device in devices if not args.distributed_only else []:
        data = benchmark_device(device, cells_for(device, args), args)
        json_path = out / f"{output_stem(device, args, data)}.json"
        json_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        md_path, png_path = report.write_reports(data, json_path)
        print("\n".join(summary_lines_with_notes(data)), flush=True)
        print(f"wrote {json_path}, {md_path.name}, {png_path.name} in {data['meta']['elapsed_s']:.0f} s", flush=True)
        for kind, key in (("variant", "variants"), ("linear", "linear"), ("integration", "integrations")):
            failed_checks[kind] += sum(1 for check in data.get(key, {}).get("checks", []) if not check["passed"])
    if runs_distributed(args):
        dtypes = args.dtypes or list(DEFAULT_DTYPES["cpu"])
        if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
            print("   vocabulary-parallel table skipped: this torch has no torch.distributed with gloo", flush=True)
        else:
            print("   vocabulary-parallel table (2 processes, gloo) ...", flush=True)
            data = distributed.run(out, args.quick, args.runs, dtypes)
            print("\n".join(distributed.summary_lines(data)), flush=True)
            print(f"wrote {out / distributed.output_stem(args.quick)}.json, .md in {data['meta']['elapsed_s']:.0f} s",
                  flush=True)
            failed_checks["distributed"] = sum(1 for row in data["rows"] if row["check_failures"])
    if failed_checks["variant"]:
        print(f"error: {failed_checks['variant']} variant check(s) failed: smoothce and the plain-PyTorch version "
              f"disagree (see 'CHECK FAILED' above); those pairs were not timed", flush=True)
    if failed_checks["linear"]:
        print(f"error: {failed_checks['linear']} linear check(s) failed: smoothce.linear_cross_entropy and eager "
              f"F.linear + F.cross_entropy disagree (see 'CHECK FAILED' above); those groups were not timed", flush=True)
    if failed_checks["integration"]:
        print(f"error: {failed_checks['integration']} integration check(s) failed: smoothce.integrations and the "
              f"library disagree (see 'CHECK FAILED' above); those groups were not timed", flush=True)
    if failed_checks["distributed"]:
        print(f"error: {failed_checks['distributed']} vocabulary-parallel row(s) failed their check: a contender "
              f"disagrees with smoothce on the full logits (see 'CHECK FAILED' above)", flush=True)
    return 1 if any(failed_checks.values()) else 0


def summary_lines_with_notes(data: dict) -> list[str]:
    lines = report.summary_lines(data["summary"]) if data["measurements"] else []
    if data.get("overhead"):
        lines += report.overhead_summary_lines(data["overhead"])
    if data.get("variants"):
        lines += report.variant_summary_lines(data["variants"])
    if data.get("linear"):
        lines += report.linear_summary_lines(data["linear"])
    if data.get("integrations"):
        lines += report.integration_summary_lines(data["integrations"])
    lines += [f"note: {note}" for note in data["meta"]["notes"]]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
