"""The CUDA kernels' own source (csrc/cuda), run on CPU by the emulator (tests/emu): every launch
plan on small shapes chosen to reach it, against the float64 reference and F.cross_entropy, and the
global-memory traffic model of the README.

(`make test-emu` runs the whole suite on the emulated kernels; this file is the part `make test` runs.)
"""
import pytest
import torch

import emulator
import smoothce
from smoothce import _function
from conftest import (DTYPES, REDUCTION_CODE, assert_close_to_truth, check_all, dtype_id, loss_magnitude,
                      make_index_target, make_logits, make_prob_target, make_weight, positions_shape, ref,
                      run_all)

# (these tests choose their kernels themselves)
pytestmark = pytest.mark.cpu_only

# An A100-like device (opt-in shared memory) with few SMs, as tests/emu/ops.cpp sets by default.
DEFAULT_LIMITS = dict(sm_count=2, max_smem=163 * 1024 - 2048, split_chunk=8192)
# Small enough that rows of a few hundred classes are split in chunks of 128.
SPLIT_LIMITS = dict(sm_count=2, max_smem=1024, split_chunk=128)
# An sm_90-like device with 4.5 KiB of shared memory: rows of a few thousand classes go to a cluster.
CLUSTER_LIMITS = dict(sm_count=2, max_smem=4608, split_chunk=8192, max_cluster_blocks=8)
H100_LIMITS = dict(sm_count=132, max_smem=227 * 1024 - 2048, split_chunk=8192, max_cluster_blocks=8)


@pytest.fixture(scope="module")
def emu():
    return emulator.load()


@pytest.fixture
def on_emu(emu, monkeypatch):
    """smoothce's calls go to the emulated CUDA kernels; limits and the emulated device's switches
    (tests/test_sanitizer.py) are restored afterwards."""
    monkeypatch.setattr(_function, "_ops", torch.ops.smoothce_emu)
    yield emu
    emu.set_limits(**DEFAULT_LIMITS)
    emu.set_cluster_occupancy("fits")
    emu.set_ptx_arch(90)
    assert emu.get_last_error() == 0, "a test left an emulated CUDA error pending"


def _flat_offset(shape, offset):
    """A dense tensor of `shape` whose data starts `offset` elements into its storage (misaligned)."""
    def view(leaf):
        n = 1
        for s in shape:
            n *= s
        return leaf.view(-1)[offset:offset + n].view(shape)
    return view


# name: (leaf shape, view from the leaf to the input or None, limits, expected plan fields)
CASES = {
    "rows_tiny_c": ((37, 3), None, DEFAULT_LIMITS, dict(variant="rows", group=1, cooperative=True)),
    "rows_sub_warp": ((21, 50), None, DEFAULT_LIMITS, dict(variant="rows", group=8, cooperative=True)),
    "rows_warp": ((9, 700), None, DEFAULT_LIMITS, dict(variant="rows", group=32, cooperative=True)),
    "rows_block": ((3, 3001), None, DEFAULT_LIMITS, dict(variant="rows", group=256, rows_per_block=1)),
    # (a non-dense input is made contiguous when a gradient is wanted: see test_plans_inference_views)
    "rows_strided_rows": ((12, 80), lambda leaf: leaf[:, :75], DEFAULT_LIMITS, dict(variant="rows")),
    "rows_misaligned": ((1, 11 * 45 + 3), _flat_offset((11, 45), 3), DEFAULT_LIMITS,
                        dict(variant="rows", cooperative=True)),
    "rows_misaligned_per_row": ((9, 61), lambda leaf: leaf[:, 1:], DEFAULT_LIMITS, dict(variant="rows")),
    "rows_channels_last": ((2, 40, 3, 5), lambda leaf: leaf.to(memory_format=torch.channels_last),
                           DEFAULT_LIMITS, dict(variant="rows", cooperative=True)),
    "split": ((3, 517), None, SPLIT_LIMITS, dict(variant="split_rows", chunks=5)),
    "split_misaligned": ((4, 301), lambda leaf: leaf[:, 1:], SPLIT_LIMITS, dict(variant="split_rows")),
    "cluster": ((3, 3001), None, CLUSTER_LIMITS, dict(variant="cluster_rows")),
    "cluster_tail": ((5, 2301), None, CLUSTER_LIMITS, dict(variant="cluster_rows")),
    "cluster_misaligned": ((1, 4 * 2503 + 1), _flat_offset((4, 2503), 1), CLUSTER_LIMITS,
                           dict(variant="cluster_rows")),
    "strided_staged": ((2, 5, 7, 9), None, DEFAULT_LIMITS, dict(variant="strided", staged=True)),
    "strided_unstaged": ((2, 600, 3, 5), None, DEFAULT_LIMITS, dict(variant="strided", staged=False)),
    "strided_transposed": ((40, 6), lambda leaf: leaf.t(), DEFAULT_LIMITS, dict(variant="strided")),
    "strided_many_tiles": ((3, 4, 300), None, DEFAULT_LIMITS, dict(variant="strided", staged=True)),
    "unbatched": ((70,), None, DEFAULT_LIMITS, dict(variant="rows")),
}


