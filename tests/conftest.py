"""Shared helpers for the smoothce tests: input builders, a run-forward-and-backward helper and
the per-dtype accuracy check against a float64 ground truth.

Accuracy rule (all dtypes): the float64 reference (`smoothce.reference` on float64 copies of the
inputs) is the truth. smoothce's error against it must be no larger than
max(2 x torch's own error on the same low-precision input, FLOOR[dtype] x eps x scale)
plus RTOL_ULPS x eps x |truth| elementwise, where scale is max|truth|, or, where run_all supplies
them, the elementwise magnitude of the terms the value is made of (loss_magnitude, grad_magnitude). Where torch is not finite but the truth is
(fp16 smoothing overflow), only the floor applies.
"""
import importlib.util
import os
import pathlib
import sys

import pytest

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_reference():
    try:
        from smoothce import reference

        return reference
    except Exception:  # noqa: BLE001  (an unbuilt or broken extension fails in its own tests)
        # The extension is not built: load the oracle on its own so test_reference.py still runs.
        spec = importlib.util.spec_from_file_location(
            "smoothce_reference_standalone", ROOT / "smoothce" / "reference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ref = _load_reference()

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HALF_DTYPES = (torch.float16, torch.bfloat16)
REDUCTIONS = ["none", "mean", "sum"]
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)

# Floor of the error bound, in units of eps(dtype) x max|truth|.
FLOOR = {torch.float64: 64, torch.float32: 16, torch.float16: 4, torch.bfloat16: 4}
RTOL_ULPS = 2


