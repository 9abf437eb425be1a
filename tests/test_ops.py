"""The raw ops torch.ops.smoothce.forward / scale_grad_: values and torch.library.opcheck (on the
emulated CUDA kernels, torch.ops.smoothce_emu, under SMOOTHCE_TEST_BACKEND=emu)."""
import pytest
import torch

import smoothce  # noqa: F401  (loads the ops)
from conftest import (DTYPES, REDUCTION_CODE, REDUCTIONS, assert_close_to_truth, dtype_id,
                      make_index_target, make_logits, make_prob_target, make_weight,
                      positions_shape, ref)


@pytest.fixture
def ops(backend):
    """The ops smoothce calls on this backend (after the backend fixture has chosen them)."""
    from smoothce import _function

    return _function._ops


def _truth(x, target, weight, ignore_index, reduction, eps):
    """float64 loss, lse and gradient (upstream 1, or all ones for 'none')."""
    x64 = x.detach().double().requires_grad_(True)
    t64 = target.double() if target.is_floating_point() else target
    w64 = weight.double() if weight is not None else None
    loss = ref.cross_entropy(x64, t64, w64, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=eps)
    loss.backward(torch.ones_like(loss))
    lse = torch.logsumexp(x64.detach(), dim=0 if x.dim() == 1 else 1)
    return loss.detach(), lse, x64.grad


OP_CASES = {
    # name: (input shape, soft target?, weighted?, ignore_index)
    "2d": ((6, 11), False, False, -100),
    "2d_weight": ((6, 11), False, True, -100),
    "2d_ignore_pos": ((6, 11), False, True, 2),
    "unbatched": ((11,), False, True, -100),
    "nchw": ((2, 11, 3, 4), False, True, 255),
    "soft": ((6, 11), True, False, -100),
    "soft_weight_nchw": ((2, 11, 3, 2), True, True, -100),
    "empty": ((0, 11), False, False, -100),
}