def _input_shape(leaf_shape, view):
    return tuple(view(torch.empty(leaf_shape)).shape) if view is not None else leaf_shape


def _check_plan(emu, expected):
    plan = emu.last_plan()
    for key, value in expected.items():
        assert plan[key] == value, f"plan {plan} does not have {key}={value}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", ["plain", "weight_eps", "ignore_none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plans_index_targets(on_emu, case, variant, dtype):
    leaf_shape, view, limits, expected = CASES[case]
    on_emu.set_limits(**limits)
    shape = _input_shape(leaf_shape, view)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(leaf_shape, dtype, seed=len(case))
    ignore = variant == "ignore_none" and len(shape) > 1
    target = make_index_target(positions_shape(shape), C, seed=3, ignore_every=3 if ignore else 0)
    weight = make_weight(C, dtype) if variant == "weight_eps" else None
    eps = 0.1 if variant == "weight_eps" else 0.0
    reduction = "none" if variant == "ignore_none" else "mean"
    upstream = None
    if reduction == "none":
        upstream = torch.rand(positions_shape(shape), generator=torch.Generator().manual_seed(5)) + 0.5
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, weight=weight, view=view, upstream=upstream,
                                  reduction=reduction, label_smoothing=eps)
    _check_plan(on_emu, expected)
    check_all(mine, theirs, truth, dtype)


# Forward-only inputs are read in place whatever their strides: a row per group, misaligned rows.
INFERENCE_VIEWS = {
    "rows_per_group": ((12, 80), lambda leaf: leaf[:, :75], DEFAULT_LIMITS, dict(variant="rows", cooperative=False)),
    "rows_per_group_misaligned": ((9, 61), lambda leaf: leaf[:, 1:], DEFAULT_LIMITS,
                                  dict(variant="rows", cooperative=False)),
    "rows_block_per_group": ((3, 3005), lambda leaf: leaf[:, 3:], DEFAULT_LIMITS,
                             dict(variant="rows", cooperative=False, rows_per_block=1)),
    "expanded_rows": ((1, 40), lambda leaf: leaf.expand(6, 40), DEFAULT_LIMITS,
                      dict(variant="rows", cooperative=False)),
    "split_misaligned": ((4, 301), lambda leaf: leaf[:, 1:], SPLIT_LIMITS, dict(variant="split_rows")),
    "strided_step": ((2, 6, 40), lambda leaf: leaf[:, :, ::2], DEFAULT_LIMITS, dict(variant="strided")),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", sorted(INFERENCE_VIEWS))
def test_plans_inference_views(on_emu, case, reduction, dtype):
    leaf_shape, view, limits, expected = INFERENCE_VIEWS[case]
    on_emu.set_limits(**limits)
    x = view(make_logits(leaf_shape, dtype))
    C = x.shape[1]
    target = make_index_target(positions_shape(x.shape), C, ignore_every=4)
    weight = make_weight(C, dtype)
    with torch.no_grad():
        loss = smoothce.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1)
    _check_plan(on_emu, expected)
    truth = ref.cross_entropy(x.double(), target, weight.double(), reduction=reduction, label_smoothing=0.1)
    theirs = torch.nn.functional.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1)
    assert_close_to_truth(loss, truth, theirs, dtype, "loss",
                          magnitude=loss_magnitude(x, target, weight=weight, reduction=reduction,
                                                   label_smoothing=0.1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", ["rows_sub_warp", "rows_block", "rows_strided_rows", "split_misaligned",
                                  "cluster", "strided_staged", "strided_unstaged", "unbatched"])
