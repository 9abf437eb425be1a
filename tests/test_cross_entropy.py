"""smoothce.cross_entropy: values and gradients against the float64 reference and F.cross_entropy.

Every comparison goes through conftest.check_all: smoothce must be within max(2 x torch's error,
a few ulps of the dtype) of the float64 truth, for the loss and for the input gradient.
"""
import pytest
import torch
import torch.nn.functional as F

import smoothce
from conftest import (BACKEND, DTYPES, REDUCTIONS, check_all, dtype_id, make_index_target, make_logits,
                      make_prob_target, make_weight, positions_shape, ref, run, run_all, run_truth,
                      assert_close_to_truth)


def _upstream(shape, seed=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 0.5).to(dtype)


# ---------------------------------------------------------------- the main grid (index targets)

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N", [0, 5])
@pytest.mark.parametrize("C", [1, 2, 10, 1000, 32771])
def test_index_targets_grid(C, N, reduction, eps, weighted, dtype):
    x = make_logits((N, C), dtype, seed=C + N)
    t = make_index_target((N,), C, ignore_every=4)  # position 0 (and 4) ignored, default -100
    w = make_weight(C, dtype) if weighted else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=w, reduction=reduction,
                                  label_smoothing=eps)
    check_all(mine, theirs, truth, dtype)


# (half types: not on the emulator, where their twice as many rows take 10 s a case and the CUDA
# kernels have no such gate)
_HALF_PAST_GATE = pytest.mark.skipif(BACKEND == "emu", reason="the CPU kernels' gate for half types")


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=_HALF_PAST_GATE) if d.itemsize == 2 else d for d in DTYPES],
                         ids=dtype_id)
