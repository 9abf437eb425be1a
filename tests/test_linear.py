"""The fused linear + cross-entropy: smoothce.linear_cross_entropy, linear_mixup_cross_entropy,
LinearCrossEntropyLoss and the op torch.ops.smoothce.linear_forward under them.

The contract: the result equals smoothce.cross_entropy(F.linear(input, W, b).reshape(-1, V), target, ...)
(or mixup_cross_entropy), in value and in the gradients of input, linear_weight, linear_bias and a
probability target, whatever the chunking. The truth is smoothce.reference on float64 copies of every
input (F.linear's logits in float64), gradients by autograd on the float64 leaves.

Accuracy rules of this file:
- float64 and float32: |got - truth| <= RTOL x |truth| + ATOL x max|truth| elementwise, per tensor
  (TOL below: the float64 path is exact to a few ulps on both backends; float32 to a few ulps of the
  largest element, a little looser on the emulated CUDA kernels' fast-math exp/log);
- float16 / bfloat16: the fused error against the truth is at most 2 x the unfused path's error at the
  same precision (smoothce.cross_entropy(F.linear(x_h, W_h, b_h), t) on the same half inputs) plus a floor
  of HALF_FLOOR ulps of max|truth|; and the error of grad_W with fp32_grad_weight=True does not grow with
  the number of chunks.
"""
import copy
import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import smoothce
from conftest import (BACKEND, ERRORS, HALF_DTYPES, REDUCTIONS, dtype_id, make_index_target,
                      make_logits, make_prob_target, make_weight, ref)

# (rtol, atol as a fraction of max|truth|) per dtype and backend (see the module docstring). Measured
# max|error| / max|truth| over this file: float64 8e-16 (CPU and emulated); float32 5.9e-7 on the CPU
# kernels, 8.3e-7 on the emulated CUDA kernels with the device's fast-math exp/log (the atol needed at
# rtol 1e-5: 1.9e-7 and 3.2e-7).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 2e-6) if BACKEND != "emu" else (1e-5, 4e-6),
}
HALF_FLOOR = 4  # ulps of max|truth| added to the 2 x unfused bound in half precision
GRADS = ("loss", "input", "linear_weight", "linear_bias", "target")


# ------------------------------------------------------------------------------------------ helpers

def make_problem(positions, H, V, dtype=torch.float32, *, bias=True, seed=0):
    """input (*positions, H), linear_weight (V, H), linear_bias (V,) or None: logits of std ~2."""
    positions = tuple(positions) if isinstance(positions, (tuple, list)) else (positions,)
    x = make_logits(positions + (H,), dtype, seed=seed, scale=1.0)
    W = make_logits((V, H), dtype, seed=seed + 1, scale=2.0 / math.sqrt(H))
    b = make_logits((V,), dtype, seed=seed + 2, scale=0.5) if bias else None
    return x, W, b


def linear_loss(impl, x, W, t, *, linear_bias=None, target_b=None, lam=None, chunk_size=None,
                fp32_grad_weight=True, **kwargs):
    """impl 'fused': smoothce.linear_(mixup_)cross_entropy; 'unfused': smoothce.(mixup_)cross_entropy of
    F.linear's logits flattened to (-1, V); 'ref': smoothce.reference on them."""
    if impl == "fused":
        extra = dict(linear_bias=linear_bias, chunk_size=chunk_size, fp32_grad_weight=fp32_grad_weight, **kwargs)
        if target_b is not None:
            return smoothce.linear_mixup_cross_entropy(x, W, t, target_b, lam, **extra)
        return smoothce.linear_cross_entropy(x, W, t, **extra)
    module = smoothce if impl == "unfused" else ref
    V = W.shape[0]
    soft = t.is_floating_point()
    positions = t.shape[:-1] if soft else t.shape
    logits = F.linear(x, W, linear_bias).reshape(-1, V)
    flat_t = t.reshape(-1, V) if soft else t.reshape(-1)
    if target_b is not None:
        if isinstance(lam, torch.Tensor):
            lam = lam.expand(positions).reshape(-1)
        loss = module.mixup_cross_entropy(logits, flat_t, target_b.reshape(-1), lam, **kwargs)
    else:
        loss = module.cross_entropy(logits, flat_t, **kwargs)
    return loss.reshape(positions) if kwargs.get("reduction") == "none" else loss


def _to64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def evaluate(impl, x, W, t, *, linear_bias=None, upstream=None, target_grad=False, x_view=None, w_view=None,
             weight=None, lam=None, **kwargs):
    """Forward + backward on fresh leaves holding x, W, linear_bias (and a probability target when
    target_grad). impl 'truth': the reference on float64 copies of everything. x_view / w_view form the
    input / linear_weight from their leaf (non-contiguous layouts); the gradients returned are the
    leaves'. Returns {'loss', 'input', 'linear_weight', 'linear_bias', 'target'}."""
    if impl == "truth":
        impl = "ref"
        x, W, linear_bias, weight, lam, upstream = map(_to64, (x, W, linear_bias, weight, lam, upstream))
        t = _to64(t)
    xl = x.detach().clone().requires_grad_(True)
    wl = W.detach().clone().requires_grad_(True)
    bl = linear_bias.detach().clone().requires_grad_(True) if linear_bias is not None else None
    tl = t.detach().clone().requires_grad_(True) if target_grad else t
    loss = linear_loss(impl, x_view(xl) if x_view else xl, w_view(wl) if w_view else wl, tl, linear_bias=bl,
                       weight=weight, lam=lam, **kwargs)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    loss.backward(up)
    return dict(loss=loss.detach(), input=xl.grad, linear_weight=wl.grad,
                linear_bias=bl.grad if bl is not None else None, target=tl.grad if target_grad else None)