# Which kernels the suite runs on: "cpu" (default), "emu" (the CUDA kernels' source on CPU through
# tests/emu: `make test-emu`) or "cuda" (a GPU: every call moves its tensors there and back, so the
# same tests check the CUDA kernels; `make test-gpu`).
BACKEND = os.environ.get("SMOOTHCE_TEST_BACKEND", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test (compile, >2^31 elements); run by default")
    config.addinivalue_line("markers", "cpu_only: checks the CPU kernels or the emulator themselves (runs on CPU "
                                       "whatever the backend)")
    config.addinivalue_line("markers", "not_on_cuda: runs on the CPU kernels under the cuda backend (CPU "
                                       "autocast; out-of-range targets, a device-side assert on CUDA)")
    if BACKEND not in ("cpu", "emu", "cuda"):
        raise pytest.UsageError(f"SMOOTHCE_TEST_BACKEND must be cpu, emu or cuda, got {BACKEND!r}")


def _on_cuda(impl):
    """cross_entropy_impl (or linear_cross_entropy_impl) on CUDA copies of the tensor arguments; the loss
    comes back to the caller's device through autograd (so backward runs the CUDA kernels too)."""
    def call(input, *args, **kwargs):
        def move(t):
            return t.to("cuda") if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
        args = [move(value) for value in args]  # target, weight / linear_weight, target
        kwargs = {name: move(value) for name, value in kwargs.items()}  # target_b, lam, linear_bias, ...
        loss = impl(move(input), *args, **kwargs)
        return loss.to(input.device) if isinstance(input, torch.Tensor) else loss
    return call


def _load_emulated_ops():
    """torch.ops.smoothce_emu.*, with the fake kernels of torch.ops.smoothce.* (opcheck, compile)."""
    import emulator
    from smoothce import _function, _linear

    emulator.load()
    if not getattr(_load_emulated_ops, "faked", False):
        torch.library.register_fake("smoothce_emu::forward")(_function._forward_fake)
        torch.library.register_fake("smoothce_emu::scale_grad_")(_function._scale_grad_fake)
        torch.library.register_fake("smoothce_emu::grad_")(_function._grad_fake)
        torch.library.register_fake("smoothce_emu::linear_forward")(_linear._linear_forward_fake)
        torch.library.register_fake("smoothce_emu::shard_stats")(_function._shard_stats_fake)
        torch.library.register_fake("smoothce_emu::shard_forward")(_function._shard_forward_fake)
        torch.library.register_fake("smoothce_emu::shard_grad_")(_function._shard_grad_fake)
        _load_emulated_ops.faked = True


def reset_upstream_guess():
    """Sets the C++ autograd node's guess of the next upstream gradient (csrc/autograd.cpp,
    g_expected_scale) back to 1: a fused backward on CPU that receives 1 sets it. Through the node with
    the CPU kernels whatever the test backend (under the cuda backend, smoothce.cross_entropy runs on
    the GPU, where backward leaves the guess as it is)."""
    from smoothce import _function

    z = torch.zeros(1, 2, requires_grad=True)
    _function._C.cross_entropy("smoothce", z, torch.zeros(1, dtype=torch.long), None, -100, 1, 0.0, False, None,
                               0.0, None, None, 1.0, True).backward()


@pytest.fixture(autouse=True)
def fresh_upstream_guess():
    """Every test starts from the guess a fresh process has, so that none depends on the upstream
    gradients of the tests before it (a fused forward scales its gradient by the guess, and a backward
    that gets another upstream gradient rescales or recomputes: more time, more traffic)."""
    reset_upstream_guess()


@pytest.fixture(autouse=True)
def backend(request, monkeypatch):
    """Routes smoothce's calls to the chosen kernels for every test not marked cpu_only."""
    if (BACKEND == "cpu" or request.node.get_closest_marker("cpu_only")
            or (BACKEND == "cuda" and request.node.get_closest_marker("not_on_cuda"))):
        return "cpu"
    import smoothce
    from smoothce import _function

    if BACKEND == "emu":
        _load_emulated_ops()
        monkeypatch.setattr(_function, "_ops", torch.ops.smoothce_emu)
    else:
        if not torch.cuda.is_available():
            pytest.skip("SMOOTHCE_TEST_BACKEND=cuda but no CUDA device is visible")
        monkeypatch.setattr(smoothce, "cross_entropy_impl", _on_cuda(_function.cross_entropy_impl))
        # (smoothce.integrations call it through the _function module)
        monkeypatch.setattr(_function, "cross_entropy_impl", smoothce.cross_entropy_impl)
        monkeypatch.setattr(smoothce, "linear_cross_entropy_impl", _on_cuda(smoothce.linear_cross_entropy_impl))
    return BACKEND


def load_harness():
    """bench/harness.py (timing, memory from the profiler's allocation events), loaded by path: bench/
    is not an installed package, and harness.py imports nothing else from bench/."""
    spec = importlib.util.spec_from_file_location("bench_harness_under_test", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def positions_shape(shape):
    """Target shape for an input shape: drop the class dim (dim 1, or dim 0 when unbatched)."""
    shape = tuple(shape)
    return shape[1:] if len(shape) == 1 else shape[:1] + shape[2:]


def num_classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def make_logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_index_target(pos_shape, C, seed=1, ignore_every=0, ignore_index=-100):
    """Random class indices; every `ignore_every`-th position (flat order) set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, pos_shape, generator=g, dtype=torch.int64)
    if ignore_every and t.numel():
        t.view(-1)[::ignore_every] = ignore_index
    return t


def make_prob_target(shape, dtype=torch.float32, seed=2):
    """Soft targets: a softmax over random scores (sums to 1 along the class dim)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return torch.softmax(scores, dim=0 if len(shape) == 1 else 1).to(dtype)


def make_weight(C, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype)


def run(fn, x, target, *, weight=None, upstream=None, view=None, target_requires_grad=False,
        **kwargs):
    """Forward + backward of `fn` on a fresh leaf holding `x`.

    view: applied to the leaf to form the input (non-contiguous layouts); the returned gradient is
    the leaf's, so entries outside the view are checked too. upstream: the gradient fed to
    backward (default: ones). Returns (loss, input_grad, target_grad)."""
    leaf = x.detach().clone().requires_grad_(True)
    inp = view(leaf) if view is not None else leaf
    tgt = target
    if target_requires_grad:
        tgt = target.detach().clone().requires_grad_(True)
    loss = fn(inp, tgt, weight=weight, **kwargs)
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), leaf.grad, (tgt.grad if target_requires_grad else None)


def run_truth(x, target, *, weight=None, upstream=None, view=None, target_requires_grad=False,
              **kwargs):
    """The float64 ground truth: the reference on float64 copies of every input."""
    t64 = target.double() if target.is_floating_point() else target
    w64 = weight.double() if weight is not None else None
    up64 = upstream.double() if upstream is not None else None
    return run(ref.cross_entropy, x.double(), t64, weight=w64, upstream=up64, view=view,
               target_requires_grad=target_requires_grad, **kwargs)


def loss_magnitude(x, target, *, weight=None, view=None, ignore_index=-100, reduction="mean",
                   label_smoothing=0.0, **_):
    """The loss with every -log p replaced by |lse| + |x|: the sum of the magnitudes the loss adds
    up. Any implementation that forms lse - x (all fused kernels) has a rounding error of a few
    eps times this, even where the loss itself is tiny (a confident prediction)."""
    inp = x.detach().double()
    inp = view(inp) if view is not None else inp
    rows = ref.class_rows(inp)
    lse = torch.logsumexp(rows, dim=-1, keepdim=True)
    w = weight.double().abs() if weight is not None else None
    t = target.detach().double() if target.is_floating_point() else target
    if t.is_floating_point():
        t = t.abs()
    return ref.loss_from_neg_log_probs(lse.abs() + rows.abs(), inp, t, w, ignore_index, reduction,
                                       float(label_smoothing)).abs()


def grad_magnitude(x, target, *, weight=None, upstream=None, view=None, ignore_index=-100,
                   reduction="mean", label_smoothing=0.0, **_):
    """Elementwise scale of the input gradient's rounding error: |s_i| x (p_ij (1 + |lse_i| + |x_ij|)
    sum_c w_c q_ic + w_j q_ij). The gradient is the difference of those two terms, so a result near 0
    from a confident row is only as exact as the terms; exp() adds eps x |x - lse| relative error.
    Returned in the leaf's layout (the view's adjoint), like the gradients it judges."""
    leaf = x.detach().double().requires_grad_(True)
    inp = view(leaf) if view is not None else leaf
    with torch.no_grad():
        rows = ref.class_rows(inp)
        positions, C = rows.shape
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)
        p = torch.exp(rows - lse)
        w = weight.double().abs() if weight is not None else torch.ones(C, dtype=torch.float64)
        eps = float(label_smoothing)
        if target.is_floating_point():
            q = (1 - eps) * ref.class_rows(target.detach().double()).abs() + eps / C
            valid = torch.ones(positions, dtype=torch.bool)
            denom = float(positions)
        else:
            t = target.reshape(-1).long()
            valid = t != ignore_index
            t_safe = torch.where(valid, t, torch.zeros_like(t))
            q = (1 - eps) * F.one_hot(t_safe, C).double() + eps / C
            denom = w[t_safe][valid].sum().item()
        up = upstream.double().abs() if upstream is not None else torch.ones(())
        s = up.reshape(-1).expand(positions) * valid if up.numel() == positions else up * valid
        if reduction == "mean":
            s = s / denom
        wq = w * q
        exp_error = (1 + lse.abs() + rows.abs()).clamp(max=1e30)  # -inf logits: p = 0 there
        mag = s.unsqueeze(1) * (p * exp_error * wq.sum(-1, keepdim=True) + wq)
        if inp.dim() == 1:
            mag = mag[0]
        else:
            mag = mag.reshape((inp.shape[0],) + tuple(inp.shape[2:]) + (C,)).movedim(-1, 1)
    inp.backward(mag)
    return leaf.grad