@pytest.mark.parametrize("padded", [False, True], ids=["contiguous", "padded_rows"])
def test_rows_beyond_the_caches(dtype, padded):
    """Inputs of 16 MiB and more: the CPU rows kernel prefetches each next block of 2048 classes and
    each next row while it sums exps (fp32/fp64 where logits and gradient pass 16 MiB; half types where
    their logits do, one line a step of the loop that sums from the widened block, up to the next
    block's length: here 4 classes after the second block). Two full blocks and a 4-class tail per
    row, rows contiguous or with 3 elements between them (a slice), split over threads; ignored and
    weighted positions."""
    C = 4100
    N = (16 << 20) // (C * dtype.itemsize) + 8  # just past the gate (fp32/fp64: with the gradient twice that)
    x = make_logits((N, C + 3 if padded else C), dtype, seed=7)
    t = make_index_target((N,), C, ignore_every=5)
    w = make_weight(C, dtype)
    view = (lambda leaf: leaf[:, :C]) if padded else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=w, view=view,
                                  label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)
    with torch.no_grad():  # forward only
        loss = smoothce.cross_entropy(x[:, :C], t, weight=w, label_smoothing=0.1)
    assert_close_to_truth(loss, truth[0], theirs[0], dtype, "forward-only loss", magnitude=truth[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [40, 1000, 2056, 2088, 4100], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["contiguous", "padded_rows"])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_take_their_max_from_the_row_before(dtype, C, padded, threads):
    """The CPU rows kernel computes each next block's max (half types: and its fp32 copy) inside the
    exp-sum loop of the block before it, across rows too: the next row's first block in this row's
    last block. Consecutive rows here sit 100 apart (−100, 0, +100, −100, ...), so a max carried to
    the wrong row, or a stale copy, overflows exp or underflows every exp to 0. The row max moves
    between the first vector, a middle one, the last whole vector and the tail; ignored positions
    (every third, and rows 9 to 12 in a row) break the chain; 2056 and 2088 classes leave a second block of 8
    and 40 (shorter than, or not a multiple of, a vector), 4100 a third of 4; rows contiguous or a slice."""
    N = 23
    x = make_logits((N, C + 5 if padded else C), torch.float64, seed=11)
    x += 100.0 * (torch.arange(N, dtype=torch.float64) % 3 - 1).unsqueeze(1)
    for i in range(N):
        x[i, [0, C // 2, (C // 16) * 16 - 1, C - 1][i % 4]] += 12.0
    x = x.to(dtype)
    t = make_index_target((N,), C, seed=3, ignore_every=3)
    t[10:12] = -100
    view = (lambda leaf: leaf[:, :C]) if padded else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, view=view, reduction="none", label_smoothing=0.1)
        with torch.no_grad():  # forward only
            loss = smoothce.cross_entropy(x[:, :C], t, reduction="none", label_smoothing=0.1)
    finally:
        torch.set_num_threads(before)
    check_all(mine, theirs, truth, dtype)
    assert_close_to_truth(loss, truth[0], theirs[0], dtype, "forward-only loss", magnitude=truth[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scaled_upstream(dtype, reduction):
    """(loss * 3.5).backward(): grad_output != 1 must scale the gradient."""
    x = make_logits((9, 37), dtype)
    t = make_index_target((9,), 37, ignore_every=4)
    w = make_weight(37, dtype)
    up = torch.tensor(3.5)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=w, upstream=up,
                                  reduction=reduction, label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)
    # And through autograd arithmetic rather than an explicit upstream tensor.
    leaf = x.clone().requires_grad_(True)
    (smoothce.cross_entropy(leaf, t, weight=w, reduction=reduction, label_smoothing=0.1) * 3.5).backward()
    assert_close_to_truth(leaf.grad, truth[1], theirs[1], dtype, "grad of loss*3.5")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(13, 40), (40,), (2, 40, 3, 5)], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_none_reduction_random_upstream(dtype, shape, eps):
    C = 40
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), C, ignore_every=3 if len(shape) > 1 else 0)
    up = _upstream(positions_shape(shape))
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, upstream=up, reduction="none",
                                  label_smoothing=eps, weight=make_weight(C, dtype))
    check_all(mine, theirs, truth, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_zero_gives_zero_grad(reduction):
    x = make_logits((6, 11))
    t = make_index_target((6,), 11)
    loss, grad, _ = run(smoothce.cross_entropy, x, t, reduction=reduction, label_smoothing=0.1,
                        upstream=torch.zeros(() if reduction != "none" else (6,)))
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gradient_accumulates_over_two_backwards(dtype):
    """Two forward/backward pairs into one leaf: leaf.grad is the sum of both gradients."""
    C = 33
    x = make_logits((7, C), dtype)
    t1 = make_index_target((7,), C, seed=1)
    t2 = make_index_target((7,), C, seed=2)
    leaf = x.clone().requires_grad_(True)
    smoothce.cross_entropy(leaf, t1, label_smoothing=0.1).backward()
    (smoothce.cross_entropy(leaf, t2, reduction="sum") * 2.0).backward()
    x64 = x.double().requires_grad_(True)
    (ref.cross_entropy(x64, t1, label_smoothing=0.1)
     + 2.0 * ref.cross_entropy(x64, t2, reduction="sum")).backward()
    xt = x.clone().requires_grad_(True)
    F.cross_entropy(xt, t1, label_smoothing=0.1).backward()
    (F.cross_entropy(xt, t2, reduction="sum") * 2.0).backward()
    assert leaf.grad.dtype == dtype
    assert_close_to_truth(leaf.grad, x64.grad, xt.grad, dtype, "accumulated grad")


@pytest.mark.parametrize("upstream", [1.0, 3.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_with_retain_graph(upstream, reduction):
    """backward(retain_graph=True) twice on one graph: torch adds the same gradient twice.

    smoothce may instead refuse the second pass with a RuntimeError that says so; what it must
    never do is return a wrong gradient (a saved gradient scaled in place twice, or a buffer that
    the second pass overwrote)."""
    C = 21
    x = make_logits((8, C))
    t = make_index_target((8,), C, ignore_every=3)
    leaf = x.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, t, reduction=reduction, label_smoothing=0.1)
    up = torch.full(loss.shape, upstream)
    loss.backward(up, retain_graph=True)
    first = leaf.grad.clone()
    _, g64, _ = run_truth(x, t, upstream=up, reduction=reduction, label_smoothing=0.1)
    _, gt, _ = run(F.cross_entropy, x, t, upstream=up, reduction=reduction, label_smoothing=0.1)
    assert_close_to_truth(first, g64, gt, torch.float32, "first backward")
    try:
        loss.backward(up)
    except RuntimeError as error:
        assert "retain_graph" in str(error) or "second time" in str(error), str(error)
        assert torch.equal(leaf.grad, first), "a refused second backward changed leaf.grad"
    else:
        assert_close_to_truth(leaf.grad, 2 * g64, 2 * gt, torch.float32, "after second backward")


def test_loss_used_twice_in_graph():
    C = 19
    x = make_logits((5, C))
    t = make_index_target((5,), C)
    leaf = x.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, t, label_smoothing=0.3)
    (loss * 2 + loss * 3 - loss).backward()
    _, g64, _ = run_truth(x, t, upstream=torch.tensor(4.0), label_smoothing=0.3)
    assert_close_to_truth(leaf.grad, g64, None, torch.float32, "grad")


def test_no_grad_and_detached_input():
    x = make_logits((6, 30))
    t = make_index_target((6,), 30)
    with torch.no_grad():
        a = smoothce.cross_entropy(x.clone().requires_grad_(True), t, label_smoothing=0.1)
    b = smoothce.cross_entropy(x, t, label_smoothing=0.1)
    assert not a.requires_grad and not b.requires_grad
    truth = ref.cross_entropy(x.double(), t, label_smoothing=0.1)
    torch_value = F.cross_entropy(x, t, label_smoothing=0.1)
    assert_close_to_truth(a, truth, torch_value, torch.float32, "no_grad loss")
    assert_close_to_truth(b, truth, torch_value, torch.float32, "plain loss")


def test_input_not_modified():
    x = make_logits((6, 30))
    t = make_index_target((6,), 30)
    leaf = x.clone().requires_grad_(True)
    smoothce.cross_entropy(leaf, t, label_smoothing=0.1).backward()
    assert torch.equal(leaf.detach(), x), "the logits were modified by forward/backward"


# ------------------------------------------------------------------------------- ignore_index

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_positive_ignore_index(dtype, reduction, eps):
    C = 10
    x = make_logits((20, C), dtype)
    t = make_index_target((20,), C)
    t[::3] = 3  # class 3 is the ignored one; other rows may also hold 3
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=make_weight(C, dtype),
                                  ignore_index=3, reduction=reduction, label_smoothing=eps)
    check_all(mine, theirs, truth, dtype)
    assert torch.count_nonzero(mine[1][t == 3]) == 0


