"""Global-memory traffic of the CUDA kernels, counted by the CPU emulator (tests/emu): bytes read and
written per logit for each step a training loop runs, with the launch plan an H100 or an A100 gets.

    python -m bench.traffic                         # the benchmark's shapes, bf16 and fp32
    python -m bench.traffic --shapes 4096x128256 --dtypes bf16 --device a100

This is the model the kernels implement (every load and store of their source, counted), not a
measurement on a GPU: caches are not modelled (a value re-read from L2 counts as a read). Rows are
emulated on at most --rows positions, which keeps the per-logit ratios of the full shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.harness import parse_dtypes, parse_shapes
from bench.ops import CUDA_ONLY_SHAPES, DEFAULT_SHAPES

ROOT = Path(__file__).resolve().parents[1]
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# (SMs, opt-in shared memory less the kernels' static use, blocks per cluster), as
# csrc/cuda/cross_entropy.cu reads them.
DEVICES = {"h100": (132, 227 * 1024 - 2048, 8), "a100": (108, 163 * 1024 - 2048, 0)}
# fwd+bwd: loss.backward() (mean); x0.5: an upstream gradient of 0.5 (GradScaler, accumulation);
# none: reduction='none' with a random upstream gradient; inference: no gradient.
STEPS = ("fwd+bwd", "fwd+bwd x0.5", "none fwd+bwd", "inference")


def load_emulator():
    sys.path.insert(0, str(ROOT / "tests"))
    import emulator

    return emulator.load()


def measure(emu, shape, dtype, step):
    import smoothce

    C = shape[1]
    x = torch.randn(shape, dtype=dtype)
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]))
    emu.reset_traffic()
    if step == "inference":
        with torch.no_grad():
            smoothce.cross_entropy(x, target, label_smoothing=0.1)
    else:
        x.requires_grad_(True)
        reduction = "none" if step == "none fwd+bwd" else "mean"
        loss = smoothce.cross_entropy(x, target, label_smoothing=0.1, reduction=reduction)
        loss.backward(torch.rand_like(loss) if reduction == "none" else torch.tensor(0.5 if "x0.5" in step else 1.0))
    read, write = emu.traffic()
    logits = x.numel() * x.element_size()
    return read / logits, write / logits, emu.last_plan()


def print_table(emu, args) -> None:
    shapes = args.shapes or list(DEFAULT_SHAPES) + list(CUDA_ONLY_SHAPES)
    print(f"global-memory traffic per logit, modelled by the emulator for {args.device} limits "
          f"(R = bytes read / logit bytes, W = bytes written / logit bytes; torch {torch.__version__})\n")
    print("| shape | dtype | plan | " + " | ".join(f"{step} R / W" for step in STEPS) + " |")
    print("|---|---|---|" + "---|" * len(STEPS))
    for shape in shapes:
        # fewer positions, same classes: the per-logit ratios of the full shape
        emulated = (1,) + tuple(shape[1:]) if len(shape) > 2 else (min(shape[0], args.rows),) + tuple(shape[1:])
        for name in args.dtypes:
            cells, plan = [], None
            for step in STEPS:
                read, write, plan = measure(emu, emulated, DTYPE[name], step)
                cells.append(f"{read:.2f} / {write:.2f}")
            variant = plan["variant"]
            if variant == "strided":
                variant += " (staged)" if plan["staged"] else " (unstaged)"
            print(f"| {'x'.join(map(str, shape))} | {name} | {variant} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, help="e.g. 4096x32000,8x21x256x256 (default: the benchmark's)")
    parser.add_argument("--dtypes", type=parse_dtypes, default=["bf16", "fp32"])
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--rows", type=int, default=8, help="positions emulated per shape (default 8)")
    args = parser.parse_args(argv)

    emu = load_emulator()
    from smoothce import _function

    saved_ops, saved_limits = _function._ops, emu.limits()
    _function._ops = torch.ops.smoothce_emu
    sm_count, max_smem, cluster_blocks = DEVICES[args.device]
    emu.set_limits(sm_count=sm_count, max_smem=max_smem, split_chunk=8192, max_cluster_blocks=cluster_blocks)
    try:
        print_table(emu, args)
    finally:
        _function._ops = saved_ops
        emu.set_limits(**saved_limits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