def _make(case, dtype=torch.float32, seed=0):
    shape, soft, weighted, ignore_index = OP_CASES[case]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype, seed=seed)
    if soft:
        target = make_prob_target(shape, dtype)
    else:
        # (An unbatched target has one position: keep it valid.)
        target = make_index_target(positions_shape(shape), C, ignore_every=3 if len(shape) > 1 else 0,
                                   ignore_index=ignore_index)
        if ignore_index >= 0 and target.numel():
            target.view(-1)[1] = ignore_index
    weight = make_weight(C, dtype) if weighted else None
    return x, target, weight, ignore_index


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_forward_op_values(ops, case, reduction, dtype):
    x, target, weight, ignore_index = _make(case, dtype)
    eps = 0.1
    loss, lse, grad = ops.forward(x, target, weight, ignore_index,
                                                 REDUCTION_CODE[reduction], eps, True, False)
    t_loss, t_lse, t_grad = _truth(x, target, weight, ignore_index, reduction, eps)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == dtype and grad.dtype == dtype and lse.dtype == acc
    assert lse.shape == positions_shape(x.shape)
    assert grad.shape == x.shape
    assert_close_to_truth(loss, t_loss, None, dtype, "loss")
    # lse is returned in fp32 (fp64): judge it by that precision, not the input's. Ignored
    # positions are checked in test_forward_op_lse_at_ignored_positions.
    valid = (target != ignore_index) if not target.is_floating_point() else torch.ones_like(lse, dtype=torch.bool)
    assert_close_to_truth(lse[valid], t_lse[valid], None, acc, "lse")
    assert_close_to_truth(grad, t_grad, None, dtype, "grad")

    loss2, lse2, grad2 = ops.forward(x, target, weight, ignore_index,
                                                    REDUCTION_CODE[reduction], eps, False, False)
    assert grad2.numel() == 0, "compute_grad=False must return an empty gradient"
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["2d", "nchw", "unbatched"])
def test_forward_op_lse_at_ignored_positions(ops, case):
    """The op's contract: lse is the log-sum-exp of every valid position and exactly 0 at ignored
    ones (their logits are never read)."""
    x, target, weight, ignore_index = _make(case)
    if case == "unbatched":
        target = torch.tensor(ignore_index)
    ignored = target == ignore_index
    assert ignored.any()
    _, lse, _ = ops.forward(x, target, weight, ignore_index, 1, 0.1, True, False)
    _, t_lse, _ = _truth(x, target, weight, ignore_index, "sum", 0.1)
    assert torch.equal(lse[ignored], torch.zeros_like(lse[ignored]))
    assert_close_to_truth(lse[~ignored], t_lse[~ignored], None, torch.float32, "lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_op_float32_loss(ops, dtype, reduction):
    """float32_loss=True (autocast): the loss comes back in fp32 at fp32 accuracy."""
    x, target, weight, ignore_index = _make("nchw", dtype)
    loss, lse, grad = ops.forward(x, target, weight, ignore_index,
                                                 REDUCTION_CODE[reduction], 0.1, True, True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    t_loss, _, t_grad = _truth(x, target, weight, ignore_index, reduction, 0.1)
    assert_close_to_truth(loss, t_loss, None, torch.float32, "fp32 loss")
    assert_close_to_truth(grad, t_grad, None, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["2d_weight", "nchw", "soft_weight_nchw", "unbatched"])
def test_forward_op_grad_output(ops, case, reduction, dtype):
    """grad_output scales the gradient inside the kernel: the gradient of sum(grad_output * loss)."""
    x, target, weight, ignore_index = _make(case, dtype)
    positions = positions_shape(x.shape)
    per_position = reduction == "none" and len(positions) > 0
    go = make_logits(positions, dtype, seed=8) if per_position else torch.tensor(-1.75, dtype=dtype)
    _, _, grad = ops.forward(x, target, weight, ignore_index, REDUCTION_CODE[reduction], 0.1,
                                            True, False, go)
    x64 = x.detach().double().requires_grad_(True)
    t64 = target.double() if target.is_floating_point() else target
    loss64 = ref.cross_entropy(x64, t64, weight.double() if weight is not None else None,
                               ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1)
    loss64.backward(go.double().expand_as(loss64))
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close_to_truth(grad, x64.grad, None, dtype, "grad")


@pytest.mark.parametrize("bad", ["without_compute_grad", "per_position_with_mean", "wrong_shape", "integer"])
def test_forward_op_grad_output_errors(ops, bad):
    x, target, weight, ignore_index = _make("2d")
    go = {"without_compute_grad": torch.tensor(2.0), "per_position_with_mean": torch.ones(6),
          "wrong_shape": torch.ones(5), "integer": torch.tensor(2)}[bad]
    reduction = 1 if bad == "per_position_with_mean" else 0
    with pytest.raises((ValueError, TypeError), match="grad_output"):
        ops.forward(x, target, weight, ignore_index, reduction, 0.1,
                                   bad != "without_compute_grad", False, go)


# ----------------------------------------------------------------------------- scale_grad_

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 7, 3, 4), (2, 7, 3)], ids=str)
@pytest.mark.parametrize("kind", ["scalar", "scalar_one", "per_position"])
def test_scale_grad_values(ops, shape, kind, dtype):
    grad = make_logits(shape, dtype)
    before = grad.clone()
    pos = positions_shape(shape)
    if kind == "scalar":
        go = torch.tensor(-2.75, dtype=dtype)
    elif kind == "scalar_one":
        go = torch.tensor(1.0, dtype=dtype)
    else:
        go = make_logits(pos, dtype, seed=9)
    out = ops.scale_grad_(grad, go)
    assert out is None
    class_dim = 0 if len(shape) == 1 else 1
    expected = before.double() * (go.double() if go.dim() == 0 else go.double().unsqueeze(class_dim))
    # One rounding of the product in the grad dtype (or exact, for the scalar 1).
    torch.testing.assert_close(grad.double(), expected.to(dtype).double(),
                               rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_scale_grad_fp32_grad_output_on_half_grad(ops, grad_dtype):
    """Under autocast the loss (so grad_output) is fp32 while the gradient is half."""
    grad = make_logits((2, 7, 3), grad_dtype)
    before = grad.clone()
    for go in (torch.tensor(0.37), make_logits((2, 3), seed=5)):
        g = before.clone()
        ops.scale_grad_(g, go)
        factor = go.double() if go.dim() == 0 else go.double().unsqueeze(1)
        torch.testing.assert_close(g.double(), (before.double() * factor).to(grad_dtype).double(),
                                   rtol=torch.finfo(grad_dtype).eps, atol=0)


def test_scale_grad_non_contiguous_grad(ops):
    base = make_logits((7, 5))
    grad = base.t()  # (5, 7) with strided classes
    before = grad.clone()
    go = make_logits((5,), seed=3)
    ops.scale_grad_(grad, go)
    torch.testing.assert_close(grad, before * go[:, None], rtol=1e-6, atol=0)


# -------------------------------------------------------------------------------- opcheck

def _forward_arg_sets():
    sets = []
    for case in ("2d", "2d_weight", "unbatched", "nchw", "soft", "soft_weight_nchw", "empty"):
        for reduction in REDUCTIONS:
            if case == "empty" and reduction == "mean":
                continue  # the loss is NaN, and opcheck compares outputs with equal_nan=False
            for compute_grad in (True, False):
                x, target, weight, ignore_index = _make(case)
                sets.append(pytest.param(
                    (x, target, weight, ignore_index, REDUCTION_CODE[reduction], 0.1, compute_grad,
                     False),
                    id=f"{case}-{reduction}-grad{int(compute_grad)}"))
    x, target, weight, ignore_index = _make("nchw", torch.bfloat16)
    sets.append(pytest.param((x, target, weight, ignore_index, 1, 0.1, True, True),
                             id="bf16-float32_loss"))
    x, target, weight, ignore_index = _make("2d_weight", torch.float64)
    sets.append(pytest.param((x, target, weight, ignore_index, 2, 0.0, True, False), id="fp64-sum"))
    for case in ("2d_weight", "nchw", "soft"):  # an upstream gradient scaled inside the kernel
        x, target, weight, ignore_index = _make(case)
        go = make_logits(positions_shape(x.shape), seed=6)
        sets.append(pytest.param((x, target, weight, ignore_index, 0, 0.1, True, False, go),
                                 id=f"{case}-none-grad_output"))
        sets.append(pytest.param((x, target, weight, ignore_index, 1, 0.1, True, False, torch.tensor(0.5)),
                                 id=f"{case}-mean-grad_output"))
    return sets


@pytest.mark.parametrize("args", _forward_arg_sets())
def test_opcheck_forward(ops, args):
    torch.library.opcheck(ops.forward.default, args)


@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 7, 3, 4)], ids=str)
@pytest.mark.parametrize("kind", ["scalar", "scalar_one", "per_position"])
def test_opcheck_scale_grad(ops, shape, kind):
    grad = make_logits(shape)
    if kind == "per_position":
        go = make_logits(positions_shape(shape), seed=4)
    else:
        go = torch.tensor(2.5 if kind == "scalar" else 1.0)
    torch.library.opcheck(ops.scale_grad_.default, (grad, go))