@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6, 9), (9,), (2, 9, 3, 4)], ids=str)
def test_all_positions_ignored(shape, eps, weighted):
    """mean: NaN with an exactly-zero gradient; sum: 0; none: zeros."""
    C = 9
    x = make_logits(shape)
    t = torch.full(positions_shape(shape), -100, dtype=torch.int64)
    w = make_weight(C) if weighted else None
    for reduction in REDUCTIONS:
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=w, reduction=reduction,
                                      label_smoothing=eps)
        check_all(mine, theirs, truth, torch.float32)
        loss, grad, _ = mine
        if reduction == "mean":
            assert loss.isnan()
        else:
            assert torch.count_nonzero(loss) == 0 and not loss.isnan().any()
        assert torch.count_nonzero(grad) == 0 and not grad.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_segmentation_ignore_255(dtype, reduction, eps):
    shape = (2, 21, 9, 11)
    x = make_logits(shape, dtype)
    t = make_index_target((2, 9, 11), 21, ignore_every=7, ignore_index=255)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, ignore_index=255,
                                  reduction=reduction, label_smoothing=eps,
                                  weight=make_weight(21, dtype))
    check_all(mine, theirs, truth, dtype)


# ------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 2), (3, 6, 7), (1, 300, 2, 2, 2), (4, 3, 0, 2)],
                         ids=str)
def test_spatial_shapes(shape, reduction, dtype):
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), shape[1], ignore_every=5)
    up = _upstream(positions_shape(shape)) if reduction == "none" else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, upstream=up, reduction=reduction,
                                  label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("C", [1, 7, 5000])
