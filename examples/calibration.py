"""Label smoothing and calibration: a small CNN on scikit-learn's handwritten digits.

Trains the same network (same initial weights, same batches) once per smoothing ε with
``smoothce.CrossEntropyLoss(label_smoothing=ε)`` and reports, on a held-out stratified split:
accuracy, the plain (un-smoothed) NLL, the expected calibration error (torchmetrics, top-label,
L1, 15 uniform bins) and the mean max-probability (confidence). Writes a reliability diagram
(calibration.png, one panel per ε) and a markdown table (calibration.md).

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn: nothing is downloaded.

    python examples/calibration.py                   # ε = 0, 0.1, 0.2 into examples/results/
    python examples/calibration.py --quick --out /tmp/cal   # a data slice, 2 epochs: seconds
    python examples/calibration.py --loss torch      # the same run with torch's cross_entropy

``--loss torch`` swaps in ``torch.nn.CrossEntropyLoss``: the per-step losses agree with smoothce's
to fp32 rounding (tests/test_example_calibration.py checks it). Over hundreds of SGD steps those
last-bit differences grow, so the two tables can differ from the third or fourth decimal on.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics.functional.classification import multiclass_calibration_error  # noqa: E402
from tqdm import tqdm  # noqa: E402

import smoothce  # noqa: E402

NUM_CLASSES = 10
N_BINS = 15  # calibration bins, for the ECE and the diagram alike (torchmetrics' default)
DEFAULT_EPS = (0.0, 0.1, 0.2)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LOSSES = ("smoothce", "torch")
# How the ε mass is spread: "uniform" (ε/C on every class, torch's definition) or "others" (ε/(C-1) on
# the C-1 wrong classes only; smoothce's smoothing="others", which torch does not have).
SMOOTHING_VARIANTS = ("uniform", "others")


@dataclass
class Config:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    test_size: float = 0.25
    subset: int | None = None  # train and test on a stratified slice of this many images (--quick)
    seed: int = 0


@dataclass
class Result:
    eps: float
    accuracy: float
    nll: float
    ece: float
    confidence: float
    train_loss: float  # mean (smoothed) training loss over the last epoch
    probs: torch.Tensor  # test-set probabilities (N, C), for the diagram
    target: torch.Tensor


def seed_everything(seed: int) -> None:
    """Fixed seeds and deterministic kernels: the same command gives the same numbers on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_data(cfg: Config):
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1] as (N, 1, 8, 8) float32, int64 labels."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    if cfg.subset is not None and cfg.subset < len(y):
        keep, _ = train_test_split(np.arange(len(y)), train_size=cfg.subset, stratify=y.numpy(),
                                   random_state=cfg.seed)
        x, y = x[keep], y[keep]
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=cfg.test_size, stratify=y.numpy(),
                                           random_state=cfg.seed)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def make_model() -> nn.Module:
    """Two 3x3 convolutions and a pooling step (8x8 -> 4x4), then a two-layer classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


def make_loss(loss: str, eps: float, smoothing: str = "uniform") -> nn.Module:
    """The training criterion: smoothce's fused loss, or torch's for comparison (same numbers)."""
    if smoothing not in SMOOTHING_VARIANTS:
        raise ValueError(f"smoothing must be one of {SMOOTHING_VARIANTS}, got {smoothing!r}")
    if loss == "smoothce":
        return smoothce.CrossEntropyLoss(label_smoothing=eps, smoothing=smoothing)
    if smoothing != "uniform":
        raise ValueError(f"torch's cross_entropy has no smoothing={smoothing!r}; use --loss smoothce")
    if loss == "torch":
        return nn.CrossEntropyLoss(label_smoothing=eps)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def train(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config,
          desc: str = "train", progress: bool = True, max_steps: int | None = None) -> torch.Tensor:
    """SGD with momentum over shuffled mini-batches; returns the loss of every step (float32)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    shuffle = torch.Generator().manual_seed(cfg.seed)  # the same batches whatever the loss or ε
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
    losses = []
    model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=True, dynamic_ncols=True) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(y), generator=shuffle)
            for start in range(0, len(y), cfg.batch_size):
                if len(losses) == total:
                    return torch.tensor(losses)
                batch = order[start:start + cfg.batch_size]
                loss = criterion(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update()
    return torch.tensor(losses)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, plain NLL (no smoothing), top-label ECE and mean max-probability on (x, y)."""
    model.eval()
    logits = model(x)
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    return dict(
        accuracy=(predicted == y).float().mean().item(),
        nll=F.cross_entropy(logits, y).item(),
        ece=multiclass_calibration_error(probs, y, num_classes=NUM_CLASSES, n_bins=N_BINS, norm="l1").item(),
        confidence=confidence.mean().item(),
        probs=probs,
    )


def run_one(eps: float, data, cfg: Config, loss: str = "smoothce", smoothing: str = "uniform",
            progress: bool = True) -> Result:
    """Trains a fresh model (the same initial weights for every ε) and evaluates it on the test split."""
    x_train, y_train, x_test, y_test = data
    seed_everything(cfg.seed)
    model = make_model()
    steps = train(model, make_loss(loss, eps, smoothing), x_train, y_train, cfg, desc=f"ε={eps:g}",
                  progress=progress)
    last_epoch = steps[-math.ceil(len(y_train) / cfg.batch_size):]
    metrics = evaluate(model, x_test, y_test)
    return Result(eps=eps, train_loss=last_epoch.mean().item(), target=y_test, **metrics)


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS):
    """Per confidence bin: (accuracy, mean confidence, count), uniform bins over [0, 1] as torchmetrics
    uses them (a confidence of exactly 1.0 is put in the last bin here; torchmetrics gives it its own)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == target).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    acc = torch.bincount(index, weights=correct, minlength=n_bins) / count.clamp(min=1)
    conf = torch.bincount(index, weights=confidence.double(), minlength=n_bins) / count.clamp(min=1)
    return acc.numpy(), conf.numpy(), count.long().numpy()