# ------------------------------------------------------ views with gaps: the gradient's layout

GAP_VIEWS = {
    # name: (base shape, view of the base as the input, whether the gradient takes the view's strides)
    "vocab_padding": ((9, 1030), lambda b: b[:, :1000], True),                  # rows 1030 apart
    "vocab_padding_small": ((40, 12), lambda b: b[:, :10], True),               # few classes, rows 12 apart
    "shifted_lm": ((3, 9, 30), lambda b: b[:, :-1].movedim(-1, 1), True),       # (B, T, V)[:, :-1] as (B, V, T-1)
    "offset_window": ((7, 53), lambda b: b[1:, 3:], True),                      # storage offset 56
    "misaligned_window": ((9, 1030), lambda b: b[:, 1:1001], True),             # 4 bytes off the gradient
    "dense": ((6, 11), lambda b: b, True),
    "wide_gaps": ((12, 50), lambda b: b[::3], False),                           # spans 2.5x its elements
    "small_wide_gaps": ((40, 13), lambda b: b[1:, 3:], False),                  # spans 1.29x
    "sliced_map": ((2, 7, 5, 30), lambda b: b[:, 1:].permute(0, 3, 1, 2), False),  # 4-d
    "class_step": ((6, 22), lambda b: b[:, ::2], False),                        # classes not contiguous
}