def test_unbatched(C, eps, reduction, dtype):
    x = make_logits((C,), dtype)
    t = torch.tensor(C // 2)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=make_weight(C, dtype),
                                  reduction=reduction, label_smoothing=eps)
    check_all(mine, theirs, truth, dtype)
    assert mine[0].dim() == 0


def test_unbatched_ignored_target():
    x = make_logits((7,))
    t = torch.tensor(-100)
    for reduction in REDUCTIONS:
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, reduction=reduction)
        check_all(mine, theirs, truth, torch.float32)


# ------------------------------------------------------------------------ non-contiguous input

LAYOUTS = {
    # name: (leaf shape, view from leaf to the (…, C, …) input)
    "transposed_2d": ((50, 6), lambda leaf: leaf.t()),                       # (C, N) -> (N, C)
    "class_step_slice": ((6, 100), lambda leaf: leaf[:, ::2]),                 # stride 2 over C
    "row_step_slice": ((12, 50), lambda leaf: leaf[::3]),                     # row stride 150
    "offset_slice": ((7, 53), lambda leaf: leaf[1:, 3:]),                      # storage offset
    "permuted_nhwc": ((2, 5, 7, 30), lambda leaf: leaf.permute(0, 3, 1, 2)),  # (N,H,W,C)->(N,C,H,W)
    "channels_last": ((2, 30, 5, 7), lambda leaf: leaf.to(memory_format=torch.channels_last)),
    "expanded_rows": ((1, 40), lambda leaf: leaf.expand(6, 40)),             # stride 0 over N
    "transposed_3d": ((4, 9, 3), lambda leaf: leaf.transpose(1, 2)),         # C on a strided dim
    # gaps with the classes innermost: walked in place with a gradient of the same strides (2-d and
    # 3-d views spanning at most 5/4 of their elements), else copied in the same order (problem.cpp)
    "shifted_lm": ((3, 9, 30), lambda leaf: leaf[:, :-1].movedim(-1, 1)),     # (B, T, V)[:, :-1] as (B, V, T-1)
    "vocab_padding": ((9, 1030), lambda leaf: leaf[:, :1000]),               # rows 1030 apart
    "sliced_nhwc": ((2, 7, 5, 30), lambda leaf: leaf[:, 1:].permute(0, 3, 1, 2)),
    "sliced_w": ((2, 5, 4, 9), lambda leaf: leaf[..., ::2]),                 # H, W do not collapse
    # few classes (rows gathered into tiles of one lane per row): full tiles and a partial one, rows
    # one stride apart that is not C, and channels_last rows that are one block
    "row_step_slice_small": ((60, 20), lambda leaf: leaf[::2]),              # row stride 40, C = 20
    "offset_slice_small": ((40, 13), lambda leaf: leaf[1:, 3:]),             # row stride 13, C = 10
    "vocab_padding_small": ((40, 12), lambda leaf: leaf[:, :10]),            # gradient rows 12 apart too
    "channels_last_small": ((3, 10, 5, 7), lambda leaf: leaf.to(memory_format=torch.channels_last)),
    # fewer than 8 classes with rows 8 apart, and rows of few classes at stride 0: the whole tiles'
    # register transposes read each row's partial block of classes without reading past the rows
    "offset_slice_tiny": ((40, 8), lambda leaf: leaf[1:, 3:]),               # row stride 8, C = 5
    "expanded_rows_small": ((1, 10), lambda leaf: leaf.expand(20, 10)),      # stride 0 over N, C = 10
    "expanded_rows_tiny": ((1, 3), lambda leaf: leaf.expand(20, 3)),         # stride 0 over N, C = 3
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_non_contiguous_input(layout, reduction, dtype):
    leaf_shape, view = LAYOUTS[layout]
    x = make_logits(leaf_shape, dtype)
    inp_shape = view(x).shape
    t = make_index_target(positions_shape(inp_shape), inp_shape[1], ignore_every=4)
    w = make_weight(inp_shape[1], dtype)
    up = _upstream(positions_shape(inp_shape)) if reduction == "none" else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=w, view=view, upstream=up,
                                  reduction=reduction, label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)
    # Without a gradient the kernels walk every walkable view itself.
    with torch.no_grad():
        loss = smoothce.cross_entropy(view(x), t, weight=w, reduction=reduction, label_smoothing=0.1)
    assert_close_to_truth(loss, truth[0], theirs[0], dtype, "loss without grad", magnitude=truth[3])


