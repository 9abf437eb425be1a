"""Vocabulary-parallel cross-entropy over torch.distributed: 2 CPU processes (gloo on 127.0.0.1), the
classes split in half, one fwd+bwd step timed on every rank.

    python -m bench                         # the other tables, then this one
    python -m bench.distributed             # this table only: <out>/cpu-distributed.json, .md
    python -m bench.distributed --quick     # tiny shapes

Contenders, in the same two processes, round-robin, a barrier before every call:
  smoothce_vp     smoothce.distributed.vocab_parallel_cross_entropy on the rank's shard
  torch_vp        a plain-PyTorch vocab-parallel loss with the right formula (all-reduce of the max, then of
                  Σexp, the target logit and Σx; its own autograd.Function, as Megatron-LM writes one)
  dtensor         F.cross_entropy on DTensor logits Shard(1) under torch.distributed.tensor.parallel.loss_parallel()
                  (ε = 0 only: it does not support label smoothing)
  smoothce_full   smoothce.cross_entropy on the full logits, every rank holding them (no vocabulary parallelism)
  torch_full      F.cross_entropy on the full logits, likewise
The time of a call is the slowest rank's; per-rank peak memory is the most any rank allocated during one
call (the profiler's allocation events), the rank's logits and their gradient not counted as inputs but
the gradient counted as allocated. Each process has one thread (OMP_NUM_THREADS=1), so the two ranks
share the machine's cores as tensor-parallel ranks share a node.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import report
from bench.harness import (DTYPES, IGNORED_FRACTION, LABEL_SMOOTHING, ROOT, cpu_peak_extra_bytes, device_name,
                           load_average, machine_metadata, run_then_exit)

WORLD = 2
IGNORE_INDEX = -100
RUNS = 10
QUICK_RUNS = 3
TIMEOUT_S = 600
# (N, V, dtype): positions and vocabulary of a language model's loss, sized for a 2-core CPU.
SHAPES = ((2048, 32000, "fp32"), (512, 128256, "fp32"), (1024, 32000, "bf16"))
QUICK_SHAPES = ((64, 1000, "fp32"),)
CONTENDERS = {
    "smoothce_vp": "smoothce vocab_parallel_cross_entropy",
    "torch_vp": "plain-PyTorch vocab-parallel (right formula)",
    "dtensor": "DTensor loss_parallel() + F.cross_entropy",
    "smoothce_full": "smoothce.cross_entropy, full logits on every rank",
    "torch_full": "F.cross_entropy, full logits on every rank",
}
DEFINITIONS = {
    "smoothce_vp": "`vocab_parallel_cross_entropy(shard, t, label_smoothing=ε, group=g)`: two all-gathers (40 "
                   "integers per rank; 10 floats per position per rank), the shard read twice and its gradient "
                   "written once in the forward call.",
    "torch_vp": "an autograd.Function in plain PyTorch: all-reduce MAX of the max, all-reduce SUM of (Σexp, target "
                "logit, Σx) per position, loss lse − (1 − ε)·x_t − (ε/C)·Σx, gradient p − q from the saved fp32 "
                "softmax of the shard (Megatron-LM's structure with the smoothing term over all C classes).",
    "dtensor": "`F.cross_entropy(DTensor.from_local(shard, mesh, [Shard(1)]), t)` and its backward under "
               "`loss_parallel()`; label smoothing is not supported there, so ε = 0 only.",
    "smoothce_full": "`smoothce.cross_entropy(full, t, label_smoothing=ε)`: what a rank pays without vocabulary "
                     "parallelism (the full N×V logits and gradient on every rank).",
    "torch_full": "`F.cross_entropy(full, t, label_smoothing=ε)`, likewise.",
}
CHECK_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


# ----------------------------------------------------------------------------- the plain-PyTorch loss
class TorchVocabParallel(torch.autograd.Function):
    """Uniform label smoothing over all C classes, mean over the non-ignored targets, in plain PyTorch:
    lse = m + log Σ_r Σexp(x − m), loss_i = lse − (1 − ε)·x_t − (ε/C)·Σ_c x_c; the gradient p − q from the
    saved softmax of the shard. Three collectives (MAX, then one SUM of three values per position; the
    count of targets is the same on every rank)."""

    @staticmethod
    def forward(ctx, x, target, start, num_classes, eps, group):
        import torch.distributed as dist

        if os.environ.get("SMOOTHCE_BENCH_WRONG_VP") == "1":  # tests/test_bench.py: Megatron-LM's mistake,
            num_classes = x.shape[1]                           # the shard's class count in the smoothing
        xf = x.float()
        m = xf.max(dim=1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(xf - m[:, None])
        local = target - start
        held = (local >= 0) & (local < x.shape[1])
        index = local.clamp(0, x.shape[1] - 1)[:, None]
        sums = torch.stack([e.sum(1), torch.where(held, xf.gather(1, index).squeeze(1), 0.0), xf.sum(1)])
        dist.all_reduce(sums, group=group)
        valid = target != IGNORE_INDEX
        count = valid.sum().clamp_min(1).float()
        lse = m + torch.log(sums[0])
        losses = lse - (1 - eps) * sums[1] - (eps / num_classes) * sums[2]
        e /= sums[0][:, None]  # the shard's softmax, kept for backward
        ctx.save_for_backward(e, index, held, valid, count)
        ctx.eps, ctx.num_classes, ctx.dtype = eps, num_classes, x.dtype
        return (losses * valid).sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, index, held, valid, count = ctx.saved_tensors
        g = softmax - ctx.eps / ctx.num_classes
        g.scatter_add_(1, index, -(1 - ctx.eps) * held.float()[:, None])
        g *= (valid.float() * grad / count)[:, None]
        return g.to(ctx.dtype), None, None, None, None, None


# ----------------------------------------------------------------------------- one rank
def _barrier_time(step, group) -> float:
    import torch.distributed as dist

    dist.barrier(group=group)
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _rank_main(rank: int, port: int, shapes, runs: int, out: Optional[Path]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import smoothce
    from smoothce.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        group = mesh.get_group()
        results = []
        for n, v, dtype_name in shapes:
            dtype = DTYPES[dtype_name]
            generator = torch.Generator().manual_seed(0)
            full = (torch.randn(n, v, generator=generator) * 2).to(dtype)
            target = torch.randint(0, v, (n,), generator=generator)
            target[torch.rand(n, generator=generator) < IGNORED_FRACTION] = IGNORE_INDEX
            size = v // WORLD
            start = rank * size
            shard = full[:, start:start + size].contiguous().requires_grad_(True)
            full.requires_grad_(True)
            for eps in (LABEL_SMOOTHING, 0.0):
                def smoothce_vp():
                    return vocab_parallel_cross_entropy(shard, target, label_smoothing=eps, group=group)

                def torch_vp():
                    return TorchVocabParallel.apply(shard, target, start, v, eps, group)

                def smoothce_full():
                    return smoothce.cross_entropy(full, target, label_smoothing=eps)

                def torch_full():
                    return F.cross_entropy(full, target, label_smoothing=eps)

                def dtensor_step():
                    logits = DTensor.from_local(shard, mesh, [Shard(1)], run_check=False)
                    with loss_parallel():
                        F.cross_entropy(logits, target, label_smoothing=eps).backward()

                losses = {"smoothce_vp": smoothce_vp, "torch_vp": torch_vp, "smoothce_full": smoothce_full,
                          "torch_full": torch_full}
                steps = {name: (lambda loss=loss: loss().backward()) for name, loss in losses.items()}
                skipped = {}
                if eps == 0.0:
                    steps["dtensor"] = dtensor_step
                else:
                    skipped["dtensor"] = "DTensor loss_parallel() does not support label smoothing"
                # Checks: every contender's loss and shard gradient against smoothce on the full logits.
                checks = []
                for name, step in steps.items():
                    shard.grad = full.grad = None
                    value = losses[name]().detach() if name in losses else None
                    if name == "dtensor":
                        step()
                    else:
                        losses[name]().backward()
                    grad = shard.grad if shard.grad is not None else full.grad[:, start:start + size]
                    if name == "smoothce_full":
                        want_loss, want_grad = value, grad.clone()
                    checks.append((name, value, grad.clone()))
                bad = []
                for name, value, grad in checks:
                    if value is not None and not torch.allclose(value.float(), want_loss.float(),
                                                                rtol=CHECK_RTOL[dtype_name]):
                        bad.append(f"{name}: loss {float(value):.6g} vs {float(want_loss):.6g}")
                    scale = want_grad.float().abs().max()
                    if (grad.float() - want_grad.float()).abs().max() > CHECK_RTOL[dtype_name] * scale:
                        bad.append(f"{name}: gradient off by {float((grad.float() - want_grad.float()).abs().max()):.3g}")
                # Memory, then timing rounds (rotated order, a barrier before each call).
                memory = {}
                for name, step in steps.items():
                    shard.grad = full.grad = None
                    smoothce.empty_cache()  # smoothce's reused gradient buffer: its allocation counts here
                    memory[name] = cpu_peak_extra_bytes(step)
                times = {name: [] for name in steps}
                names = list(steps)
                for round_index in range(runs + 1):  # the first round warms up
                    shift = round_index % len(names)
                    for name in names[shift:] + names[:shift]:
                        shard.grad = full.grad = None
                        elapsed = _barrier_time(steps[name], group)
                        if round_index > 0:
                            times[name].append(elapsed)
                results.append({"shape": [n, v], "dtype": dtype_name, "label_smoothing": eps, "times_s": times,
                                "memory_bytes": memory, "skipped": skipped, "check_failures": bad})
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, results, group=group)
        if rank == 0 and out is not None:
            out.write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the parent
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(quick: bool, runs: Optional[int] = None, dtypes: Optional[list[str]] = None) -> dict:
    """Runs the two ranks and returns the table's data (rows merged over the ranks)."""
    shapes = [s for s in (QUICK_SHAPES if quick else SHAPES) if dtypes is None or s[2] in dtypes]
    runs = runs or (QUICK_RUNS if quick else RUNS)
    started, load_before = time.perf_counter(), load_average()
    scratch = ROOT / "build" / "bench-distributed"
    scratch.mkdir(parents=True, exist_ok=True)
    raw_path = scratch / "ranks.json"
    raw_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.distributed", "--rank", str(rank), "--port", str(port),
                               "--shapes-json", json.dumps(shapes), "--runs", str(runs), "--raw", str(raw_path)],
                              env=env, cwd=ROOT) for rank in range(WORLD)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    # Rank 0 writes every rank's results after they all finished measuring (all_gather_object), so a
    # complete file stands even if a rank died in its exit afterwards; it is reported with the results.
    try:
        ranks = json.loads(raw_path.read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"the distributed benchmark's ranks failed (exit codes {codes})") from None
    if len(ranks) != WORLD:
        raise RuntimeError(f"the distributed benchmark's ranks failed (exit codes {codes}): results of {len(ranks)} "
                           f"ranks")
    rows = []
    for per_rank in zip(*ranks):
        first = per_rank[0]
        row = {key: first[key] for key in ("shape", "dtype", "label_smoothing", "skipped")}
        row["check_failures"] = sorted({f for r in per_rank for f in r["check_failures"]})
        row["times_ms"] = {name: [1e3 * max(ts) for ts in zip(*(r["times_s"][name] for r in per_rank))]
                           for name in first["times_s"]}
        row["peak_bytes"] = {name: max((r["memory_bytes"][name] for r in per_rank
                                        if r["memory_bytes"][name] is not None), default=None)
                             for name in first["memory_bytes"]}
        rows.append(row)
    meta = machine_metadata("cpu", device_name("cpu"))
    meta.update(world_size=WORLD, backend="gloo", threads_per_rank=1, runs=runs, quick=quick,
                load_average_before=load_before, elapsed_s=round(time.perf_counter() - started, 1),
                rank_exit_codes=codes)
    return {"meta": meta, "rows": rows}