def _gap_case(name, dtype=torch.float32, soft=False):
    base_shape, view, kept = GAP_VIEWS[name]
    x = view(make_logits(base_shape, dtype, seed=3))
    C = x.shape[1]
    # (a soft target with other strides is copied into the input's layout, gaps and all)
    target = (make_prob_target(x.shape, dtype) if soft
              else make_index_target(positions_shape(x.shape), C, ignore_every=3))
    return x, target, make_weight(C, dtype), kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", sorted(GAP_VIEWS))
def test_forward_grad_layout_of_views(ops, name, reduction, soft, dtype):
    """A view with gaps whose classes are contiguous (2-d or 3-d, spanning at most 5/4 of its elements)
    gets a gradient with its own strides, written by the kernels without a copy of the logits; other
    layouts get torch.empty_like's. The values are those of the view's contiguous copy."""
    x, target, weight, kept = _gap_case(name, dtype, soft)
    go = make_logits(positions_shape(x.shape), seed=8) if reduction == "none" else torch.tensor(1.5)
    args = (target, weight, -100, REDUCTION_CODE[reduction], 0.1, True, False, go)
    loss, lse, grad = ops.forward(x, *args)
    expected = ops.forward(x.contiguous(), *args)
    assert grad.stride() == (x.stride() if kept else torch.empty_like(x).stride())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3))
    for mine, theirs in zip((loss, lse, grad), expected):
        torch.testing.assert_close(mine, theirs, **tol)


@pytest.mark.parametrize("case", [f"{name}-{kind}" for name in sorted(GAP_VIEWS) for kind in ("mean", "none", "soft")])
def test_opcheck_forward_views(ops, case):
    """The fake kernel lays the gradient out as the kernels do (opcheck compares the strides)."""
    name, kind = case.rsplit("-", 1)
    x, target, weight, _ = _gap_case(name, soft=kind == "soft")
    go = make_logits(positions_shape(x.shape), seed=8) if kind == "none" else None
    torch.library.opcheck(ops.forward.default,
                          (x, target, weight, -100, REDUCTION_CODE["none" if kind == "none" else "mean"], 0.1, True,
                           False, go))


# ---------------------------------------------- the docs/semantics.md §3 extension arguments, grad_

EXT_KINDS = ["plain", "target_values", "z_loss", "mixup_lam", "mixup_lam_expanded", "mixup_lam_value", "all"]