def test_plans_probability_targets(on_emu, case, dtype):
    leaf_shape, view, limits, expected = CASES[case]
    on_emu.set_limits(**limits)
    shape = _input_shape(leaf_shape, view)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(leaf_shape, dtype)
    P = make_prob_target(shape, dtype)
    if view is not None:  # the probabilities share the logits' layout
        P = view(make_prob_target(leaf_shape, dtype))
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, P, weight=make_weight(C, dtype), view=view,
                                  reduction="sum", label_smoothing=0.2, target_requires_grad=True)
    if case == "cluster" and dtype == torch.float64:  # fp64 logits + probabilities overflow 8 blocks' 4.5 KiB
        expected = dict(variant="split_rows")
    _check_plan(on_emu, expected)
    check_all(mine, theirs, truth, dtype, check_target_grad=True)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["rows_sub_warp", "rows_block", "split", "cluster", "strided_staged"])
def test_plans_all_ignored_and_empty(on_emu, case, reduction):
    leaf_shape, view, limits, _ = CASES[case]
    on_emu.set_limits(**limits)
    x = make_logits(leaf_shape)
    shape = _input_shape(leaf_shape, view)
    target = torch.full(positions_shape(shape), 7)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, view=view, ignore_index=7,
                                  reduction=reduction, label_smoothing=0.1)
    assert torch.equal(mine[1], torch.zeros_like(mine[1])), "ignored positions must get exact zeros"
    check_all(mine, theirs, truth, torch.float32)
    empty = make_logits((0,) + tuple(shape[1:]))
    loss = smoothce.cross_entropy(empty, torch.zeros((0,) + tuple(shape[2:]), dtype=torch.long), reduction=reduction)
    ref_loss = torch.nn.functional.cross_entropy(empty, torch.zeros((0,) + tuple(shape[2:]), dtype=torch.long),
                                                 reduction=reduction)
    assert torch.equal(loss.isnan(), ref_loss.isnan()) and loss.shape == ref_loss.shape


@pytest.mark.parametrize("case", ["rows_sub_warp", "rows_block", "split", "cluster", "strided_staged",
                                  "strided_unstaged"])