@pytest.mark.cpu_only  # the CPU kernels' own allocations
def test_view_with_gaps_is_not_copied():
    """A forward that writes the gradient of a view with gaps (a padded vocabulary sliced off) allocates
    that gradient, with the view's strides, and nothing else of its size: no dense copy of the logits."""
    from conftest import load_harness

    harness = load_harness()
    base = make_logits((512, 1040)).requires_grad_(True)
    t = make_index_target((512,), 1000)

    def step():
        smoothce.cross_entropy(base[:, :1000], t, label_smoothing=0.1)

    smoothce.empty_cache()
    peak = harness.cpu_peak_extra_bytes(step)
    if peak is None:
        pytest.skip("the profiler's memory events cannot be read in this torch")
    gradient = (511 * 1040 + 1000) * 4  # its storage spans the gaps between the rows
    assert gradient <= peak < 1.25 * gradient


def test_non_contiguous_target_and_weight():
    C = 12
    x = make_logits((10, C))
    t = make_index_target((10, 2), C, ignore_every=5)[:, 1]      # stride 2
    w = make_weight(2 * C)[::2]                                 # stride 2
    assert not t.is_contiguous() and not w.is_contiguous()
    for reduction in REDUCTIONS:
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=w, reduction=reduction,
                                      label_smoothing=0.1)
        check_all(mine, theirs, truth, torch.float32)
    P = make_prob_target((C, 10)).t()
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, P, weight=w, label_smoothing=0.1,
                                  target_requires_grad=True)
    check_all(mine, theirs, truth, torch.float32, check_target_grad=True)


# ------------------------------------------------------------------------ maps of many classes

MANY_CLASS_VARIANTS = {
    "plain": lambda t, P, w: dict(target=t, label_smoothing=0.1),
    "weight": lambda t, P, w: dict(target=t, weight=w, label_smoothing=0.1),
    "soft": lambda t, P, w: dict(target=P, label_smoothing=0.1),
    "soft_weight": lambda t, P, w: dict(target=P, weight=w),
    "z_loss": lambda t, P, w: dict(target=t, label_smoothing=0.1, z_loss=1e-3),
    "target_values": lambda t, P, w: dict(target=t, target_values=(0.8, 0.001)),
    "others": lambda t, P, w: dict(target=t, label_smoothing=0.2, smoothing="others"),
    "inplace": lambda t, P, w: dict(target=t, label_smoothing=0.1, inplace_backward=True),
    "inplace_soft": lambda t, P, w: dict(target=P, label_smoothing=0.1, inplace_backward=True),
}