def _ext(kind, x, target):
    """(label_smoothing, keyword arguments) of the forward / grad_ ops for one extension kind."""
    positions = positions_shape(x.shape)
    g = torch.Generator().manual_seed(13)
    if kind == "plain":
        return 0.1, {}
    if kind == "target_values":
        return 0.0, dict(target_values=[0.8, 0.02])
    if kind == "z_loss":
        return 0.1, dict(z_loss=0.05)
    target_b = target.flip(0) if target.dim() else target.clone()
    if kind == "mixup_lam":
        return 0.1, dict(target_b=target_b, lam=torch.rand(positions, generator=g))
    if kind == "mixup_lam_expanded":  # one value per sample, broadcast as smoothce passes it (stride 0)
        lead = positions[:1]
        lam = torch.rand(lead, generator=g).reshape(lead + (1,) * (len(positions) - 1))
        return 0.1, dict(target_b=target_b, lam=lam.expand(positions))
    if kind == "mixup_lam_value":
        return 0.1, dict(target_b=target_b, lam_value=0.3)
    assert kind == "all"
    return 0.0, dict(target_values=[0.9, 0.01], z_loss=0.02, target_b=target_b,
                     lam=torch.rand(positions, generator=g))


def _ext_truth(x, target, weight, ignore_index, reduction, eps, kwargs, grad_output=None):
    """float64 loss and gradient of the op's arguments (grad_output: None = ones)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.double() if weight is not None else None
    kwargs = dict(kwargs)
    if kwargs.get("lam") is not None:
        kwargs["lam"] = kwargs["lam"].double()
    loss = ref.loss_with_options(x64, target, w64, ignore_index, reduction, eps, **kwargs).double()
    up = torch.ones_like(loss) if grad_output is None else grad_output.double().expand_as(loss)
    loss.backward(up)
    return loss.detach(), x64.grad


def _index_cases():
    return ["2d_weight", "2d_ignore_pos", "unbatched", "nchw", "empty"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", EXT_KINDS)
@pytest.mark.parametrize("case", ["2d_ignore_pos", "unbatched", "nchw"])
def test_forward_op_extension_values(ops, case, kind, reduction, dtype):
    """forward with the docs/semantics.md §3 arguments against the float64 reference (loss and gradient
    for grad_output)."""
    x, target, weight, ignore_index = _make(case, dtype)
    eps, kwargs = _ext(kind, x, target)
    positions = positions_shape(x.shape)
    go = (make_logits(positions, dtype, seed=8) if reduction == "none" and positions
          else torch.tensor(-1.75, dtype=dtype))
    loss, _, grad = ops.forward(x, target, weight, ignore_index, REDUCTION_CODE[reduction], eps, True, False, go,
                                **kwargs)
    t_loss, t_grad = _ext_truth(x, target, weight, ignore_index, reduction, eps, kwargs, go)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    assert_close_to_truth(loss, t_loss, None, dtype, "loss")
    assert_close_to_truth(grad, t_grad, None, dtype, "grad")


GRAD_VALUE_CASES = [(case, kind) for case in ("2d_weight", "unbatched", "nchw", "empty") for kind in EXT_KINDS] + [
    ("soft_weight_nchw", "plain"), ("soft_weight_nchw", "z_loss"), ("soft", "plain")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case,kind", GRAD_VALUE_CASES, ids=[f"{c}-{k}" for c, k in GRAD_VALUE_CASES])
def test_grad_op_values(ops, case, kind, reduction, dtype):
    """grad_ writes, over its input, forward(compute_grad=True, grad_output)'s gradient; it returns
    nothing and leaves every other argument alone."""
    x, target, weight, ignore_index = _make(case, dtype)
    eps, kwargs = _ext(kind, x, target)
    positions = positions_shape(x.shape)
    go = (make_logits(positions, dtype, seed=8) if reduction == "none" and positions
          else torch.tensor(0.625, dtype=dtype))
    _, _, expected = ops.forward(x, target, weight, ignore_index, REDUCTION_CODE[reduction], eps, True, False, go,
                                 **kwargs)
    snapshot = [t.clone() for t in (target, go) + tuple(v for v in (weight, kwargs.get("target_b"),
                                                                    kwargs.get("lam")) if v is not None)]
    inp = x.clone()
    assert ops.grad_(inp, target, weight, ignore_index, REDUCTION_CODE[reduction], eps, False, go, **kwargs) is None
    after = [t for t in (target, go) + tuple(v for v in (weight, kwargs.get("target_b"), kwargs.get("lam"))
                                             if v is not None)]
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot)), "grad_ modified an argument other than input"
    eps_dtype = torch.finfo(dtype).eps
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(inp, expected, rtol=2 * eps_dtype, atol=2 * eps_dtype * scale)
    if dtype != torch.bfloat16 and not target.is_floating_point():
        _, t_grad = _ext_truth(x, target, weight, ignore_index, reduction, eps, kwargs, go)
        assert_close_to_truth(inp, t_grad, None, dtype, "grad_")


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "row_window", "strided_rows"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_op_non_contiguous_input(ops, layout, reduction):
    """grad_ writes the gradient into the input's own strides; memory outside the view is untouched."""
    C = 11
    if layout == "transposed":
        base = make_logits((C, 6))
        view = base.t()
    elif layout == "channels_last":
        base = make_logits((2, C, 3, 4)).contiguous(memory_format=torch.channels_last)
        view = base
    elif layout == "row_window":
        base = make_logits((6, C + 4))
        view = base[:, 2:C + 2]
    else:
        base = make_logits((12, C))
        view = base[1::2]
    target = make_index_target(positions_shape(view.shape), C, ignore_every=3)
    weight = make_weight(C)
    eps, kwargs = _ext("all", view, target)
    positions = positions_shape(view.shape)
    go = make_logits(positions, seed=8) if reduction == "none" else torch.tensor(2.5)
    _, _, expected = ops.forward(view.contiguous(), target, weight, -100, REDUCTION_CODE[reduction], eps, True,
                                 False, go, **kwargs)
    before = base.clone()
    ops.grad_(view, target, weight, -100, REDUCTION_CODE[reduction], eps, False, go, **kwargs)
    torch.testing.assert_close(view, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    outside = torch.ones_like(base, dtype=torch.bool)
    if layout == "transposed" or layout == "channels_last":
        outside.zero_()
    elif layout == "row_window":
        outside[:, 2:C + 2] = False
    else:
        outside[1::2] = False
    assert torch.equal(base[outside], before[outside]), "grad_ wrote outside its input"


def test_grad_op_refuses_expanded_input(ops):
    x = make_logits((1, 7)).expand(5, 7)
    target = make_index_target((5,), 7)
    with pytest.raises((RuntimeError, ValueError), match="share memory"):
        ops.grad_(x, target, None, -100, 1, 0.1, False, torch.tensor(1.0))


@pytest.mark.parametrize("bad", ["per_position_with_mean", "wrong_shape", "integer"])
def test_grad_op_grad_output_errors(ops, bad):
    x, target, weight, ignore_index = _make("2d")
    go = {"per_position_with_mean": torch.ones(6), "wrong_shape": torch.ones(5), "integer": torch.tensor(2)}[bad]
    reduction = 1 if bad == "per_position_with_mean" else 0
    inp = x.clone()
    with pytest.raises((ValueError, TypeError), match="grad_output"):
        ops.grad_(inp, target, weight, ignore_index, reduction, 0.1, False, go)
    assert torch.equal(inp, x), "a refused grad_ must not write"


def test_grad_op_scalar_grad_output_for_none(ops):
    """A scalar upstream gradient for reduction 'none' scales every position alike."""
    x, target, weight, ignore_index = _make("2d_weight")
    inp = x.clone()
    ops.grad_(inp, target, weight, ignore_index, 0, 0.1, False, torch.tensor(1.5))
    _, _, expected = ops.forward(x, target, weight, ignore_index, 0, 0.1, True, False, torch.full((6,), 1.5))
    torch.testing.assert_close(inp, expected, rtol=1e-6, atol=1e-7)


def _extension_forward_arg_sets():
    sets = []
    for case in ("2d_weight", "unbatched", "nchw", "empty"):
        for kind in EXT_KINDS[1:]:
            for reduction in REDUCTIONS:
                if case == "empty" and reduction == "mean":
                    continue  # NaN loss (opcheck compares with equal_nan=False)
                x, target, weight, ignore_index = _make(case)
                eps, kwargs = _ext(kind, x, target)
                compute_grad = reduction != "sum"
                sets.append(pytest.param((x, target, weight, ignore_index, REDUCTION_CODE[reduction], eps,
                                          compute_grad, False), kwargs,
                                         id=f"{case}-{kind}-{reduction}-grad{int(compute_grad)}"))
    # z_loss with probability targets; the options with an upstream gradient; bf16 with an fp32 loss.
    x, target, weight, ignore_index = _make("soft_weight_nchw")
    sets.append(pytest.param((x, target, weight, ignore_index, 1, 0.1, True, False), dict(z_loss=0.1),
                             id="soft-z_loss"))
    for kind in ("all", "mixup_lam_value"):
        x, target, weight, ignore_index = _make("nchw")
        eps, kwargs = _ext(kind, x, target)
        go = make_logits(positions_shape(x.shape), seed=6)
        sets.append(pytest.param((x, target, weight, ignore_index, 0, eps, True, False, go), kwargs,
                                 id=f"nchw-{kind}-none-grad_output"))
        sets.append(pytest.param((x, target, weight, ignore_index, 2, eps, True, False, torch.tensor(-0.5)), kwargs,
                                 id=f"nchw-{kind}-sum-grad_output"))
    x, target, weight, ignore_index = _make("nchw", torch.bfloat16)
    eps, kwargs = _ext("all", x, target)
    sets.append(pytest.param((x, target, weight, ignore_index, 1, eps, True, True), kwargs, id="bf16-all-float32_loss"))
    return sets


@pytest.mark.parametrize("args,kwargs", _extension_forward_arg_sets())
def test_opcheck_forward_extensions(ops, args, kwargs):
    torch.library.opcheck(ops.forward.default, args, kwargs)


def _grad_arg_sets():
    sets = []
    for case in ("2d_weight", "2d_ignore_pos", "unbatched", "nchw", "soft_weight_nchw", "empty"):
        for kind in ("plain", "target_values", "z_loss", "mixup_lam", "mixup_lam_value", "all"):
            if case == "soft_weight_nchw" and kind not in ("plain", "z_loss"):
                continue
            for reduction in REDUCTIONS:
                x, target, weight, ignore_index = _make(case)
                eps, kwargs = _ext(kind, x, target)
                positions = positions_shape(x.shape)
                go = (make_logits(positions, seed=6) if reduction == "none" and positions
                      else torch.tensor(1.0 if reduction == "mean" else -2.5))
                sets.append(pytest.param((x, target, weight, ignore_index, REDUCTION_CODE[reduction], eps, False, go),
                                         kwargs, id=f"{case}-{kind}-{reduction}"))
    x, target, weight, ignore_index = _make("nchw", torch.bfloat16)
    eps, kwargs = _ext("all", x, target)
    sets.append(pytest.param((x, target, weight, ignore_index, 0, eps, True,
                              make_logits(positions_shape(x.shape), seed=6)), kwargs,
                             id="bf16-float32_loss-fp32-grad_output"))
    x, target, weight, ignore_index = _make("2d_weight", torch.float64)
    sets.append(pytest.param((x, target, weight, ignore_index, 1, 0.2, False, torch.tensor(3.0, dtype=torch.float64)),
                             {}, id="fp64-mean"))
    base = make_logits((11, 6))
    target = make_index_target((6,), 11)
    sets.append(pytest.param((base.t(), target, None, -100, 2, 0.1, False, torch.tensor(0.5)), dict(z_loss=0.1),
                             id="transposed"))
    return sets


@pytest.mark.parametrize("args,kwargs", _grad_arg_sets())
def test_opcheck_grad(ops, args, kwargs):
    torch.library.opcheck(ops.grad_.default, args, kwargs)