def plot_reliability(results: list[Result], path: Path, n_bins: int = N_BINS) -> None:
    """One reliability diagram per ε: accuracy per confidence bin against the diagonal, the gap between
    accuracy and the bin's mean confidence shaded (red: over-confident, orange: under-confident), and
    the number of test images above each bar."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.8), squeeze=False, layout="constrained")
    width = 1.0 / n_bins
    left = np.arange(n_bins) * width
    gap_styles = ((dict(facecolor="#f08080", edgecolor="k", hatch="//", hatchcolor="darkred"),
                   "gap: over-confident (conf > acc)"),
                  (dict(facecolor="none", edgecolor="k", hatch="//", hatchcolor="orange"),
                   "gap: under-confident (acc > conf)"))
    for ax, res in zip(axes[0], results):
        acc, conf, count = reliability_bins(res.probs, res.target, n_bins)
        filled = count > 0
        x0, acc, conf, count = left[filled], acc[filled], conf[filled], count[filled]
        ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1)
        ax.bar(x0, acc, width=width, align="edge", color="tab:blue", edgecolor="k", lw=0.6)
        # The gap from accuracy to mean confidence: above the bar when over-confident, over its top part
        # (hatched, the bar showing through) when under-confident; a black tick marks the mean confidence.
        over = conf > acc
        for mask, (style, _) in zip((over, ~over), gap_styles):
            ax.bar(x0[mask], (conf - acc)[mask], bottom=acc[mask], width=width, align="edge", lw=0.4, **style)
        ax.hlines(conf, x0, x0 + width, color="k", lw=1.6)
        for x, top, n in zip(x0, np.maximum(acc, conf), count):
            ax.text(x + width / 2, top + 0.015, str(n), ha="center", va="bottom", fontsize=6.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (max probability)")
        ax.set_title(f"ε = {res.eps:g}\nacc {res.accuracy:.3f} · ECE {res.ece:.3f} · mean conf {res.confidence:.3f}",
                     fontsize=10)
    axes[0][0].set_ylabel("accuracy in bin")
    handles = [Line2D([], [], ls="--", color="0.3", label="perfect calibration"),
               Patch(facecolor="tab:blue", edgecolor="k", label="accuracy"),
               Line2D([], [], color="k", lw=1.6, label="mean confidence")]
    handles += [Patch(label=label, **{**style, "facecolor": style["facecolor"].replace("none", "tab:blue")})
                for style, label in gap_styles]
    axes[0][0].legend(handles=handles, loc="upper left", fontsize=7.5)
    fig.suptitle(f"Reliability diagrams on the digits test split ({N_BINS} bins; numbers: test images per bin)",
                 fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(results: list[Result], cfg: Config, loss: str, n_train: int, n_test: int,
                   seconds: float) -> str:
    threads = torch.get_num_threads()
    lines = [
        "# Label smoothing and calibration (digits, small CNN)",
        "",
        f"Loss: `{loss}`; {cfg.epochs} epochs, batch {cfg.batch_size}, SGD lr {cfg.lr} momentum {cfg.momentum}, "
        f"seed {cfg.seed}; {n_train} train / {n_test} test images (stratified). "
        f"ECE: torchmetrics top-label, L1, {N_BINS} bins. NLL: plain (un-smoothed) test NLL. "
        f"torch {torch.__version__}, smoothce {smoothce.__version__}; trained in {seconds:.0f} s on "
        f"{threads} CPU thread{'s' if threads > 1 else ''}.",
        "",
        "| ε | accuracy | NLL | ECE | mean confidence | final train loss |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.eps:g} | {r.accuracy:.4f} | {r.nll:.4f} | {r.ece:.4f} | {r.confidence:.4f} "
                     f"| {r.train_loss:.4f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS),
                        help="label-smoothing values to train with (default: 0 0.1 0.2)")
    parser.add_argument("--smoothing", choices=SMOOTHING_VARIANTS, default="uniform",
                        help="how ε is spread over the classes (only 'uniform' for now)")
    parser.add_argument("--loss", choices=LOSSES, default="smoothce",
                        help="smoothce.CrossEntropyLoss or torch.nn.CrossEntropyLoss (same numbers)")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: {Config.epochs}; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 300-image slice and 2 epochs (seconds; too short to learn much)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the model is tiny, more threads mostly add contention)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: examples/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for eps in args.eps:
        if not 0.0 <= eps <= 1.0:
            parser.error(f"--eps values must lie in [0, 1], got {eps}")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(seed=args.seed)
    if args.quick:
        cfg.subset, cfg.epochs = 300, 2
    if args.epochs is not None:
        cfg.epochs = args.epochs

    start = time.perf_counter()
    data = load_data(cfg)
    n_train, n_test = len(data[1]), len(data[3])
    print(f"digits: {n_train} train / {n_test} test images; loss={args.loss}, {cfg.epochs} epochs", flush=True)
    results = [run_one(eps, data, cfg, args.loss, args.smoothing, progress=not args.no_progress)
               for eps in args.eps]
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, cfg, args.loss, n_train, n_test, seconds)
    (args.out / "calibration.md").write_text(table, encoding="utf-8")
    plot_reliability(results, args.out / "calibration.png")
    print(table)
    print(f"wrote {args.out / 'calibration.md'} and {args.out / 'calibration.png'} ({seconds:.1f} s training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