def summary_lines(data: dict) -> list[str]:
    codes = data["meta"].get("rank_exit_codes") or []
    lines = [f"note: a rank exited with status {codes} after its results were written"] if any(codes) else []
    for row in data["rows"]:
        medians = {name: statistics.median(times) for name, times in row["times_ms"].items() if times}
        mine = medians.get("smoothce_vp")
        others = ", ".join(f"{name} {medians[name] / mine:.2f}x" for name in medians if name != "smoothce_vp")
        memory = row["peak_bytes"]
        lines.append(f"vocab-parallel {row['shape'][0]}x{row['shape'][1]} {row['dtype']} eps={row['label_smoothing']}: "
                     f"smoothce {mine:.1f} ms, peak {report.fmt_bytes(memory.get('smoothce_vp'))}/rank; "
                     f"time of the others / smoothce: {others}"
                     + (f"; CHECK FAILED: {'; '.join(row['check_failures'])}" if row["check_failures"] else ""))
    return lines


def _fmt_load(value) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# Vocabulary-parallel cross-entropy: 2 ranks (gloo, CPU)", "",
             f"{meta['device_name']} ({meta['cpu_capability']}), torch {meta['torch_version']}, {meta['date']} "
             f"(load average {_fmt_load(meta.get('load_average_before'))} before); {meta['world_size']} processes "
             f"on 127.0.0.1, one thread each; {meta['runs']} timed rounds after one warm-up round, round-robin, a "
             f"barrier before every call; time = the slowest rank's, median (quartiles); peak = the most one rank "
             f"allocated during a call. Classes split in half; ~{IGNORED_FRACTION:.0%} of the targets ignored.",
             "", "| shape | dtype | ε | contender | time (ms) | / smoothce | peak per rank | check |",
             "|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        medians = {name: statistics.median(t) for name, t in row["times_ms"].items() if t}
        for name, title in CONTENDERS.items():
            shape = f"{row['shape'][0]}×{row['shape'][1]}"
            if name in row["skipped"]:
                lines.append(f"| {shape} | {row['dtype']} | {row['label_smoothing']} | {title} | – | – | – | "
                             f"skipped: {row['skipped'][name]} |")
                continue
            times = sorted(row["times_ms"][name])
            q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
            failed = [f for f in row["check_failures"] if f.startswith(name + ":")]
            lines.append(f"| {shape} | {row['dtype']} | {row['label_smoothing']} | {title} | {medians[name]:.1f} "
                         f"({q1:.1f}–{q3:.1f}) | {medians[name] / medians['smoothce_vp']:.2f}× | "
                         f"{report.fmt_bytes(row['peak_bytes'][name])} | {'FAILED ' + '; '.join(failed) if failed else 'ok'} |")
    lines += [""] + [f"- **{CONTENDERS[name]}**: {text}" for name, text in DEFINITIONS.items()] + [""]
    return "\n".join(lines)


def output_stem(quick: bool) -> str:
    return "cpu-distributed" + ("-quick" if quick else "")


def run(out: Path, quick: bool, runs: Optional[int] = None, dtypes: Optional[list[str]] = None) -> dict:
    """Measures, writes <out>/cpu-distributed.json and .md, returns the data."""
    data = measure(quick, runs, dtypes)
    stem = output_stem(quick)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(data), encoding="utf-8")
    return data


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shapes-json", help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:  # one of the ranks: its results are in args.raw (written and closed) once
        # _rank_main returns; the process then ends with os._exit (see run_then_exit)
        run_then_exit(lambda: _rank_main(args.rank, args.port, [tuple(s) for s in json.loads(args.shapes_json)],
                                         args.runs, args.raw))
    out = args.out or ROOT / "bench" / "results" / ("scratch" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    data = run(out, args.quick, args.runs)
    print("\n".join(summary_lines(data)))
    return 1 if any(row["check_failures"] for row in data["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