@pytest.mark.cpu_only
@pytest.mark.parametrize("variant", list(MANY_CLASS_VARIANTS))
@pytest.mark.parametrize("shape", [(2, 2100, 37), (1, 8200, 21)], ids=str)
def test_many_class_maps_match_rows(shape, variant):
    """(N, C, L) fp32 maps of thousands of classes (a vocabulary over a sequence) are computed as rows in
    AVX-512 builds: 16 positions at a time are transposed into rows, computed by the rows kernel and
    their gradient transposed back (with a gradient from 2048 classes, without one from 8192). Every
    position of such a tile must give bitwise the gradient (and the loss, where that comes from a pass
    of the same kind) that the same logits laid out as rows give; the last L mod 16 positions of each
    n (computed in place) agree within fp32 rounding, and so does every position elsewhere (AVX2 and
    default builds) and the forward without a gradient.
    Confident positions (one logit 30 above the others) check the gradient at a sole max."""
    N, C, L = shape
    gen = torch.Generator().manual_seed(C + L)
    x = torch.randn(N, C, L, generator=gen) * 2
    x[:, 7, ::5] = 30.0
    t = torch.randint(0, C, (N, L), generator=gen)
    t[:, ::6] = -100
    t[:, ::5] = 7
    P = torch.softmax(torch.randn(N, C, L, generator=gen), 1)
    P[:, :, ::5] = 0
    P[:, 7, ::5] = 1
    w = torch.rand(C, generator=gen) + 0.5
    kwargs = MANY_CLASS_VARIANTS[variant](t, P, w)
    as_rows = lambda v: v.transpose(1, 2).reshape(N * L, C).contiguous()  # noqa: E731 (a copy, never a view)
    full = torch.zeros(N, L, dtype=torch.bool)
    full[:, : L // 16 * 16] = True
    for reduction in ("none", "mean"):
        results = []
        for layout in ("map", "rows"):
            leaf = x.clone().requires_grad_()
            inp = leaf * 1 if kwargs.get("inplace_backward") else leaf
            k = dict(kwargs, reduction=reduction)
            tgt = k.pop("target")
            if layout == "rows":
                inp, tgt = as_rows(inp), (as_rows(tgt) if tgt.dim() == 3 else tgt.reshape(-1))
            loss = smoothce.cross_entropy(inp, tgt, **k)
            up = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if reduction == "none" else None
            loss.backward(up)
            results.append((loss.detach().reshape(N, L) if reduction == "none" else loss.detach(), leaf.grad))
        (loss_m, g_m), (loss_r, g_r) = results
        g_m, g_r = as_rows(g_m).reshape(N, L, C), as_rows(g_r).reshape(N, L, C)
        torch.testing.assert_close(loss_m, loss_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_m, g_r, rtol=2e-5, atol=2e-8)
        if smoothce.build_info()["cpu_capability"] == "avx512":
            # reduction "none": the losses come from a forward without a gradient (that comes in
            # backward), computed as rows from 8192 classes
            if reduction == "none" and C >= 8192:
                assert torch.equal(loss_m[full], loss_r[full]), variant
            assert torch.equal(g_m[full], g_r[full]), variant
        if not kwargs.get("inplace_backward"):
            with torch.no_grad():
                k = dict(kwargs, reduction=reduction)
                loss_f = smoothce.cross_entropy(x, k.pop("target"), **k)
            torch.testing.assert_close(loss_f.reshape(loss_m.shape), loss_m, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ probability targets

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 10), (10,), (2, 10, 3, 4), (4, 2000), (0, 10)], ids=str)
def test_probability_targets(shape, reduction, eps, weighted, dtype):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype)
    P = make_prob_target(shape, dtype)
    w = make_weight(C, dtype) if weighted else None
    up = _upstream(positions_shape(shape)) if reduction == "none" else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, P, weight=w, upstream=up,
                                  reduction=reduction, label_smoothing=eps,
                                  target_requires_grad=True)
    check_all(mine, theirs, truth, dtype, check_target_grad=True)


def test_probability_targets_not_normalised():
    """P need not sum to 1 (docs/semantics.md §2.3)."""
    x = make_logits((5, 8))
    P = torch.rand(5, 8, generator=torch.Generator().manual_seed(4)) * 3
    for reduction in REDUCTIONS:
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, P, weight=make_weight(8),
                                      reduction=reduction, label_smoothing=0.2,
                                      target_requires_grad=True)
        check_all(mine, theirs, truth, torch.float32, check_target_grad=True)


def test_probability_targets_without_target_grad():
    x = make_logits((5, 8))
    P = make_prob_target((5, 8))
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, P, label_smoothing=0.2)
    check_all(mine, theirs, truth, torch.float32)
    assert P.grad is None


def test_probability_target_only_requires_grad():
    """Only the teacher distribution is trained: gradient flows to the target alone."""
    x = make_logits((5, 8))
    P = make_prob_target((5, 8)).requires_grad_(True)
    smoothce.cross_entropy(x, P, label_smoothing=0.2).backward()
    P64 = P.detach().double().requires_grad_(True)
    ref.cross_entropy(x.double(), P64, label_smoothing=0.2).backward()
    assert_close_to_truth(P.grad, P64.grad, None, torch.float32, "target grad")