def test_special_values(on_emu, case):
    """−inf logits (masked classes) with and without smoothing; NaN and +inf logits poison their rows."""
    leaf_shape, view, limits, _ = CASES[case]
    assert view is None
    on_emu.set_limits(**limits)
    x = make_logits(leaf_shape)
    C = leaf_shape[1]
    target = make_index_target(positions_shape(leaf_shape), C, seed=9) % (C // 2)
    masked = x.clone()
    masked[:, C // 2:] = float("-inf")
    for eps in (0.0, 0.1):
        mine, theirs, truth = run_all(smoothce.cross_entropy, masked, target, label_smoothing=eps, reduction="none")
        check_all(mine, theirs, truth, torch.float32)
    poisoned = x.clone()
    poisoned[0, 1] = float("nan")
    poisoned[-1, 2] = float("inf")
    mine, theirs, truth = run_all(smoothce.cross_entropy, poisoned, target, reduction="none")
    check_all(mine, theirs, truth, torch.float32)


def test_out_of_range_target_is_an_index_error(on_emu):
    """The prologue kernel's device-side check (a device assert on a GPU) names the value."""
    for case in ["rows_sub_warp", "strided_staged"]:
        leaf_shape, view, limits, _ = CASES[case]
        on_emu.set_limits(**limits)
        x = make_logits(leaf_shape)
        target = make_index_target(positions_shape(leaf_shape), leaf_shape[1])
        target.view(-1)[-1] = 1234
        with pytest.raises(IndexError, match="1234"):
            smoothce.cross_entropy(x, target)


def test_results_are_deterministic(on_emu):
    x = make_logits((64, 3001))
    target = make_index_target((64,), 3001)
    first = torch.ops.smoothce_emu.forward(x, target, make_weight(3001), -100, 1, 0.1, True, False)
    second = torch.ops.smoothce_emu.forward(x, target, make_weight(3001), -100, 1, 0.1, True, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_plan_choice(emu):
    """The plan function picks each variant where the README says it does."""
    emu.set_limits(**DEFAULT_LIMITS)
    try:
        plan = lambda C, **kw: emu.plan(**{**dict(outer=4096, classes=C, inner=1, class_contiguous=True,
                                                 dense_rows=True, elem_size=4, soft=False), **kw})
        assert plan(10)["group"] == 2 and plan(10)["rows_per_block"] == 128
        assert plan(1000)["group"] == 32 and plan(1000)["variant"] == "rows"
        assert plan(32000)["variant"] == "rows" and plan(32000)["group"] == 512
        assert plan(32000, elem_size=2)["variant"] == "rows"
        big = plan(128256)
        assert big["variant"] == "split_rows" and big["chunks"] * big["chunk"] >= 128256
        assert plan(128256, elem_size=2)["variant"] == "split_rows"
        assert plan(32000, soft=True)["variant"] == "split_rows"  # logits + probabilities exceed 161 KiB
        strided = plan(21, class_contiguous=False, dense_rows=False, outer=8, inner=512 * 512)
        assert strided["variant"] == "strided" and strided["staged"] and strided["threads"] == 256
        assert not plan(1000, class_contiguous=False, dense_rows=False, outer=8, inner=4096)["staged"]
        for C in (1, 7, 33, 1000, 5000, 32000, 128256):
            p = plan(C)
            assert p["smem_bytes"] <= DEFAULT_LIMITS["max_smem"]
            assert p["blocks"] <= DEFAULT_LIMITS["sm_count"] * 2048 // p["threads"]
        emu.set_limits(**H100_LIMITS)  # clusters hold what one block cannot
        assert plan(32000)["variant"] == "rows"
        for C, elem_size, blocks in ((128256, 2, 4), (128256, 4, 8), (256000, 2, 8), (256000, 4, 5)):
            p = plan(C, elem_size=elem_size)
            assert (p["variant"], p["chunks"]) == ("cluster_rows", blocks), (C, elem_size, p)
            assert p["chunk"] * blocks >= C and p["smem_bytes"] <= H100_LIMITS["max_smem"]
            assert p["blocks"] % blocks == 0
        assert plan(32000, soft=True)["variant"] == "cluster_rows"
        assert plan(2_000_000)["variant"] == "split_rows"  # 8 blocks of 225 KiB hold 460K fp32 classes at most
    finally:
        emu.set_limits(**DEFAULT_LIMITS)


# ------------------------------------------------------------------------ traffic (README model)

def _traffic(emu, fn):
    emu.reset_traffic()
    fn()
    return emu.traffic()


def _model(x, reads, writes):
    """Bytes the README's traffic model predicts: `reads`/`writes` passes over the logits, plus the
    per-position values: the int64 target, read twice (the prologue's D and range check, then the
    main kernel), and the fp32 loss and lse written."""
    positions = x.numel() // (x.shape[0] if x.dim() == 1 else x.shape[1])
    logits = x.numel() * x.element_size()
    return reads * logits + 16 * positions, writes * logits + 8 * positions


def _assert_traffic(measured, expected):
    """Within 5%, plus 256 bytes for the prologue's few scalars (DeviceScalars, partial sums of D)."""
    for what, got, want in zip(("read", "written"), measured, expected):
        assert abs(got - want) <= 0.05 * want + 256, f"{what} {got} bytes, the model says {want}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(64, 1000), (4, 4000), (2, 50, 64), (4, 21, 16, 16), (2048, 10)], ids=str)
def test_fused_traffic_is_one_read_one_write(on_emu, shape, dtype):
    """Forward with the gradient + a plain loss.backward(): 1 read of the logits + 1 write of the
    gradient, and inference reads once (each within 5%, per-position values included)."""
    x = make_logits(shape, dtype).requires_grad_(True)
    target = make_index_target(positions_shape(shape), shape[1])

    def train_step():
        smoothce.cross_entropy(x, target, label_smoothing=0.1).backward()

    _assert_traffic(_traffic(on_emu, train_step), _model(x, 1, 1))
    assert on_emu.last_plan()["variant"] in ("rows", "strided")
    with torch.no_grad():
        read, write = _traffic(on_emu, lambda: smoothce.cross_entropy(x, target, label_smoothing=0.1))
    _assert_traffic((read, write), _model(x, 1, 0))


def test_scaled_backward_traffic(on_emu):
    """An upstream gradient ≠ 1 (GradScaler, accumulation) costs one more read + write of the gradient."""
    x = make_logits((64, 1000)).requires_grad_(True)
    target = make_index_target((64,), 1000)
    measured = _traffic(on_emu, lambda: (smoothce.cross_entropy(x, target) * 0.5).backward())
    _assert_traffic(measured, _model(x, 2, 2))


def test_none_reduction_traffic(on_emu):
    """reduction='none' (the upstream gradient is a tensor): forward reads once, backward recomputes
    the gradient scaled inside the kernel: 2 reads + 1 write in all."""
    x = make_logits((64, 1000)).requires_grad_(True)
    target = make_index_target((64,), 1000)
    upstream = torch.rand(64)
    measured = _traffic(on_emu, lambda: smoothce.cross_entropy(x, target, reduction="none").backward(upstream))
    _assert_traffic(measured, _model(x, 2, 1))


@pytest.mark.parametrize("plan", ["rows", "cluster", "strided"])
def test_inplace_backward_traffic(on_emu, plan):
    """inplace_backward: forward reads the logits, backward reads them again and writes the gradient
    over them: 2 reads + 1 write, and no N×C buffer (the per-position values come twice)."""
    shape = {"rows": (64, 1000), "cluster": (8, 6000), "strided": (4, 21, 16, 16)}[plan]
    if plan == "cluster":
        on_emu.set_limits(**CLUSTER_LIMITS)
    leaf = make_logits(shape).requires_grad_(True)
    target = make_index_target(positions_shape(shape), shape[1])

    def train_step():
        smoothce.cross_entropy(leaf * 1, target, label_smoothing=0.1, inplace_backward=True).backward()

    measured = _traffic(on_emu, train_step)
    read, write = _model(leaf, 2, 1)
    positions = leaf.numel() // shape[1]  # two launches: the targets read twice more, loss and lse written again
    _assert_traffic(measured, (read + 16 * positions, write + 8 * positions))


def test_mixup_traffic(on_emu):
    """mixup with a per-position lam: 1 read + 1 write of the logits; per position the second int64
    target (read twice, as the first) and the lam value (twice) come on top."""
    x = make_logits((64, 1000)).requires_grad_(True)
    target, target_b = make_index_target((64,), 1000), make_index_target((64,), 1000, seed=2)
    lam = torch.rand(64)
    measured = _traffic(on_emu, lambda: smoothce.mixup_cross_entropy(x, target, target_b, lam, z_loss=1e-4).backward())
    read, write = _model(x, 1, 1)
    _assert_traffic(measured, (read + (16 + 8) * 64, write))


def test_cluster_traffic(on_emu):
    """A row held by a cluster of blocks: 1 read + 1 write however long the row."""
    on_emu.set_limits(**CLUSTER_LIMITS)
    x = make_logits((8, 6000)).requires_grad_(True)
    target = make_index_target((8,), 6000)
    measured = _traffic(on_emu, lambda: smoothce.cross_entropy(x, target, label_smoothing=0.1).backward())
    assert on_emu.last_plan()["variant"] == "cluster_rows" and on_emu.last_plan()["chunks"] == 8
    _assert_traffic(measured, _model(x, 1, 1))


def test_split_traffic(on_emu):
    """A split row: the finishing kernel reads its chunk again (2 reads + 1 write)."""
    on_emu.set_limits(sm_count=2, max_smem=1024, split_chunk=2048)
    x = make_logits((8, 8000)).requires_grad_(True)
    target = make_index_target((8,), 8000)
    measured = _traffic(on_emu, lambda: smoothce.cross_entropy(x, target).backward())
    assert on_emu.last_plan()["variant"] == "split_rows" and on_emu.last_plan()["chunks"] == 4
    _assert_traffic(measured, _model(x, 2, 1))


def test_scale_grad_op(on_emu):
    """scale_grad_ on the emulated kernel: a no-op for 1 (read on the device), exact otherwise."""
    for dtype in DTYPES:
        grad = make_logits((5, 37), dtype)[:, 1:]  # a non-dense gradient goes through torch's mul_
        for g in (grad, make_logits((5, 37), dtype)):
            before = g.clone()
            torch.ops.smoothce_emu.scale_grad_(g, torch.tensor(1.0, dtype=dtype))
            assert torch.equal(g, before)
            torch.ops.smoothce_emu.scale_grad_(g, torch.tensor(2.5, dtype=dtype))
            torch.testing.assert_close(g, (before.double() * 2.5).to(dtype))
            per_position = torch.rand(5, dtype=dtype)
            torch.ops.smoothce_emu.scale_grad_(g, per_position)
            torch.testing.assert_close(g, (before.double() * 2.5 * per_position.double()[:, None]).to(dtype),
                                       rtol=2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_emulated_op_matches_cpu_op(on_emu, reduction):
    """The raw ops agree between the CPU kernels and the emulated CUDA kernels (loss, lse, grad)."""
    x = make_logits((2, 13, 6, 5))
    target = make_index_target((2, 6, 5), 13, ignore_every=4, ignore_index=255)
    weight = make_weight(13)
    args = (x, target, weight, 255, REDUCTION_CODE[reduction], 0.1, True, False)
    for got, want in zip(torch.ops.smoothce_emu.forward(*args), torch.ops.smoothce.forward(*args)):
        assert got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ docs/semantics.md §3 variants on every plan
VARIANT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _variant_args(option, shape, C, dtype):
    """(kwargs of smoothce.mixup_cross_entropy / cross_entropy, mixup?) for one option set of
    docs/semantics.md §3."""
    pos = positions_shape(shape)
    if option == "mixup":  # per-position lam, weights, ignored targets in a and b, target values, z-loss
        lam = torch.rand(pos, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        target_b = make_index_target(pos, C, seed=9, ignore_every=5)
        return dict(target_b=target_b, lam=lam.to(dtype), weight=make_weight(C, dtype), target_values=(0.8, 0.03),
                    z_loss=1e-3, reduction="none"), True
    if option == "mixup_scalar":
        return dict(target_b=make_index_target(pos, C, seed=9), lam=0.35, label_smoothing=0.1, reduction="mean"), True
    return dict(smoothing="others", label_smoothing=0.2, z_loss=1e-2, reduction="sum"), False


def _variant_loss(fn_ref, x, target, kwargs, mixup):
    kwargs = dict(kwargs)
    if mixup:
        target_b, lam = kwargs.pop("target_b"), kwargs.pop("lam")
        lam = lam.double() if isinstance(lam, torch.Tensor) else lam
        return fn_ref.mixup_cross_entropy(x, target, target_b, lam, **kwargs)
    return fn_ref.cross_entropy(x, target, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("option", ["others_z", "mixup", "mixup_scalar"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plans_variants(on_emu, case, option, dtype):
    """Every plan computes the docs/semantics.md §3 options (target values, z-loss, mixup pairs) as the
    reference does."""
    leaf_shape, view, limits, expected = CASES[case]
    on_emu.set_limits(**limits)
    leaf = make_logits(leaf_shape, dtype, seed=len(case)).requires_grad_(True)
    x = view(leaf) if view is not None else leaf
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    if x.dim() == 1 and option != "others_z":
        pytest.skip("mixup pairs of an unbatched input: one position, covered by (N, C)")
    target = make_index_target(positions_shape(x.shape), C, seed=3, ignore_every=3 if x.dim() > 1 else 0)
    kwargs, mixup = _variant_args(option, x.shape, C, dtype)
    loss = _variant_loss(smoothce, x, target, kwargs, mixup)
    _check_plan(on_emu, expected)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    loss.backward(upstream.to(loss.dtype))

    leaf64 = leaf.detach().double().requires_grad_(True)
    x64 = view(leaf64) if view is not None else leaf64
    kwargs64 = dict(kwargs, weight=kwargs["weight"].double()) if "weight" in kwargs else kwargs
    truth = _variant_loss(ref, x64, target, kwargs64, mixup)
    truth.backward(upstream)
    tol = VARIANT_TOL[dtype]
    for name, mine, exact in (("loss", loss, truth), ("grad", leaf.grad, leaf64.grad)):
        scale = exact.abs().max().clamp_min(1e-30)
        err = ((mine.double() - exact).abs() / scale).max()
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("option", ["plain", "others_z", "mixup"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plans_grad_over_logits(on_emu, case, option, dtype):
    """grad_ (inplace_backward) on every plan: the gradient written over the logits equals the one the
    same kernels write into a new tensor, bit for bit (every logit is read before it is overwritten,
    including the target logits other blocks of a cluster or split row need)."""
    leaf_shape, view, limits, _ = CASES[case]
    on_emu.set_limits(**limits)
    leaf = make_logits(leaf_shape, dtype, seed=len(case))
    x = view(leaf) if view is not None else leaf
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    if x.dim() == 1 and option == "mixup":
        pytest.skip("mixup pairs of an unbatched input: one position, covered by (N, C)")
    target = make_index_target(positions_shape(x.shape), C, seed=3, ignore_every=3 if x.dim() > 1 else 0)
    ext, label_smoothing, weight, reduction = {}, 0.1, None, 1
    if option != "plain":
        kwargs, _ = _variant_args(option, x.shape, C, dtype)
        weight = kwargs.get("weight")
        label_smoothing = kwargs.get("label_smoothing", 0.0)
        reduction = REDUCTION_CODE[kwargs["reduction"]]
        if kwargs.get("smoothing") == "others":
            ext["target_values"] = [1.0 - label_smoothing, label_smoothing / (C - 1)]
            label_smoothing = 0.0
        if "target_values" in kwargs:
            ext["target_values"] = list(kwargs["target_values"])
        ext["z_loss"] = kwargs.get("z_loss", 0.0)
        if "target_b" in kwargs:
            ext["target_b"] = kwargs["target_b"]
            ext["lam"] = kwargs["lam"].float()
    upstream = torch.tensor(0.75) if reduction != 0 else torch.rand(positions_shape(x.shape)) + 0.5
    ops = torch.ops.smoothce_emu
    _, _, expected = ops.forward(x, target, weight, -100, reduction, label_smoothing, True, False, upstream, **ext)
    storage = leaf.clone()
    logits = view(storage) if view is not None else storage
    if torch._debug_has_internal_overlap(logits) == 1:
        pytest.skip("logits sharing memory cannot take an in-place gradient")
    ops.grad_(logits, target, weight, -100, reduction, label_smoothing, False, upstream, **ext)
    assert torch.equal(logits, expected)
    if view is not None:  # elements outside the view are untouched
        untouched = torch.ones_like(storage, dtype=torch.bool)
        (view(untouched)).fill_(False)
        assert torch.equal(storage[untouched], leaf[untouched])


# ------------------------------------------------------------------------ vocabulary-parallel shards

def _shard_pair(x, target, sizes, rank, ops, **ext):
    """Every rank's shard_stats stacked (as the all-gather stacks them), and rank `rank`'s shard."""
    C = x.shape[1]
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    stats = torch.stack([ops.shard_stats(x[:, s:s + n].contiguous(), target, None, s, C, -100, 0.1, False, **ext)
                         for s, n in zip(starts, sizes)])
    return stats, x[:, starts[rank]:starts[rank] + sizes[rank]].contiguous(), starts[rank]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("sizes", [[300, 700], [1, 999, 24, 1000]], ids=str)
def test_shard_kernels_match_the_cpu_kernels(on_emu, dtype, sizes):
    """The emulated CUDA shard kernels give the CPU kernels' statistics, loss and gradient, the target
    on any rank, with several positions per block (2 SMs: at most 16 blocks)."""
    x = make_logits((40, sum(sizes)), dtype)
    target = make_index_target((40,), sum(sizes))
    for ops_name in ("emu", "cpu"):
        ops = torch.ops.smoothce_emu if ops_name == "emu" else torch.ops.smoothce
        stats, shard, start = _shard_pair(x, target, sizes, 1, ops)
        out = ops.shard_forward(shard, target, None, stats, start, sum(sizes), -100, 1, 0.1, True, False)
        if ops_name == "emu":
            emu_stats, emu_out = stats, out
    valid = target != -100
    # (field 5, the mass below the max, is used by probability targets only; the CPU rows leave it 0)
    used = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    torch.testing.assert_close(emu_stats[:, valid][..., used], stats[:, valid][..., used], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(emu_out[0], out[0], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(emu_out[2].float(), out[2].float(), rtol=1e-2 if dtype == torch.bfloat16 else 2e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_shard_traffic_is_two_reads_one_write(on_emu, dtype):
    """shard_stats reads the shard once; shard_forward with the gradient reads it once more and writes
    its gradient once, plus the per-position values (targets, the ranks' 40-byte statistics, loss, lse)."""
    sizes, positions = [1000, 1000, 1000], 64
    x = make_logits((positions, sum(sizes)), dtype)
    target = make_index_target((positions,), sum(sizes))
    stats, shard, start = _shard_pair(x, target, sizes, 1, torch.ops.smoothce_emu)
    logits = shard.numel() * shard.element_size()
    read, write = _traffic(on_emu, lambda: torch.ops.smoothce_emu.shard_stats(shard, target, None, start, 3000, -100,
                                                                              0.1, False))
    _assert_traffic((read, write), (logits + 8 * positions, 40 * positions))
    read, write = _traffic(on_emu, lambda: torch.ops.smoothce_emu.shard_forward(shard, target, None, stats, start, 3000,
                                                                                -100, 1, 0.1, True, False))
    # targets twice (D, then the finish), the 3 ranks' statistics twice (D reads their target weights)
    _assert_traffic((read, write), (logits + 16 * positions + 2 * 3 * 40 * positions, logits + 8 * positions))