def assert_near(actual, truth, dtype, what, tol=None):
    """|actual - truth| <= rtol x |truth| + atol x max|truth| (TOL[dtype]); equal shapes and NaN patterns."""
    rtol, atol = tol or TOL[dtype]
    assert actual is not None, f"{what}: missing (no gradient?)"
    assert tuple(actual.shape) == tuple(truth.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    a, t = actual.detach().double(), truth.detach().double()
    assert torch.equal(a.isnan(), t.isnan()), f"{what}: NaN pattern differs: got {a}, expected {t}"
    a, t = a[~t.isnan()], t[~t.isnan()]
    if t.numel() == 0:
        return
    assert a.isfinite().all(), f"{what}: non-finite values {a[~a.isfinite()][:5].tolist()}"
    err = (a - t).abs()
    allowed = rtol * t.abs() + atol * t.abs().max()
    worst = (err - allowed).argmax()
    assert (err <= allowed).all(), (
        f"{what} ({dtype_id(dtype)}): max |error| {err.max().item():.3e}; worst at flat index {worst.item()}: "
        f"got {a[worst].item()!r}, truth {t[worst].item()!r}, allowed {allowed[worst].item():.3e}")


def assert_results_near(mine, truth, dtype, keys=GRADS, tol=None):
    for key in keys:
        if truth[key] is None:
            assert mine[key] is None, f"{key}: unexpected gradient"
            continue
        assert mine[key] is not None, f"{key}: no gradient"
        assert mine[key].dtype == dtype, f"{key}: dtype {mine[key].dtype}, expected {dtype}"
        assert_near(mine[key], truth[key], dtype, key, tol)


def rel_error(actual, truth):
    """max|actual - truth| / max|truth|."""
    t = truth.detach().double()
    return ((actual.detach().double() - t).abs().max() / t.abs().max()).item()


def upstream_for(reduction, positions, seed=11):
    """The gradient fed to backward: per position for 'none' (some negative), a scalar otherwise
    (None for mean: plain loss.backward(), the fused path's no-scale case)."""
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(tuple(positions), generator=g, dtype=torch.float64) * 2 - 0.5
    return None if reduction == "mean" else torch.tensor(2.5, dtype=torch.float64)


# The shared sizes: N not a multiple of the chunk.
N, H, V, CHUNK = 37, 8, 13, 8

# name: how the problem is built (see build()); every other key is a keyword of linear_cross_entropy.
CASES = {
    "plain": dict(),
    "eps": dict(label_smoothing=0.1),
    "others": dict(smoothing="others", label_smoothing=0.1),
    "values": dict(target_values=(0.9, 0.01)),
    "zloss": dict(z_loss=1e-3, label_smoothing=0.1),
    "weight_ignore": dict(weight=True, ignore=4, label_smoothing=0.1),
    "uint8_255": dict(uint8=True, ignore_index=255, ignore=3, weight=True, label_smoothing=0.1),
    "leading": dict(positions=(2, 5), ignore=4, label_smoothing=0.1),
    "mixup_float": dict(mixup=0.3, weight=True, ignore=5, label_smoothing=0.1),
    "mixup_rows": dict(mixup="rows", smoothing="others", label_smoothing=0.1, z_loss=1e-3),
    "mixup_leading": dict(positions=(3, 4), mixup="per_sample", target_values=(0.9, 0.01), ignore=5),
    "soft": dict(soft=True, label_smoothing=0.1),
    "soft_grad": dict(soft="grad", weight=True, label_smoothing=0.1, z_loss=1e-3),
    "soft_leading_grad": dict(positions=(2, 5), soft="grad"),
    "eps1_weight": dict(label_smoothing=1.0, weight=True, ignore=6),
    "unbatched": dict(positions=(), weight=True, label_smoothing=0.1),
    "unbatched_soft_grad": dict(positions=(), soft="grad", label_smoothing=0.2),
}


def build(case, dtype, bias=True, seed=0, H=H, V=V):
    """(x, W, b, target, keyword arguments, target requires grad) for a CASES entry."""
    spec = dict(CASES[case])
    positions = spec.pop("positions", (N,))
    x, W, b = make_problem(positions, H, V, dtype, bias=bias, seed=seed)
    soft = spec.pop("soft", False)
    ignore_every = spec.pop("ignore", 0)
    uint8 = spec.pop("uint8", False)
    mixup = spec.pop("mixup", None)
    ignore_index = spec.get("ignore_index", -100)
    n = math.prod(positions)
    if soft:
        t = make_prob_target((n, V), dtype, seed=seed + 3).reshape(positions + (V,))
    else:
        t = make_index_target(positions, V, seed=seed + 3, ignore_every=ignore_every, ignore_index=ignore_index)
        if uint8:
            t = t.to(torch.uint8)
    if spec.pop("weight", False):
        spec["weight"] = make_weight(V, dtype, seed=seed + 4)
    if mixup is not None:
        target_b = make_index_target(positions, V, seed=seed + 5, ignore_every=ignore_every + 2,
                                     ignore_index=ignore_index)
        g = torch.Generator().manual_seed(seed + 6)
        if mixup == "rows":
            lam = torch.rand(positions, generator=g, dtype=torch.float64).to(dtype)
        elif mixup == "per_sample":
            lam = torch.rand((positions[0],) + (1,) * (len(positions) - 1), generator=g,
                             dtype=torch.float64).to(dtype)
        else:
            lam = mixup
        spec.update(target_b=target_b, lam=lam)
    return x, W, b, t, spec, soft == "grad"


def positions_of(t):
    return t.shape[:-1] if t.is_floating_point() else t.shape


# ------------------------------------------------------------------ 1. parity with the float64 truth

CHUNKINGS = {
    # name: (N, chunk_size)
    "N37_chunk8": (37, 8),
    "chunk1": (9, 1),
    "N_lt_chunk": (5, 64),
    "N_eq_chunk": (16, 16),
    "auto": (37, None),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("target_kind", ["index", "soft_grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_chunking_matches_float64_truth(chunking, reduction, target_kind, dtype):
    n, chunk_size = CHUNKINGS[chunking]
    x, W, b = make_problem(n, H, V, dtype)
    weight = make_weight(V, dtype)
    if target_kind == "index":
        t = make_index_target((n,), V, ignore_every=4)
    else:
        t = make_prob_target((n, V), dtype)
    kwargs = dict(linear_bias=b, weight=weight, reduction=reduction, label_smoothing=0.1,
                  upstream=upstream_for(reduction, (n,)), target_grad=target_kind == "soft_grad")
    mine = evaluate("fused", x, W, t, chunk_size=chunk_size, **kwargs)
    truth = evaluate("truth", x, W, t, **kwargs)
    assert_results_near(mine, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_matches_float64_truth(case, reduction, bias, dtype):
    """Every option (label smoothing, 'others', target_values, z_loss, class weights, ignore_index, uint8
    targets with ignore_index 255, leading dims, mixup with a float / per-row / per-sample lam, probability
    targets with and without requires_grad), three reductions, with and without linear_bias."""
    x, W, b, t, kwargs, target_grad = build(case, dtype, bias)
    common = dict(linear_bias=b, reduction=reduction, upstream=upstream_for(reduction, positions_of(t)),
                  target_grad=target_grad, **kwargs)
    mine = evaluate("fused", x, W, t, chunk_size=CHUNK, **common)
    truth = evaluate("truth", x, W, t, **common)
    assert mine["loss"].shape == (positions_of(t) if reduction == "none" else ())
    assert_results_near(mine, truth, dtype)
    # (the options are not a no-op: without them the loss differs)
    options = ("label_smoothing", "smoothing", "target_values", "z_loss", "weight")
    if any(name in kwargs for name in options):
        rest = {name: _to64(value) for name, value in kwargs.items() if name not in options}
        plain = linear_loss("ref", x.double(), W.double(), _to64(t), linear_bias=_to64(b), reduction=reduction,
                            **rest)
        assert not torch.allclose(plain, truth["loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n, h, v, dtype, rows", [
    (300, 4, 2048, torch.float64, {100}),   # at least 128 rows: 3 chunks, evened out to 100 rows
    (600, 256, 600, torch.float64, {200}),  # a chunk as large as the input: ⌈N·H/V⌉ = 256 rows → 3 of 200
    # half weights with fp32 accumulation on CPU: as few chunks as the budget allows (here one)
    (300, 4, 2048, torch.bfloat16, {300}),
    pytest.param(150, 8, 1 << 18, torch.float64, {50}, marks=pytest.mark.slow),  # ≤ 128 MiB: 64 rows → 3 of 50
], ids=["min_rows", "like_input", "half_on_cpu", "budget"])
def test_automatic_chunk_rule(n, h, v, dtype, rows):
    """chunk_size=None: a chunk's logits take about the input's memory (⌈N·H/V⌉ rows), at least 128 rows
    and at most 128 MiB, evened out over the chunks (seen in the GEMMs' shapes); on CPU a float16/bfloat16
    weight whose gradient accumulates in fp32 takes the fewest chunks the budget allows. The result
    equals the unfused path's."""
    x, W, b = make_problem(n, h, v, dtype)
    t = make_index_target((n,), v, ignore_every=7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        mine = evaluate("fused", x, W, t, linear_bias=b, label_smoothing=0.1)
    seen = {e.input_shapes[1][0] for e in prof.events() if e.name == "aten::addmm" and e.input_shapes[1][1:] == [h]}
    assert seen == rows, f"logits computed in chunks of {sorted(seen)} rows"
    assert smoothce._linear.chunk_rows(n, h, v, dtype) == max(rows)  # the rule as the library reports it
    if n * v <= 1 << 21 and dtype == torch.float64:  # (the other cases' accuracy is the other tests' job)
        unfused = evaluate("unfused", x, W, t, linear_bias=b, label_smoothing=0.1)
        assert_results_near(mine, unfused, torch.float64, keys=GRADS[:4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("frozen", ["input", "linear_weight", "input+linear_bias", "all_but_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_only_the_gradients_asked_for(frozen, reduction, dtype):
    """Leaves that do not require grad get none; the others are still right (each output_mask)."""
    x, W, b, t, kwargs, _ = build("soft_grad", dtype)
    frozen_names = {"all_but_target": ("input", "linear_weight", "linear_bias")}.get(frozen, frozen.split("+"))
    leaves = dict(input=x.clone().requires_grad_("input" not in frozen_names),
                  linear_weight=W.clone().requires_grad_("linear_weight" not in frozen_names),
                  linear_bias=b.clone().requires_grad_("linear_bias" not in frozen_names),
                  target=t.clone().requires_grad_(True))
    up = upstream_for(reduction, positions_of(t))
    loss = linear_loss("fused", leaves["input"], leaves["linear_weight"], leaves["target"],
                       linear_bias=leaves["linear_bias"], reduction=reduction, chunk_size=CHUNK, **kwargs)
    loss.backward(torch.ones_like(loss) if up is None else up.to(loss.dtype))
    truth = evaluate("truth", x, W, t, linear_bias=b, reduction=reduction, upstream=up, target_grad=True, **kwargs)
    assert_near(loss, truth["loss"], dtype, "loss")
    for name, leaf in leaves.items():
        if name in frozen_names:
            assert leaf.grad is None, f"{name} does not require grad but received one"
        else:
            assert_near(leaf.grad, truth[name], dtype, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_forward_equals_training_forward(reduction):
    """Under torch.no_grad (the inference path: no autograd.Function) the loss is the same."""
    x, W, b, t, kwargs, _ = build("mixup_rows", torch.float32)
    with torch.no_grad():
        inference = linear_loss("fused", x, W, t, linear_bias=b, reduction=reduction, chunk_size=CHUNK, **kwargs)
    training = linear_loss("fused", x.clone().requires_grad_(True), W.clone().requires_grad_(True), t,
                           linear_bias=b, reduction=reduction, chunk_size=CHUNK, **kwargs)
    assert training.requires_grad and not inference.requires_grad
    torch.testing.assert_close(inference, training.detach(), rtol=1e-6, atol=1e-7)
    truth = evaluate("truth", x, W, t, linear_bias=b, reduction=reduction, **kwargs)
    assert_near(inference, truth["loss"], torch.float32, "loss")


def _fused_and_unfused(x, W, b, t, reduction, target_grad=False, **kwargs):
    common = dict(linear_bias=b, reduction=reduction, target_grad=target_grad, **kwargs)
    return evaluate("fused", x, W, t, chunk_size=4, **common), evaluate("unfused", x, W, t, **common)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("target_kind", ["index", "soft_grad"])
@pytest.mark.parametrize("positions", [(0,), (2, 0)], ids=["N0", "leading_2x0"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(reduction, positions, target_kind, dtype):
    """N = 0: mean is NaN (0/0, as torch), sum is 0, 'none' is empty; gradients empty / zero."""
    x, W, b = make_problem(positions, H, V, dtype)
    if target_kind == "index":
        t = make_index_target(positions, V)
    else:
        t = torch.empty(positions + (V,), dtype=dtype)
    mine, unfused = _fused_and_unfused(x, W, b, t, reduction, target_grad=target_kind != "index")
    if reduction == "none":
        assert mine["loss"].shape == positions
    else:
        assert mine["loss"].shape == ()
        assert (mine["loss"].isnan() if reduction == "mean" else mine["loss"] == 0).item(), mine["loss"]
    assert mine["input"].shape == x.shape
    assert mine["linear_weight"].shape == W.shape and not mine["linear_weight"].any()
    assert mine["linear_bias"].shape == b.shape and not mine["linear_bias"].any()
    if target_kind != "index":
        assert mine["target"].shape == t.shape
    for key in GRADS:
        if unfused[key] is not None:
            torch.testing.assert_close(mine[key], unfused[key], rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize("case", ["weight_ignore", "uint8_255", "mixup_float", "leading"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(reduction, case):
    """Every target ignored: what smoothce.cross_entropy gives on the unfused logits (mean NaN, sum 0,
    'none' zeros; gradients exactly zero)."""
    x, W, b, t, kwargs, _ = build(case, torch.float32)
    ignore_index = kwargs.get("ignore_index", -100)
    t = torch.full_like(t, ignore_index)
    if "target_b" in kwargs:
        kwargs["target_b"] = t.clone()
    mine, unfused = _fused_and_unfused(x, W, b, t, reduction, **kwargs)
    if reduction == "mean":
        assert mine["loss"].isnan().item()
    else:
        assert not mine["loss"].any()
    for key in ("input", "linear_weight", "linear_bias"):
        assert not mine[key].any(), f"{key}: nonzero gradient with every target ignored"
    for key in GRADS:
        if unfused[key] is not None:
            torch.testing.assert_close(mine[key], unfused[key], rtol=0, atol=0, equal_nan=True, msg=key)


# ------------------------------------------------------------------------------ 2. half precision

@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("target_kind", ["index", "soft_grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_error_at_most_twice_unfused(reduction, target_kind, dtype):
    """In float16 / bfloat16 the fused loss and gradients are as accurate as the unfused path in that
    dtype: error <= 2 x unfused error + HALF_FLOOR ulps of max|truth| (measured on CPU: equal errors)."""
    n, h, v = 64, 16, 100
    x, W, b = make_problem(n, h, v, dtype)
    if target_kind == "index":
        t = make_index_target((n,), v, ignore_every=7)
    else:
        t = make_prob_target((n, v), dtype)
    common = dict(linear_bias=b, weight=make_weight(v, dtype), reduction=reduction, label_smoothing=0.1,
                  upstream=upstream_for(reduction, (n,)), target_grad=target_kind != "index")
    mine = evaluate("fused", x, W, t, chunk_size=8, **common)
    unfused = evaluate("unfused", x, W, t, **common)
    truth = evaluate("truth", x, W, t, **common)
    eps = torch.finfo(dtype).eps
    for key in GRADS:
        if truth[key] is None:
            continue
        assert mine[key].dtype == dtype and mine[key].shape == truth[key].shape, key
        fused_err, unfused_err = rel_error(mine[key], truth[key]), rel_error(unfused[key], truth[key])
        assert fused_err <= 2 * unfused_err + HALF_FLOOR * eps, (
            f"{key} ({dtype_id(dtype)}): fused error {fused_err:.3e} x max|truth| > 2 x unfused {unfused_err:.3e} "
            f"+ {HALF_FLOOR} ulps")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_grad_weight_error_does_not_grow_with_chunks(reduction, dtype):
    """fp32_grad_weight=True (default): grad_W and grad_b accumulate in fp32 over the chunks and round
    once, so 128 chunks of one row are as accurate as one chunk of 128 (max error / max|truth| within
    1.5x + 1 ulp; measured on CPU: identical, 0.4-0.5 ulps). fp32_grad_weight=False accumulates in the
    half dtype: measured 1.1-4.4 ulps at chunk_size 1 or 2 (0.4-0.5 at one chunk), bound 8 ulps; it must
    still be worse than fp32 accumulation at chunk_size 1 (the flag takes effect)."""
    n, h, v = 128, 16, 64
    x, W, b = make_problem(n, h, v, dtype)
    t = make_index_target((n,), v, ignore_every=7)
    common = dict(linear_bias=b, reduction=reduction, label_smoothing=0.1, upstream=upstream_for(reduction, (n,)))
    truth = evaluate("truth", x, W, t, **common)
    eps = torch.finfo(dtype).eps
    errors = {}
    for fp32 in (True, False):
        for chunk_size in (n, 2, 1):
            result = evaluate("fused", x, W, t, chunk_size=chunk_size, fp32_grad_weight=fp32, **common)
            for key in ("linear_weight", "linear_bias"):
                assert result[key].dtype == dtype, f"{key}: dtype {result[key].dtype}"
                errors[fp32, chunk_size, key] = rel_error(result[key], truth[key])
    for key in ("linear_weight", "linear_bias"):
        one_chunk = errors[True, n, key]
        assert one_chunk <= 2 * eps, f"{key}: {one_chunk / eps:.2f} ulps in one chunk"
        for chunk_size in (2, 1):
            err = errors[True, chunk_size, key]
            assert err <= 1.5 * one_chunk + eps, (
                f"{key} ({dtype_id(dtype)}), fp32_grad_weight=True: error {err / eps:.2f} ulps with chunk_size "
                f"{chunk_size} vs {one_chunk / eps:.2f} in one chunk: it grows with the number of chunks")
            loose = errors[False, chunk_size, key]
            assert loose <= 8 * eps, f"{key}, fp32_grad_weight=False, chunk_size {chunk_size}: {loose / eps:.2f} ulps"
    assert errors[False, 1, "linear_weight"] > errors[True, 1, "linear_weight"], (
        "fp32_grad_weight=False is exactly as accurate as True over 128 chunks: is the flag ignored?")


# ----------------------------------------------------------------------------- 4. non-contiguous

LAYOUTS = {
    # name: (x base from x, x view, W base from W, W view)
    "x_transposed": (lambda x: x.t().contiguous(), lambda l: l.t(), None, None),
    "x_sliced_columns": (lambda x: torch.stack([x, -x], dim=-1).flatten(-2), lambda l: l[:, ::2], None, None),
    "x_strided_rows": (lambda x: torch.stack([x, -x], dim=1).flatten(0, 1), lambda l: l[::2], None, None),
    "w_transposed": (None, None, lambda w: w.t().contiguous(), lambda l: l.t()),
    "w_sliced_columns": (None, None, lambda w: torch.stack([-w, w], dim=-1).flatten(-2), lambda l: l[:, 1::2]),
    "both_transposed": (lambda x: x.t().contiguous(), lambda l: l.t(), lambda w: w.t().contiguous(),
                        lambda l: l.t()),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_non_contiguous_input_and_weight(layout, reduction, dtype):
    x_base, x_view, w_base, w_view = LAYOUTS[layout]
    x, W, b, t, kwargs, target_grad = build("weight_ignore", dtype)
    x_in = x_base(x) if x_base else x
    w_in = w_base(W) if w_base else W
    view_x = x_view(x_in) if x_view else x_in
    view_w = w_view(w_in) if w_view else w_in
    assert torch.equal(view_x, x) and torch.equal(view_w, W)
    assert not (view_x.is_contiguous() and view_w.is_contiguous())
    common = dict(linear_bias=b, reduction=reduction, upstream=upstream_for(reduction, (N,)), x_view=x_view,
                  w_view=w_view, **kwargs)
    mine = evaluate("fused", x_in, w_in, t, chunk_size=CHUNK, **common)
    truth = evaluate("truth", x_in, w_in, t, **common)
    assert_results_near(mine, truth, dtype)


@pytest.mark.parametrize("target_layout", ["index_strided", "soft_transposed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_target(target_layout, reduction):
    dtype = torch.float64
    x, W, b, t, kwargs, _ = build("soft_grad" if target_layout == "soft_transposed" else "weight_ignore", dtype)
    if target_layout == "index_strided":
        t = torch.stack([t, t.flip(0)], dim=1)[:, 0]
        target_view = None
    else:
        target_view = t.t().contiguous().t()
        t = target_view
    assert not t.is_contiguous()
    common = dict(linear_bias=b, reduction=reduction, upstream=upstream_for(reduction, (N,)),
                  target_grad=target_view is not None, **kwargs)
    mine = evaluate("fused", x, W, t, chunk_size=CHUNK, **common)
    truth = evaluate("truth", x, W, t.contiguous(), **common)
    assert_results_near(mine, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tied_embedding_weight(reduction, dtype):
    """A language model with tied embeddings: nn.Embedding(V, H).weight both embeds the tokens and is
    the output projection; its .grad sums both uses, as with F.linear."""
    torch.manual_seed(0)
    tokens = make_index_target((4, 6), V, seed=7)
    t = make_index_target((4, 6), V, seed=8, ignore_every=5)
    embedding = torch.nn.Embedding(V, H, dtype=dtype)
    proj = torch.nn.Linear(H, H, dtype=dtype)
    twin_embedding, twin_proj = copy.deepcopy(embedding).double(), copy.deepcopy(proj).double()
    up = upstream_for(reduction, t.shape)
    loss = smoothce.linear_cross_entropy(torch.tanh(proj(embedding(tokens))), embedding.weight, t,
                                         reduction=reduction, label_smoothing=0.1, chunk_size=5)
    loss.backward(torch.ones_like(loss) if up is None else up.to(dtype))
    truth = linear_loss("ref", torch.tanh(twin_proj(twin_embedding(tokens))), twin_embedding.weight, t,
                        reduction=reduction, label_smoothing=0.1)
    truth.backward(torch.ones_like(truth) if up is None else up)
    assert_near(loss, truth, dtype, "loss")
    assert_near(embedding.weight.grad, twin_embedding.weight.grad, dtype, "embedding.weight")
    assert_near(proj.weight.grad, twin_proj.weight.grad, dtype, "proj.weight")
    assert_near(proj.bias.grad, twin_proj.bias.grad, dtype, "proj.bias")


# ------------------------------------------------------------------ 5. retain_graph, upstream gradients

@pytest.mark.parametrize("scaled", [False, True], ids=["upstream1", "upstream_scaled"])
@pytest.mark.parametrize("case", ["weight_ignore", "soft_grad", "mixup_rows"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_second_backward_doubles_gradients(reduction, case, scaled):
    """The fused gradients are handed out by the first backward; a second backward through
    retain_graph=True recomputes them: the accumulated gradients are exactly twice the first (upstream
    gradient 1; with another upstream the first scales the fused gradient and the second applies it inside
    the kernel: equal to an ulp or so, 1e-6 relative)."""
    x, W, b, t, kwargs, target_grad = build(case, torch.float32)
    leaves = [x.clone().requires_grad_(True), W.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    tgt = t.clone().requires_grad_(True) if target_grad else t
    if target_grad:
        leaves.append(tgt)
    loss = linear_loss("fused", leaves[0], leaves[1], tgt, linear_bias=leaves[2], reduction=reduction,
                       chunk_size=CHUNK, **kwargs)
    if reduction == "none":
        up = upstream_for(reduction, positions_of(t)).to(loss.dtype) * (2.5 if scaled else 1)
    else:
        up = torch.full_like(loss, 2.5 if scaled else 1.0)
    loss.backward(up, retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    loss.backward(up)
    exact = BACKEND != "emu" and not (scaled and reduction != "none")
    for name, leaf, g in zip(GRADS[1:], leaves, first):
        assert g.abs().max() > 0, name
        if exact:
            assert torch.equal(leaf.grad, 2 * g), (
                f"{name}: the second backward differs from the first by {(leaf.grad - 2 * g).abs().max():.3e}")
        else:  # (on the emulator the threads' schedule may also reorder a reduction between the runs)
            torch.testing.assert_close(leaf.grad, 2 * g, rtol=1e-6, atol=1e-6 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("case", ["weight_ignore", "soft_grad", "mixup_float"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scaled_loss_backward(reduction, case):
    """(loss * 3).backward(): the fused gradients are scaled by the upstream gradient."""
    dtype = torch.float64
    x, W, b, t, kwargs, target_grad = build(case, dtype)
    leaves = [x.clone().requires_grad_(True), W.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    tgt = t.clone().requires_grad_(True) if target_grad else t
    loss = linear_loss("fused", leaves[0], leaves[1], tgt, linear_bias=leaves[2], reduction=reduction,
                       chunk_size=CHUNK, **kwargs)
    (loss * 3).backward()
    truth = evaluate("truth", x, W, t, linear_bias=b, reduction=reduction, upstream=torch.tensor(3.0),
                     target_grad=target_grad, **kwargs)
    assert_near(loss, truth["loss"], dtype, "loss")
    for name, leaf in zip(GRADS[1:], leaves + [tgt] if target_grad else leaves):
        assert_near(leaf.grad, truth[name], dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("case", ["leading", "soft_leading_grad", "mixup_leading"])
def test_per_row_upstream_for_reduction_none(case, dtype):
    """reduction='none' returns one loss per row shaped like the leading dims; backward with a per-row
    upstream gradient (some zero, some negative) weights each row's gradient."""
    x, W, b, t, kwargs, target_grad = build(case, dtype)
    positions = positions_of(t)
    up = upstream_for("none", positions)
    up.view(-1)[::3] = 0
    common = dict(linear_bias=b, reduction="none", upstream=up, target_grad=target_grad, **kwargs)
    mine = evaluate("fused", x, W, t, chunk_size=3, **common)
    truth = evaluate("truth", x, W, t, **common)
    assert mine["loss"].shape == positions
    assert_results_near(mine, truth, dtype)


# ------------------------------------------------------------------------------ 6. gradcheck, 2nd order

GRADCHECK_CASES = {
    # name: (CASES entry, bias)
    "index_weight_ignore": ("weight_ignore", True),
    "index_nobias": ("values", False),
    "zloss": ("zloss", True),
    "soft_grad": ("soft_grad", True),
    "mixup_rows": ("mixup_rows", True),
    "leading": ("leading", True),
}


def _small(case, bias=True, n=5):
    """CASES[case] at gradcheck size: N = 5 (or the case's leading dims), H = 3, V = 7, float64."""
    x, W, b, t, kwargs, target_grad = build(case, torch.float64, bias, H=3, V=7)
    if x.dim() == 2:  # trim to n rows
        x, t = x[:n], t[:n]
        for key in ("target_b", "lam"):
            if isinstance(kwargs.get(key), torch.Tensor):
                kwargs[key] = kwargs[key][:n]
    return x, W, b, t, kwargs, target_grad


def _gradcheck_inputs(x, W, b, t, target_grad):
    inputs = [x.clone().requires_grad_(True), W.clone().requires_grad_(True)]
    if b is not None:
        inputs.append(b.clone().requires_grad_(True))
    if target_grad:
        inputs.append(t.clone().requires_grad_(True))
    return tuple(inputs)


def _as_function(impl, inputs_have_bias, target, target_grad, **kwargs):
    def fn(x, W, *rest):
        rest = list(rest)
        b = rest.pop(0) if inputs_have_bias else None
        t = rest.pop(0) if target_grad else target
        return linear_loss(impl, x, W, t, linear_bias=b, **kwargs)
    return fn


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck(case, reduction):
    """Gradients of input, linear_weight, linear_bias (and a probability target) against finite
    differences in float64, chunks of 2 rows (gradcheck's repeated backward through one graph exercises
    the recompute path)."""
    name, bias = GRADCHECK_CASES[case]
    x, W, b, t, kwargs, target_grad = _small(name, bias)
    inputs = _gradcheck_inputs(x, W, b, t, target_grad)
    fn = _as_function("fused", b is not None, t, target_grad, reduction=reduction, chunk_size=2, **kwargs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", ["index_weight_ignore", "soft_grad", "mixup_rows"])
def test_gradgradcheck(case):
    """create_graph=True goes through the differentiable reference path: second derivatives are right."""
    name, bias = GRADCHECK_CASES[case]
    x, W, b, t, kwargs, target_grad = _small(name, bias, n=4)
    inputs = _gradcheck_inputs(x, W, b, t, target_grad)
    fn = _as_function("fused", b is not None, t, target_grad, chunk_size=2, **kwargs)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["index_weight_ignore", "soft_grad", "mixup_rows"])
def test_second_order_matches_reference(case, reduction):
    """A gradient penalty: grad(loss, create_graph=True), then the gradient of sum(g²) w.r.t. every
    input equals the same computed through F.linear + smoothce.reference."""
    name, bias = GRADCHECK_CASES[case]
    x, W, b, t, kwargs, target_grad = _small(name, bias)
    up = upstream_for(reduction, positions_of(t))

    def second(impl):
        inputs = _gradcheck_inputs(x, W, b, t, target_grad)
        fn = _as_function(impl, b is not None, t, target_grad, reduction=reduction, chunk_size=2, **kwargs)
        loss = fn(*inputs)
        first = torch.autograd.grad(loss, inputs, torch.ones_like(loss) if up is None else up, create_graph=True)
        assert all(g.requires_grad for g in first), "create_graph=True gave gradients detached from the inputs"
        penalty = sum((g * g).sum() for g in first)
        return first, torch.autograd.grad(penalty, inputs)

    (first, second_mine), (first_ref, second_ref) = second("fused"), second("ref")
    for g, r in zip(first + second_mine, first_ref + second_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------- 7. opcheck

@pytest.fixture
def ops(backend):
    """The ops smoothce calls on this backend (after the backend fixture has chosen them)."""
    from smoothce import _function

    return _function._ops


def _opcheck_args():
    n, h, v = 9, 8, 13
    x, W, b = make_problem(n, h, v)
    t = make_index_target((n,), v, ignore_every=4)
    soft = make_prob_target((n, v))
    w = make_weight(v)
    go = make_logits((n,), seed=6)
    x64, W64, _ = make_problem(n, h, v, torch.float64, bias=False)
    xh, Wh, bh = make_problem(n, h, v, torch.bfloat16)
    t_b = make_index_target((n,), v, seed=7, ignore_every=3)
    lam = torch.rand(n, generator=torch.Generator().manual_seed(8))
    mask_none, mask_xwb = [False] * 4, [True, True, True, False]
    # (args, kwargs): linear_forward(input, linear_weight, linear_bias, target, weight, ignore_index,
    #   reduction, label_smoothing, float32_loss, output_mask, chunk_size, fp32_grad_weight, ...)
    return {
        "nograd": ((x, W, b, t, w, -100, 1, 0.1, False, mask_none, 4), {}),
        "grads_mean": ((x, W, b, t, w, -100, 1, 0.1, False, mask_xwb, 4), {}),
        "grads_sum_auto_chunk": ((x, W, b, t, None, -100, 2, 0.0, False, mask_xwb), {}),
        "none_grad_output": ((x, W, b, t, w, -100, 0, 0.1, False, mask_xwb, 4), dict(grad_output=go)),
        "soft_target_grad": ((x, W, b, soft, w, -100, 1, 0.1, False, [True, True, True, True], 4), {}),
        "soft_target_grad_only": ((x, W, None, soft, None, -100, 0, 0.0, False, [False, False, False, True], 2),
                                  dict(grad_output=go)),
        "fp64_nobias_sum": ((x64, W64, None, t, None, -100, 2, 0.2, False, [True, True, False, False], 3), {}),
        "bf16_float32_loss": ((xh, Wh, bh, t, w, -100, 1, 0.1, True, mask_xwb, 4), {}),
        "bf16_fp16_accumulate": ((xh, Wh, bh, t, None, -100, 1, 0.1, False, mask_xwb, 2, False), {}),
        "options": ((x, W, b, t, w, -100, 1, 0.0, False, mask_xwb, 4),
                    dict(target_values=[0.9, 0.01], z_loss=1e-3)),
        "mixup_lam": ((x, W, b, t, w, -100, 1, 0.1, False, mask_xwb, 4), dict(target_b=t_b, lam=lam)),
        "mixup_lam_value": ((x, W, None, t, None, -100, 2, 0.1, False, [True, True, False, False], 4),
                            dict(target_b=t_b, lam_value=0.3)),
        "empty_sum": ((x[:0], W, b, t[:0], None, -100, 2, 0.1, False, mask_xwb, 4), {}),
    }


@pytest.mark.parametrize("name", sorted(_opcheck_args()))
def test_opcheck_linear_forward(ops, name):
    args, kwargs = _opcheck_args()[name]
    torch.library.opcheck(ops.linear_forward.default, args, kwargs)


def test_op_outputs_and_empty_gradients(ops):
    """The op's six outputs: loss, lse (fp32 per row), and (0,)-shaped tensors for gradients not asked for;
    the loss and lse equal the reference's."""
    args, kwargs = _opcheck_args()["soft_target_grad_only"]
    loss, lse, grad_input, grad_w, grad_b, grad_target = ops.linear_forward(*args, **kwargs)
    x, W, _, soft = args[:4]
    assert grad_input.shape == grad_w.shape == grad_b.shape == (0,)
    assert grad_target.shape == soft.shape
    logits = F.linear(x.double(), W.double())
    assert_near(lse, torch.logsumexp(logits, dim=1), torch.float32, "lse")
    assert_near(loss, ref.cross_entropy(logits, soft.double(), reduction="none"), torch.float32, "loss")
    args, kwargs = _opcheck_args()["grads_mean"]
    outputs = ops.linear_forward(*args, **kwargs)
    assert [tuple(o.shape) for o in outputs] == [(), (9,), (9, 8), (13, 8), (13,), (0,)]


# ------------------------------------------------------------------------------------- 8. compile

def _compile_losses(x, W, b, t, t_b, lam, soft, w, reduction):
    return (
        smoothce.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction, label_smoothing=0.1,
                                      chunk_size=8),
        smoothce.linear_mixup_cross_entropy(x, W, t, t_b, lam, reduction=reduction, smoothing="others",
                                            label_smoothing=0.1, z_loss=1e-3, chunk_size=5),
        smoothce.linear_cross_entropy(x, W, soft, linear_bias=b, reduction=reduction, chunk_size=16),
    )


def _run_compile_losses(fn, x, W, b, t, t_b, lam, soft, w, reduction, up):
    leaves = [x.clone().requires_grad_(True), W.clone().requires_grad_(True), b.clone().requires_grad_(True),
              soft.clone().requires_grad_(True)]
    losses = fn(leaves[0], leaves[1], leaves[2], t, t_b, lam, leaves[3], w, reduction)
    total = sum((loss * up).sum() for loss in losses)
    total.backward()
    return [loss.detach() for loss in losses], [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("compile_backend,reduction", [pytest.param("inductor", "mean", marks=pytest.mark.slow),
                                                       ("aot_eager", "none"), ("aot_eager", "sum")])
def test_compile_fullgraph_matches_eager(compile_backend, reduction):
    """torch.compile(fullgraph=True) through the fake kernel: forward + backward (input, linear_weight,
    linear_bias, a probability target) equal eager's, and both the float64 truth's."""
    torch._dynamo.reset()
    n = 21
    x, W, b = make_problem(n, H, V)
    t = make_index_target((n,), V, ignore_every=4)
    t_b = make_index_target((n,), V, seed=9)
    soft = make_prob_target((n, V))
    w = make_weight(V)
    counter = torch._dynamo.testing.CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(_compile_losses, fullgraph=True, backend=counter)
    for step in range(2):  # the second call (another lam and upstream) reuses the compiled graph
        lam = torch.linspace(0, 1, n) * (1 - 0.2 * step)
        up = upstream_for(reduction, (n,), seed=step).float() if reduction == "none" else torch.tensor(1.0 + step)
        losses_c, grads_c = _run_compile_losses(compiled, x, W, b, t, t_b, lam, soft, w, reduction, up)
        losses_e, grads_e = _run_compile_losses(_compile_losses, x, W, b, t, t_b, lam, soft, w, reduction, up)
        for i, (lc, le) in enumerate(zip(losses_c, losses_e)):
            torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6, msg=f"loss {i} (step {step})")
        for name, gc, ge in zip(GRADS[1:], grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=f"{name} (step {step})")
        # and both are right
        x64, W64, b64, soft64 = (v.double().requires_grad_(True) for v in (x, W, b, soft))
        truth = (linear_loss("ref", x64, W64, t, linear_bias=b64, weight=w.double(), reduction=reduction,
                             label_smoothing=0.1),
                 linear_loss("ref", x64, W64, t, target_b=t_b, lam=lam.double(), reduction=reduction,
                             smoothing="others", label_smoothing=0.1, z_loss=1e-3),
                 linear_loss("ref", x64, W64, soft64, linear_bias=b64, reduction=reduction))
        sum((loss * up.double()).sum() for loss in truth).backward()
        for i, (lc, lt) in enumerate(zip(losses_c, truth)):
            assert_near(lc, lt, torch.float32, f"compiled loss {i}")
        for name, gc, leaf in zip(GRADS[1:], grads_c, (x64, W64, b64, soft64)):
            assert_near(gc, leaf.grad, torch.float32, f"compiled {name}")
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert any("linear_forward" in str(node.target) for graph in counter.graphs for module in graph.modules()
               for node in module.graph.nodes), "the op is not in the compiled graph"


def test_compile_module_training_step():
    """A model ending in LinearCrossEntropyLoss, compiled with fullgraph=True: two training steps give
    the eager model's losses and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(6, H), torch.nn.GELU())
            self.head = smoothce.LinearCrossEntropyLoss(H, V, bias=True, weight=make_weight(V),
                                                        label_smoothing=0.1, chunk_size=7)

        def forward(self, features, target):
            return self.head(self.body(features), target)

    model = Model()
    twin = copy.deepcopy(model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    features = make_logits((2, 11, 6), seed=3)
    target = make_index_target((2, 11), V, ignore_every=5)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        loss = compiled(features, target)
        loss.backward()
        expected = twin(features, target)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------- 9. LinearCrossEntropyLoss

@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_matches_torch_linear_cross_entropy_loss(reduction, bias, weighted):
    """Same parameters (linear.weight, linear.bias) and state_dict keys as torch.nn.LinearCrossEntropyLoss:
    torch's state_dict loads into ours (strict), and with label_smoothing=0 the losses and gradients equal
    torch's module and torch.nn.functional.linear_cross_entropy."""
    torch.manual_seed(0)
    w = make_weight(V) if weighted else None
    theirs = torch.nn.LinearCrossEntropyLoss(H, V, bias=bias, weight=w, reduction=reduction, ignore_index=-100)
    ours = smoothce.LinearCrossEntropyLoss(H, V, bias=bias, weight=w, reduction=reduction, chunk_size=CHUNK)
    names = ["linear.weight"] + (["linear.bias"] if bias else [])
    assert [name for name, _ in ours.named_parameters()] == names == [name for name, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert not torch.equal(ours.linear.weight, theirs.linear.weight)  # (independently initialised)
    ours.load_state_dict(theirs.state_dict())
    x = make_logits((N, H), scale=1.0)
    t = make_index_target((N,), V, ignore_every=6)
    up = upstream_for(reduction, (N,))
    results = []
    for module in (ours, theirs):
        leaf = x.clone().requires_grad_(True)
        loss = module(leaf, t)
        loss.backward(torch.ones_like(loss) if up is None else up.float())
        results.append([loss.detach(), leaf.grad] + [p.grad for p in module.parameters()])
    functional = F.linear_cross_entropy(x, theirs.linear.weight.detach(), t, linear_bias=theirs.linear.bias,
                                        weight=w, reduction=reduction, ignore_index=-100)
    torch.testing.assert_close(results[0][0], functional.detach(), rtol=1e-5, atol=1e-6)
    for name, mine, torchs in zip(["loss", "input"] + names, *results):
        torch.testing.assert_close(mine, torchs, rtol=1e-5, atol=1e-6 * torchs.abs().max().item(), msg=name)


MODULE_OPTIONS = {
    "default": dict(),
    "all": dict(smoothing="others", label_smoothing=0.1, z_loss=1e-3, chunk_size=5, ignore_index=3),
    "values_no_fp32_grad_weight": dict(target_values=(0.9, 0.01), chunk_size=2, fp32_grad_weight=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", sorted(MODULE_OPTIONS))
def test_module_training_step_equals_functional(option, reduction, dtype):
    """A training step (forward, backward, SGD step) of the module equals linear_cross_entropy with its
    linear's weight and bias and the same options; the module's dtype argument is honoured."""
    kwargs = MODULE_OPTIONS[option]
    torch.manual_seed(0)
    w = make_weight(V, dtype)
    module = smoothce.LinearCrossEntropyLoss(H, V, bias=True, dtype=dtype, weight=w, reduction=reduction, **kwargs)
    assert module.linear.weight.dtype == dtype and module.weight.dtype == dtype
    W0, b0 = module.linear.weight.detach().clone(), module.linear.bias.detach().clone()
    x = make_logits((3, 7, H), dtype, scale=1.0)
    t = make_index_target((3, 7), V, ignore_every=4, ignore_index=kwargs.get("ignore_index", -100))
    up = upstream_for(reduction, t.shape)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    leaf = x.clone().requires_grad_(True)
    loss = module(leaf, t)
    loss.backward(torch.ones_like(loss) if up is None else up.to(dtype))
    grads = [leaf.grad, module.linear.weight.grad.clone(), module.linear.bias.grad.clone()]
    optimizer.step()
    expected = evaluate("fused", x, W0, t, linear_bias=b0, weight=w, reduction=reduction, upstream=up, **kwargs)
    tol = dict(rtol=0, atol=0) if BACKEND != "emu" else dict(rtol=1e-6, atol=1e-6)  # (emulated schedule)
    torch.testing.assert_close(loss.detach(), expected["loss"], **tol)
    for name, got in zip(GRADS[1:], grads):
        torch.testing.assert_close(got, expected[name], **tol, msg=name)
    torch.testing.assert_close(module.linear.weight.detach(), W0 - 0.5 * expected["linear_weight"], **tol)
    torch.testing.assert_close(module.linear.bias.detach(), b0 - 0.5 * expected["linear_bias"], **tol)


def test_module_repr_and_attributes():
    default = smoothce.LinearCrossEntropyLoss(H, V)
    assert default.linear.bias is None and default.weight is None
    assert isinstance(default.linear, torch.nn.Linear) and default.linear.weight.shape == (V, H)
    r = repr(default)
    for word in ("smoothing=", "target_values", "z_loss", "chunk_size", "fp32_grad_weight"):
        assert word not in r.replace("label_smoothing=", ""), r
    r = repr(smoothce.LinearCrossEntropyLoss(H, V, smoothing="others", label_smoothing=0.1, z_loss=1e-3, chunk_size=64,
                                             fp32_grad_weight=False, target_values=None))
    for word in ("smoothing='others'", "z_loss=0.001", "chunk_size=64", "fp32_grad_weight=False"):
        assert word in r, r
    module = smoothce.LinearCrossEntropyLoss(H, V, target_values=[0.9, 0.01])
    assert module.target_values == (0.9, 0.01)
    assert set(module.state_dict()) == {"linear.weight"}  # the options are attributes, not state


# ------------------------------------------------------------------------------------ 10. bad input

def _bad(**changes):
    """Arguments of linear_cross_entropy (fp32, N = 6, H = 4, V = 5) with some of them replaced."""
    def make():
        x, W, b = make_problem(6, 4, 5)
        args = dict(input=x, linear_weight=W, target=make_index_target((6,), 5), linear_bias=b)
        for name, change in changes.items():
            args[name] = change(args) if callable(change) else change
        return args
    return make


ERROR_CASES = {
    # name: (arguments, the argument the message must name)
    "H_mismatch": (_bad(linear_weight=lambda a: torch.randn(5, 3)), r"linear_weight.*H = 4"),
    "linear_weight_1d": (_bad(linear_weight=lambda a: torch.randn(20)), "linear_weight"),
    "linear_weight_no_classes": (_bad(linear_weight=lambda a: torch.randn(0, 4), linear_bias=None,
                                      target=lambda a: torch.zeros(6, dtype=torch.long)), "linear_weight"),
    "bias_V_mismatch": (_bad(linear_bias=lambda a: torch.randn(6)), "linear_bias"),
    "bias_2d": (_bad(linear_bias=lambda a: torch.randn(1, 5)), "linear_bias"),
    "class_weight_V_mismatch": (_bad(weight=lambda a: torch.rand(4)), "weight"),
    "dtype_mismatch_weight": (_bad(linear_weight=lambda a: a["linear_weight"].double()), "linear_weight"),
    "dtype_mismatch_bias": (_bad(linear_bias=lambda a: a["linear_bias"].double()), "linear_bias"),
    "dtype_mismatch_class_weight": (_bad(weight=lambda a: torch.rand(5, dtype=torch.float64)), "weight"),
    "target_shape": (_bad(target=lambda a: torch.zeros(7, dtype=torch.long)), "target"),
    "target_leading_shape": (_bad(input=lambda a: a["input"].reshape(2, 3, 4)), "target"),
    "target_dtype_int32": (_bad(target=lambda a: a["target"].int()), "target"),
    "soft_target_shape": (_bad(target=lambda a: torch.rand(6, 4)), "target"),
    "soft_target_dtype": (_bad(target=lambda a: torch.rand(6, 5, dtype=torch.float64)), "target"),
    "target_out_of_range": (_bad(target=lambda a: a["target"].index_fill(0, torch.tensor([3]), 5)), "target"),
    "target_negative": (_bad(target=lambda a: a["target"].index_fill(0, torch.tensor([1]), -1)), "target"),
    "target_uint8_out_of_range": (_bad(target=lambda a: a["target"].to(torch.uint8).index_fill(
        0, torch.tensor([2]), 255)), "target"),
    "chunk_size_0": (_bad(chunk_size=0), "chunk_size"),
    "chunk_size_negative": (_bad(chunk_size=-4), "chunk_size"),
    "chunk_size_float": (_bad(chunk_size=2.0), "chunk_size"),
    "chunk_size_bool": (_bad(chunk_size=True), "chunk_size"),
    "fp32_grad_weight_int": (_bad(fp32_grad_weight=1), "fp32_grad_weight"),
    "fp32_grad_weight_none": (_bad(fp32_grad_weight=None), "fp32_grad_weight"),
    "input_0d": (_bad(input=torch.tensor(1.0)), "input"),
    "input_not_tensor": (_bad(input=lambda a: a["input"].tolist()), "input"),
    "linear_weight_not_tensor": (_bad(linear_weight=lambda a: a["linear_weight"].numpy()), "linear_weight"),
    "linear_weight_other_device": (_bad(linear_weight=lambda a: a["linear_weight"].to("meta")), "linear_weight"),
    "linear_bias_other_device": (_bad(linear_bias=lambda a: a["linear_bias"].to("meta")), "linear_bias"),
    "reduction": (_bad(reduction="avg"), "reduction"),
    "label_smoothing": (_bad(label_smoothing=1.5), "label_smoothing"),
    "smoothing_others_soft": (_bad(target=lambda a: torch.rand(6, 5), smoothing="others"), "smoothing"),
    "target_values_pair": (_bad(target_values=(0.9,)), "target_values"),
    "z_loss_negative": (_bad(z_loss=-1.0), "z_loss"),
}


@pytest.mark.not_on_cuda  # out-of-range targets: a device-side assert on CUDA
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_raises_naming_the_argument(case, requires_grad):
    make, match = ERROR_CASES[case]
    args = make()
    if requires_grad and isinstance(args["input"], torch.Tensor):
        args["input"].requires_grad_(True)
        if isinstance(args["linear_weight"], torch.Tensor):
            args["linear_weight"].requires_grad_(True)
    with pytest.raises(ERRORS, match=match):
        smoothce.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"), **args)


MIXUP_ERROR_CASES = {
    "target_b_shape": (lambda t: t[:-1], 0.3, "target_b"),
    "target_b_soft": (lambda t: torch.rand(t.shape[0], 5), 0.3, "target_b"),
    "lam_range": (lambda t: t.flip(0), 1.5, "lam"),
    "lam_shape": (lambda t: t.flip(0), torch.rand(7), "lam"),
    "lam_integer_tensor": (lambda t: t.flip(0), torch.ones(6, dtype=torch.long), "lam"),
    "lam_values_out_of_range": (lambda t: t.flip(0), torch.full((6,), 2.0), "lam"),
    "lam_requires_grad": (lambda t: t.flip(0), torch.rand(6).requires_grad_(True), "lam"),
    "target_b_dtype": (lambda t: t.flip(0).to(torch.uint8), 0.3, "target_b"),
}


@pytest.mark.not_on_cuda
@pytest.mark.parametrize("case", sorted(MIXUP_ERROR_CASES))
def test_mixup_bad_input_raises_naming_the_argument(case):
    target_b, lam, match = MIXUP_ERROR_CASES[case]
    x, W, b = make_problem(6, 4, 5)
    t = make_index_target((6,), 5)
    with pytest.raises(ERRORS, match=match):
        smoothce.linear_mixup_cross_entropy(x.requires_grad_(True), W, t, target_b(t), lam, linear_bias=b)


@pytest.mark.not_on_cuda
@pytest.mark.parametrize("case", ["target_out_of_range", "lam_values_out_of_range"])
def test_kernel_errors_name_the_linear_function(case):
    x, W, b = make_problem(6, 4, 5)
    t = make_index_target((6,), 5)
    if case == "target_out_of_range":
        call, where = (lambda: smoothce.linear_cross_entropy(x, W, t.index_fill(0, torch.tensor([3]), 5))), \
            "smoothce.linear_cross_entropy"
    else:
        call, where = (lambda: smoothce.linear_mixup_cross_entropy(x, W, t, t.flip(0), torch.full((6,), 2.0))), \
            "smoothce.linear_mixup_cross_entropy"
    with pytest.raises(ERRORS) as info:
        call()
    assert where in str(info.value), f"the message names another function: {info.value}"


# ------------------------------------------------------------------------------------- 11. autocast

@pytest.mark.not_on_cuda  # CPU autocast
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_loss_is_fp32(reduction, bias, amp_dtype):
    """Under CPU autocast (bf16; fp16) input, linear_weight and linear_bias are cast to the autocast dtype
    (as F.linear's are) and the loss is fp32: it equals smoothce.cross_entropy(F.linear(...)) under the same
    autocast to fp32 accuracy (the same half logits); the fp32 leaves get fp32 gradients close to the
    unfused ones."""
    torch.manual_seed(0)
    x, W, b = make_problem((4, 9), 16, 37, bias=bias)
    t = make_index_target((4, 9), 37, ignore_every=7)
    w = make_weight(37)  # fp32 class weights with bf16 logits, as users write it
    up = upstream_for(reduction, t.shape)
    results = []
    for impl in ("fused", "unfused"):
        leaves = [v.clone().requires_grad_(True) for v in (x, W, b) if v is not None]
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = linear_loss(impl, leaves[0], leaves[1], t, linear_bias=leaves[2] if bias else None, weight=w,
                               reduction=reduction, label_smoothing=0.1, chunk_size=5)
        assert loss.dtype == torch.float32, f"{impl}: loss dtype {loss.dtype} under autocast"
        loss.backward(torch.ones_like(loss) if up is None else up.float())
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    (loss, *grads), (loss_u, *grads_u) = results
    assert loss.shape == loss_u.shape
    assert_near(loss, loss_u, torch.float32, "autocast loss", tol=(1e-5, 1e-6))
    for name, g, gu in zip(GRADS[1:], grads, grads_u):
        assert g.dtype == torch.float32, f"{name}: gradient dtype {g.dtype}"
        # (both are half gradients of the same half logits, cast to fp32: half accuracy)
        assert_near(g, gu, amp_dtype, name, tol=(1e-2, 1e-2))
    # and against the float64 truth of the half-rounded layer
    truth = evaluate("truth", x.to(amp_dtype), W.to(amp_dtype), t, linear_bias=None if b is None else b.to(amp_dtype),
                     weight=w, reduction=reduction, label_smoothing=0.1, upstream=up)
    assert_near(loss, truth["loss"], torch.float32, "autocast loss vs truth", tol=(1e-3, 1e-3))


@pytest.mark.not_on_cuda  # CPU autocast
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bf16_fp64_input_is_not_cast(reduction):
    """autocast casts only float32 / half tensors: a float64 layer stays float64 (so does the loss)."""
    x, W, b, t, kwargs, _ = build("weight_ignore", torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = evaluate("fused", x, W, t, linear_bias=b, reduction=reduction, chunk_size=CHUNK, **kwargs)
    truth = evaluate("truth", x, W, t, linear_bias=b, reduction=reduction, **kwargs)
    assert_results_near(mine, truth, torch.float64)


def _autocast_soft_target_results(reduction):
    """(fused, unfused) [loss, grad input, grad W, grad b, grad target] for an fp32 probability target and
    an fp32 layer under CPU autocast (bf16)."""
    x, W, b = make_problem(16, 8, 29)
    t = make_prob_target((16, 29))
    up = upstream_for(reduction, (16,))
    results = []
    for impl in ("fused", "unfused"):
        leaves = [v.clone().requires_grad_(True) for v in (x, W, b, t)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_loss(impl, leaves[0], leaves[1], leaves[3], linear_bias=leaves[2], reduction=reduction,
                               label_smoothing=0.1, chunk_size=5)
        assert loss.dtype == torch.float32, f"{impl}: loss dtype {loss.dtype} under autocast"
        loss.backward(torch.ones_like(loss) if up is None else up.float())
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    return results


@pytest.mark.not_on_cuda  # CPU autocast
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bf16_fp32_probability_target_bf16_accuracy(reduction):
    """An fp32 probability target with an fp32 layer under autocast: fp32 loss and fp32 gradients (input,
    weight, bias, target), within bf16 accuracy of the unfused path."""
    fused, unfused = _autocast_soft_target_results(reduction)
    for name, got, expected in zip(GRADS, fused, unfused):
        assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
        assert_near(got, expected, torch.bfloat16, name, tol=(1e-2, 1e-2))


@pytest.mark.not_on_cuda  # CPU autocast
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bf16_fp32_probability_target_matches_unfused(reduction):
    """smoothce.cross_entropy computes with the fp32 probabilities under autocast
    (tests/test_compile_autocast.py::test_autocast_soft_targets): the fused loss, which promises the
    unfused one, must too: its loss and target gradient to fp32 accuracy (the bf16 logits are the same)."""
    (loss, *_, tgrad), (loss_u, *_, tgrad_u) = _autocast_soft_target_results(reduction)
    failures = []
    for name, got, expected in (("loss", loss, loss_u), ("target grad", tgrad, tgrad_u)):
        try:
            assert_near(got, expected, torch.float32, name, tol=(1e-5, 1e-6))
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, "; ".join(failures)
