"""examples/calibration.py: smoothce trains step for step like torch's cross_entropy, and the script
runs end to end (--quick) writing a reliability diagram and a table with one sane row per ε."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.cpu_only  # runs the CPU kernels on purpose (bench, example)

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "calibration.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 8


@pytest.fixture(scope="module")
def example():
    # examples/ is not a package: load the script as a module by path.
    name = "calibration_example_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@pytest.fixture
def restore_torch_state():
    """seed_everything() switches on deterministic algorithms process-wide: put it back for other tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_rng_state(rng)


def train_steps(example, loss, eps):
    """STEPS optimizer steps on a small slice (crossing an epoch boundary) from the example's seed."""
    cfg = example.Config(subset=200, batch_size=32, epochs=2, seed=0)  # 150 training images: 5 steps/epoch
    x, y, _, _ = example.load_data(cfg)
    example.seed_everything(cfg.seed)
    model = example.make_model()
    initial = [p.detach().clone() for p in model.parameters()]
    criterion = example.make_loss(loss, eps)
    losses = example.train(model, criterion, x, y, cfg, progress=False, max_steps=STEPS)
    return criterion, losses, initial, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.2])
def test_smoothce_trains_like_torch(example, restore_torch_state, eps):
    import smoothce

    ours, losses, initial, params = train_steps(example, "smoothce", eps)
    theirs, torch_losses, torch_initial, torch_params = train_steps(example, "torch", eps)
    assert isinstance(ours, smoothce.CrossEntropyLoss) and ours.label_smoothing == eps
    assert isinstance(theirs, torch.nn.CrossEntropyLoss) and theirs.label_smoothing == eps

    assert losses.shape == (STEPS,) and losses.dtype == torch.float32
    for a, b in zip(initial, torch_initial):  # the same seed gives the same starting point
        assert torch.equal(a, b)
    assert torch.unique(losses).numel() > 1, "the loss did not change from step to step"
    assert all(not torch.equal(a, b) for a, b in zip(initial, params)), "some parameters never moved"

    # fp32 rounding differences only: the losses agree to ~1e-5 relative at every step ...
    assert_close(losses, torch_losses, rtol=1e-5, atol=1e-6)
    # ... and so do the parameters after the steps.
    for index, (p, q) in enumerate(zip(params, torch_params)):
        assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, i=index: f"parameter {i}: {m}")


def table_rows(markdown):
    """The table's data rows as lists of floats (header and separator skipped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[float(cell) for cell in line.strip("|").split("|")] for line in lines[2:]]
    return header, rows


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"

    png = out / "calibration.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000, "the diagram looks empty"

    markdown = (out / "calibration.md").read_text(encoding="utf-8")
    header, rows = table_rows(markdown)
    assert header == ["ε", "accuracy", "NLL", "ECE", "mean confidence", "final train loss"]
    assert [row[0] for row in rows] == [0.0, 0.1, 0.2], "one row per ε, in order"
    for eps, accuracy, nll, ece, confidence, train_loss in rows:
        assert 0.0 <= accuracy <= 1.0
        assert 0.0 <= ece <= 1.0
        assert 1.0 / 10 - 1e-4 <= confidence <= 1.0, "the mean max-probability of 10 classes is >= 0.1"
        assert math.isfinite(nll) and nll >= 0.0
        assert math.isfinite(train_loss) and train_loss >= 0.0
    assert "| 0.1 |" in result.stdout, "the table is printed too"


def test_others_smoothing_variant(example):
    """--smoothing others trains with smoothce's smoothing='others' (torch has no such option)."""
    import smoothce
    import smoothce.reference as ref

    criterion = example.make_loss("smoothce", 0.2, "others")
    assert isinstance(criterion, smoothce.CrossEntropyLoss) and criterion.smoothing == "others"
    logits = torch.randn(16, example.NUM_CLASSES, dtype=torch.float64)
    target = torch.randint(0, example.NUM_CLASSES, (16,))
    expected = ref.cross_entropy(logits, target, label_smoothing=0.2, smoothing="others")
    assert_close(criterion(logits, target), expected)
    assert not torch.allclose(expected, ref.cross_entropy(logits, target, label_smoothing=0.2)), \
        "'others' must differ from uniform smoothing"
    with pytest.raises(ValueError, match="smoothing"):
        example.make_loss("torch", 0.2, "others")
