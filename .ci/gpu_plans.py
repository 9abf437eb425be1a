"""One shape per CUDA launch plan (csrc/cuda/plan.h), forward and backward, checked against PyTorch.

Run by .ci/gpu_check.sh (`make gpu-check`): once with the profiler, to report which kernels each case
launched (so which plan ran), and once under each compute-sanitizer tool (with --no-profile: CUPTI and
the sanitizer do not mix). Every case runs even when an earlier one failed; the exit status is 1 when
any case failed (wrong numbers, an error, or with the profiler a plan other than the expected one).

    .venv/bin/python .ci/gpu_plans.py                  # all cases on cuda, with the kernel report
    .venv/bin/python .ci/gpu_plans.py --no-profile     # (under compute-sanitizer)
    .venv/bin/python .ci/gpu_plans.py --device cpu     # the same cases on the CPU kernels (dry run)
    .venv/bin/python .ci/gpu_plans.py --list
    .venv/bin/python .ci/gpu_plans.py --only cluster,split
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    dtype: torch.dtype
    plan: str            # the plan expected on a GPU with thread-block clusters (sm_90 and newer)
    soft: bool = False   # probability targets instead of class indices
    note: str = ""


# Expected plans on an H100/H200 (sharedMemPerBlockOptin 227 KiB, clusters of up to 8 blocks).
CASES = (
    Case("rows_sub_warp", (4099, 50), torch.float32, "rows", note="several rows per warp"),
    Case("rows_warp", (4096, 1000), torch.float32, "rows", note="a row per warp"),
    Case("rows_warp_bf16", (4096, 1000), torch.bfloat16, "rows", note="a row per warp, bf16"),
    Case("rows_block", (64, 8000), torch.float32, "rows", note="a block per row"),
    Case("rows_block_soft", (64, 8000), torch.float32, "rows", soft=True, note="probability targets"),
    Case("cluster", (8, 200000), torch.float32, "cluster", note="a row over a cluster of blocks"),
    Case("split", (4, 3000000), torch.float32, "split", note="a row too long even for a cluster"),
    Case("strided", (4, 21, 64, 64), torch.float32, "strided", note="(N, C, H, W)"),
)

# Kernel names (csrc/cuda/kernels.cuh) that show which plan ran, demangled or not (rows_kernel must
# not match cluster_rows_kernel).
PLAN_KERNELS = {plan: re.compile(r"(?<![A-Za-z_])" + kernel) for plan, kernel in (
    ("rows", "rows_kernel"), ("cluster", "cluster_rows_kernel"), ("split", "split_state_kernel"),
    ("strided", "strided_kernel"))}
# Loss and gradient tolerance, relative to max |reference|.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def expected_plan(case: Case, device: str) -> Optional[str]:
    if device != "cuda":
        return None
    if case.plan == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        return "split"  # no thread-block clusters before sm_90: the planner splits the row instead
    return case.plan


def make_inputs(case: Case):
    """(logits, target, weight) on CPU, from fixed seeds: index targets with some ignored positions,
    or probability targets."""
    g = torch.Generator().manual_seed(0)
    C = case.shape[1]
    x = (torch.randn(case.shape, generator=g) * 3).to(case.dtype)
    positions = case.shape[:1] + case.shape[2:]
    if case.soft:
        target = torch.softmax(torch.randn(case.shape, generator=g) * 2, dim=1).to(case.dtype)
    else:
        target = torch.randint(0, C, positions, generator=g)
        flat = target.view(-1)
        flat[::7] = -100  # ignore_index (with 4 or 8 rows: the first row)
    weight = (torch.rand(C, generator=g) + 0.5).to(case.dtype)
    return x, target, weight


def reference(x, target, weight):
    """Loss and input gradient in fp64 on CPU, from the same (rounded) values."""
    leaf = x.double().requires_grad_(True)
    target = target.double() if target.is_floating_point() else target
    loss = F.cross_entropy(leaf, target, weight.double(), label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    return loss.detach(), leaf.grad


def relative_error(value, truth) -> float:
    scale = truth.abs().max().item() or 1.0
    return (value.double().cpu() - truth).abs().max().item() / scale


def run_case(case: Case, device: str, smoothce) -> dict:
    """Forward without the gradient, then forward + backward; both checked against PyTorch."""
    x, target, weight = make_inputs(case)
    truth_loss, truth_grad = reference(x, target, weight)
    xd, td, wd = x.to(device), target.to(device), weight.to(device)
    with torch.no_grad():
        loss_only = smoothce.cross_entropy(xd, td, wd, label_smoothing=LABEL_SMOOTHING)
    leaf = xd.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, td, wd, label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    errors = {
        "loss (no grad)": relative_error(loss_only, truth_loss),
        "loss": relative_error(loss, truth_loss),
        "grad": relative_error(leaf.grad, truth_grad),
    }
    tolerance = TOLERANCE[case.dtype]
    bad = [f"{what} error {err:.2e} > {tolerance:g}" for what, err in errors.items() if not err <= tolerance]
    return {"errors": errors, "problems": bad}


def kernels_of(prof) -> list[str]:
    names = []
    for event in prof.events():
        device_type = getattr(event, "device_type", None)
        if device_type is not None and device_type != torch.autograd.DeviceType.CUDA:
            continue
        if event.name not in names:
            names.append(event.name)
    return names


def short_kernel_name(name: str) -> str:
    """'void smoothce::cuda::rows_kernel<float>(...)' -> 'rows_kernel<float>'."""
    name = name.split("(", 1)[0]
    name = name.replace("void ", "")
    return name.rsplit("::", 1)[-1] if "smoothce" in name else name


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=".ci/gpu_plans.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu: the same cases on the CPU kernels, a dry run of this script")
    parser.add_argument("--only", type=lambda text: [name for name in text.split(",") if name],
                        help="comma-separated case names (see --list)")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not record the kernels launched (use under compute-sanitizer)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    names = [case.name for case in CASES]
    if args.only:
        unknown = [name for name in args.only if name not in names]
        if unknown:
            parser.error(f"--only: unknown case(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cases = [case for case in CASES if not args.only or case.name in args.only]
    if args.list:
        for case in cases:
            dims = "x".join(map(str, case.shape))
            print(f"{case.name:16s} {dims:14s} {str(case.dtype).replace('torch.', ''):9s} "
                  f"plan {case.plan:8s} {'probability targets' if case.soft else 'index targets'}; {case.note}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_plans: no CUDA device is visible (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    import smoothce

    info = smoothce.build_info()
    print(f"gpu_plans: smoothce {smoothce.__version__} {info}, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()}, sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
             if args.device == "cuda" else ""), flush=True)
    if args.device == "cuda" and info.get("cuda") != "yes":
        print("gpu_plans: smoothce was built without its CUDA kernels", file=sys.stderr)
        return 1
    profile = args.device == "cuda" and not args.no_profile
    failed = 0
    for case in cases:
        dims = "x".join(map(str, case.shape))
        label = f"{case.name} ({dims} {str(case.dtype).replace('torch.', '')}{', soft' if case.soft else ''})"
        started = time.perf_counter()
        kernels: list[str] = []
        try:
            if profile:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    result = run_case(case, args.device, smoothce)
                kernels = kernels_of(prof)
            else:
                result = run_case(case, args.device, smoothce)
        except Exception:  # noqa: BLE001  (a failed case is reported; the other cases still run)
            failed += 1
            print(f"FAIL {label}: raised\n{traceback.format_exc()}", flush=True)
            continue
        problems = list(result["problems"])
        plan_text = ""
        expected = expected_plan(case, args.device)
        if profile:
            ours = [short_kernel_name(name) for name in kernels if "smoothce" in name]
            ran = [plan for plan, pattern in PLAN_KERNELS.items() if any(pattern.search(name) for name in kernels)]
            plan_text = f"; plan {'+'.join(ran) or '?'} (expected {expected}); kernels: {', '.join(ours) or 'none seen'}"
            if not kernels:
                plan_text += " (the profiler saw no kernels: plan not checked)"
            elif ran != [expected]:
                problems.append(f"ran plan {'+'.join(ran) or 'none'}, expected {expected}")
        elif expected:
            plan_text = f"; plan expected {expected} (not recorded)"
        errors = ", ".join(f"{what} {err:.1e}" for what, err in result["errors"].items())
        status = "FAIL" if problems else "ok  "
        failed += bool(problems)
        print(f"{status} {label}: {errors}{plan_text} [{time.perf_counter() - started:.1f} s]"
              + "".join(f"\n     {problem}" for problem in problems), flush=True)
    print(f"gpu_plans: {len(cases) - failed} of {len(cases)} cases passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