# ------------------------------------------------------------------------------ uint8 targets

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_uint8_targets(reduction, eps):
    """uint8 class indices (segmentation masks). torch accepts them for (N, C) only (nll_loss2d
    wants int64), so the spatial case is compared with torch on the same targets as int64."""
    C = 21
    x = make_logits((3, C, 4, 5))
    t = make_index_target((3, 4, 5), C, ignore_every=6, ignore_index=255).to(torch.uint8)
    kwargs = dict(ignore_index=255, reduction=reduction, label_smoothing=eps)
    mine = run(smoothce.cross_entropy, x, t, **kwargs)
    theirs = run(F.cross_entropy, x, t.long(), **kwargs)
    truth = run_truth(x, t.long(), **kwargs)
    check_all(mine, theirs, truth, torch.float32)
    # Same as int64 targets through smoothce.
    loss64, grad64, _ = run(smoothce.cross_entropy, x, t.long(), **kwargs)
    torch.testing.assert_close(mine[0], loss64, rtol=0, atol=0)
    torch.testing.assert_close(mine[1], grad64, rtol=0, atol=0)
    # (N, C): torch takes uint8 directly; -100 (the default ignore_index) never matches a uint8.
    x2 = make_logits((30, C))
    t2 = make_index_target((30,), C).to(torch.uint8)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x2, t2, reduction=reduction,
                                  label_smoothing=eps)
    check_all(mine, theirs, truth, torch.float32)


# ------------------------------------------------------------------ index targets in any layout

TARGET_LAYOUTS = {  # (logits' shape, the target's full tensor's shape, a view of it shaped like the positions)
    "sliced": ((40, 13), (80,), lambda t: t[::2]),  # one stride, 2
    "offset-slice": ((40, 13), (130,), lambda t: t[7:127:3]),
    "expanded": ((40, 13), (2,), lambda t: t[1:].expand(40)),  # stride 0 (full[0] is an ignored one)
    "spatial-sliced": ((3, 13, 4, 5), (3, 8, 5), lambda t: t[:, ::2]),  # not one stride: the cursor walk
    "spatial-transposed": ((3, 13, 4, 5), (3, 5, 4), lambda t: t.transpose(1, 2)),
    "spatial-one-stride": ((3, 13, 4, 5), (3, 4, 5, 2), lambda t: t[..., 0]),  # one stride, 2
    # channels_last logits (classes contiguous: the small-rows tiles), 60 positions (a partial last tile)
    "channels-last-spatial-sliced": ((3, 13, 4, 5), (3, 8, 5), lambda t: t[:, ::2]),
    "channels-last-one-stride": ((3, 13, 4, 5), (3, 4, 5, 2), lambda t: t[..., 0]),
}


@pytest.mark.parametrize("layout", list(TARGET_LAYOUTS))
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8], ids=["int64", "uint8"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_index_targets_in_any_layout(layout, target_dtype, weighted, reduction):
    """Non-contiguous index targets (slices, stride 0, transposed masks), int64 and uint8, with ignored
    positions: the loss (the mean's denominator counts or weighs the valid targets read through the
    target's own strides) and gradient equal those of a contiguous copy of the targets, and a bad value
    seen through the view is an IndexError naming it."""
    shape, full_shape, view = TARGET_LAYOUTS[layout]
    C = shape[1]
    x = make_logits(shape)
    if layout.startswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    full = make_index_target(full_shape, C, seed=5, ignore_every=7, ignore_index=255).to(target_dtype)
    t = view(full)
    assert not t.is_contiguous() or layout == "expanded"
    kwargs = dict(ignore_index=255, reduction=reduction, label_smoothing=0.1,
                  weight=make_weight(C) if weighted else None)
    mine = run(smoothce.cross_entropy, x, t, **kwargs)
    copy = run(smoothce.cross_entropy, x, t.contiguous(), **kwargs)
    torch.testing.assert_close(mine[0], copy[0], rtol=0, atol=0)
    torch.testing.assert_close(mine[1], copy[1], rtol=0, atol=0)
    check_all(mine, run(F.cross_entropy, x, t.long(), **kwargs), run_truth(x, t.long(), **kwargs), torch.float32)
    bad = full.clone()
    seen = view(bad)
    seen[tuple(size - 1 for size in seen.shape)] = C  # the view's last position
    with pytest.raises(IndexError, match=f"target value {C} is out of bounds"):
        smoothce.cross_entropy(x, seen, **kwargs)


# ------------------------------------------------- vector tails, many positions (parallel chunks)

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", list(range(1, 18)) + [31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257])
def test_class_counts_around_vector_widths(C, dtype):
    """Row kernels: every remainder of C modulo the vector width (and double-vector unrolls); up to 32
    classes, the tiles of rows: whole tiles of 8 and 16 lanes (the register transposes' blocks of 8
    and 16 classes, and their partial last block) and a partial tile."""
    N = 37
    x = make_logits((N, C), dtype, seed=C)
    t = make_index_target((N,), C, ignore_every=3)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=make_weight(C, dtype),
                                  upstream=_upstream((N,)), reduction="none", label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("inner", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 65])