def run_all(fn, x, target, *, weight=None, upstream=None, view=None, target_requires_grad=False,
            **kwargs):
    """(smoothce result, torch result, float64 truth): (loss, grad, target_grad) triples; the
    truth carries loss_magnitude and grad_magnitude as fourth and fifth items."""
    common = dict(upstream=upstream, view=view, target_requires_grad=target_requires_grad, **kwargs)
    mine = run(fn, x, target, weight=weight, **common)
    theirs = run(F.cross_entropy, x, target, weight=weight, **common)
    truth = run_truth(x, target, weight=weight, **common)
    magnitudes = (loss_magnitude(x, target, weight=weight, view=view, **kwargs),
                  grad_magnitude(x, target, weight=weight, upstream=upstream, view=view, **kwargs))
    return mine, theirs, truth + magnitudes


def assert_close_to_truth(actual, truth, torch_value, dtype, what="value", magnitude=None):
    """See the module docstring. NaN and inf positions of the truth must be matched exactly.

    magnitude: elementwise scale for the floor instead of max|truth| (see loss_magnitude)."""
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    a = actual.detach().double()
    t = truth.detach().double()
    nan_mismatch = a.isnan() != t.isnan()
    assert not nan_mismatch.any(), (
        f"{what}: NaN pattern differs at {nan_mismatch.nonzero()[:5].tolist()}: "
        f"got {a[nan_mismatch][:5].tolist()}, expected {t[nan_mismatch][:5].tolist()}")
    if magnitude is not None:
        magnitude = magnitude.detach().double().expand(t.shape)
    infinite = t.isinf()
    assert torch.equal(a[infinite], t[infinite]), (
        f"{what}: expected {t[infinite][:5].tolist()}, got {a[infinite][:5].tolist()}")
    finite = t.isfinite()
    if not finite.any():
        return
    a, t = a[finite], t[finite]
    if magnitude is not None:
        magnitude = magnitude[finite]
    assert a.isfinite().all(), f"{what}: non-finite values {a[~a.isfinite()][:5].tolist()} where the truth is finite"
    eps = torch.finfo(dtype).eps
    # An all-zero truth (C = 1: p = q = 1) is a cancellation of O(1) terms: judge it on scale 1.
    # Exact zeros where docs/semantics.md §2.4 demands them (ignored positions) are asserted by those tests.
    scale = t.abs().max().item() or 1.0
    bound = torch.full_like(t, FLOOR[dtype] * eps * scale)
    if magnitude is not None:
        usable = magnitude.isfinite()
        bound[usable] = FLOOR[dtype] * eps * magnitude[usable]
    if torch_value is not None:
        tv = torch_value.detach().double()[finite]
        if tv.isfinite().all():
            bound = bound.clamp(min=2 * (tv - t).abs().max().item())
    err = (a - t).abs()
    allowed = bound + RTOL_ULPS * eps * t.abs()
    worst = (err - allowed).argmax()
    assert (err <= allowed).all(), (
        f"{what} ({dtype_id(dtype)}): max error {err.max().item():.3e} exceeds the bound; "
        f"worst at flat index {worst.item()}: got {a[worst].item()!r}, truth {t[worst].item()!r}, "
        f"allowed {allowed[worst].item():.3e}")


def check_all(mine, theirs, truth, dtype, *, loss_dtype=None, check_target_grad=False):
    """Compares smoothce's (loss, grad, target_grad) against the truth, with torch's error as slack."""
    loss, grad, tgrad = mine
    loss_dtype = loss_dtype or dtype
    assert loss.dtype == loss_dtype, f"loss dtype {loss.dtype}, expected {loss_dtype}"
    assert loss.shape == theirs[0].shape, f"loss shape {tuple(loss.shape)} != torch's {tuple(theirs[0].shape)}"
    assert grad is not None, "input received no gradient"
    assert grad.dtype == dtype, f"input grad dtype {grad.dtype}, expected {dtype}"
    magnitude = truth[3] if len(truth) > 3 else None
    assert_close_to_truth(loss, truth[0], theirs[0], loss_dtype, "loss", magnitude=magnitude)
    assert_close_to_truth(grad, truth[1], theirs[1], dtype, "input grad",
                          magnitude=truth[4] if len(truth) > 4 else None)
    if check_target_grad:
        assert tgrad is not None, "target requires grad but received no gradient"
        assert tgrad.dtype == theirs[2].dtype
        assert_close_to_truth(tgrad, truth[2], theirs[2], dtype, "target grad")