def test_spatial_sizes_around_vector_widths(inner, dtype):
    """Across-positions kernels ((N, C, d) with classes strided): every remainder of d, also of the
    half types' groups of tiles (a 64-byte line of each class: 32 positions)."""
    x = make_logits((3, 6, inner), dtype, seed=inner)
    t = make_index_target((3, inner), 6, ignore_every=4)
    for soft in (False, True):
        target = make_prob_target((3, 6, inner), dtype) if soft else t
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, weight=make_weight(6, dtype),
                                      upstream=_upstream((3, inner)), reduction="none",
                                      label_smoothing=0.1, target_requires_grad=soft)
        check_all(mine, theirs, truth, dtype, check_target_grad=soft)


# (fp16 without 'sum': a sum of 10^4–10^5 losses exceeds its largest value, 65504: inf, as in torch)
@pytest.mark.parametrize("reduction,dtype", [(r, d) for d in (torch.float32, torch.float16, torch.bfloat16)
                                             for r in REDUCTIONS if (r, d) != ("sum", torch.float16)],
                         ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else v)
@pytest.mark.parametrize("shape", [(70000, 3), (4097, 37), (8, 21, 64, 64), (3, 5000, 7), (3, 5, 1000, 7)], ids=str)
def test_many_positions(shape, reduction, dtype):
    """Enough positions to be split across threads / parallel chunks: reductions must combine.
    (3, 5, 1000, 7): the chunks of tiles split the half types' groups of tiles and the maps. (70000, 3):
    AVX2 builds write fp32 and fp16 tiles of rows in place, spilling into the next tile's first row
    only where the same task writes it next."""
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), shape[1], ignore_every=11)
    up = _upstream(positions_shape(shape)) if reduction == "none" else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=make_weight(shape[1], dtype),
                                  upstream=up, reduction=reduction, label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)


# Maps whose class planes are a multiple of 4 KiB apart put a tile's lines of all classes in one L1
# set: there fp32 tiles read in place take each lane's target logit as its class goes by instead of
# gathering it (across_kernel's capture_target, AVX-512 builds). (2, 9, 1000) is a slice of
# (2, 9, 1024): class stride 1024, a last tile of 8 positions.
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,view", [pytest.param((2, 9, 32, 32), None, id="2x9x32x32"),
                                        pytest.param((1, 32, 64, 64), None, id="1x32x64x64"),
                                        pytest.param((2, 9, 1024), lambda t: t[..., :1000], id="2x9x1024[:1000]")])
def test_maps_of_lines_in_one_set(shape, view, reduction, weighted):
    x = make_logits(shape)
    positions = positions_shape(shape)
    if view is not None:
        positions = positions[:-1] + (1000,)
    t = make_index_target(positions, shape[1], ignore_every=7)
    up = _upstream(positions) if reduction == "none" else None
    weight = make_weight(shape[1]) if weighted else None
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, t, weight=weight, upstream=up, view=view,
                                  reduction=reduction, label_smoothing=0.1)
    check_all(mine, theirs, truth, torch.float32)


def test_deterministic():
    x = make_logits((4097, 37))
    t = make_index_target((4097,), 37, ignore_every=11)
    first = run(smoothce.cross_entropy, x, t, label_smoothing=0.1)
    for _ in range(3):
        again = run(smoothce.cross_entropy, x, t, label_smoothing=0.1)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
