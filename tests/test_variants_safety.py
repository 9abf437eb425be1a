"""inplace_backward=True (docs/semantics.md §3.4): the same numbers as the out-of-place path, really
written over the logits, never a silent wrong gradient (autograd's version counter), the cases it
refuses; and the argument checks of the docs/semantics.md §3 keywords (smoothing, target_values,
z_loss, inplace_backward, mixup's lam and target_b).

Every test builds its tensors on the backend's device (CUDA under SMOOTHCE_TEST_BACKEND=cuda), so the
logits the tests watch are the ones the kernels overwrite."""
import math

import pytest
import torch

import smoothce
from conftest import (DTYPES, REDUCTIONS, dtype_id, make_index_target, make_logits, make_prob_target,
                      make_weight, positions_shape, ref)


@pytest.fixture
def device(backend):
    return "cuda" if backend == "cuda" else "cpu"


INPLACE_ERROR = "modified by an inplace operation"


def _assert_near(actual, expected, dtype, what):
    """Equal up to a few roundings in dtype: the in-place kernel scales the gradient by the upstream
    gradient before its single rounding, the fused path rounds and then rescales."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN patterns differ"
    assert torch.equal(a[e.isinf()], e[e.isinf()]), f"{what}: inf values differ"
    finite = e.isfinite()
    a, e = a[finite], e[finite]
    if not e.numel():
        return
    eps = torch.finfo(dtype).eps
    scale = e.abs().max().item() or 1.0
    torch.testing.assert_close(a, e, rtol=4 * eps, atol=4 * eps * scale, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------- the cases

def _case(name, N=6, C=9):
    """One case: input shape, the leaf's layout, the view from h = leaf * 1 to the logits, keyword
    arguments, mixup's lam kind (None: cross_entropy), probability target?, ignored positions."""
    spec = dict(shape=(N, C), leaf=None, view=None, kwargs={}, mixup=None, soft=False, ignore_index=-100,
                ignore_every=0)
    if name == "2d":
        pass
    elif name == "2d_weight_ignore_smoothing":
        spec.update(kwargs=dict(weight=True, ignore_index=2, label_smoothing=0.1), ignore_index=2, ignore_every=3)
    elif name == "unbatched":
        spec.update(shape=(C,), kwargs=dict(weight=True, label_smoothing=0.2))
    elif name == "nchw":
        spec.update(shape=(2, 5, 3, 4), kwargs=dict(weight=True, ignore_index=255, label_smoothing=0.2),
                    ignore_index=255, ignore_every=5)
    elif name == "channels_last":
        spec.update(shape=(2, 5, 3, 4), leaf="channels_last",
                    kwargs=dict(weight=True, label_smoothing=0.1, z_loss=0.01))
    elif name == "transposed":  # the leaf is (C, N): logits with strided classes
        spec.update(leaf="transposed", view=lambda h: h.t(), kwargs=dict(label_smoothing=0.1))
    elif name == "sliced":  # a (N, C) window of a wider (N, C + 3) tensor: row stride C + 3
        spec.update(leaf="wide", view=lambda h: h[:, 1:C + 1], kwargs=dict(weight=True, ignore_index=0),
                    ignore_index=0, ignore_every=4)
    elif name == "sliced_tiles":  # as "sliced", with full tiles of rows (16 a tile with AVX-512, 8 with AVX2)
        spec.update(shape=(40, C), leaf="wide", view=lambda h: h[:, 1:C + 1], kwargs=dict(label_smoothing=0.1))
    elif name == "strided_rows":
        spec.update(leaf="tall", view=lambda h: h[::2], kwargs=dict(label_smoothing=0.3))
    elif name == "z_loss":
        spec.update(kwargs=dict(weight=True, z_loss=0.05, ignore_index=1), ignore_index=1, ignore_every=4)
    elif name == "others":
        spec.update(kwargs=dict(weight=True, smoothing="others", label_smoothing=0.15))
    elif name == "target_values":
        spec.update(shape=(2, 5, 3, 4), kwargs=dict(target_values=(0.8, 0.02), ignore_index=255),
                    ignore_index=255, ignore_every=3)
    elif name == "soft_target":
        spec.update(soft=True, kwargs=dict(weight=True, label_smoothing=0.1, z_loss=0.02))
    elif name == "mixup_float":
        spec.update(mixup="float", kwargs=dict(label_smoothing=0.1))
    elif name == "mixup_tensor":
        spec.update(mixup="per_sample", kwargs=dict(weight=True, label_smoothing=0.1, ignore_index=3),
                    ignore_index=3, ignore_every=4)
    elif name == "mixup_nchw_per_pixel":
        spec.update(shape=(2, 5, 3, 4), mixup="per_position",
                    kwargs=dict(weight=True, z_loss=0.01, ignore_index=255), ignore_index=255, ignore_every=7)
    elif name == "mixup_others_z_loss":
        spec.update(mixup="float", kwargs=dict(smoothing="others", label_smoothing=0.2, z_loss=0.03))
    elif name == "mixup_target_values_transposed":
        spec.update(leaf="transposed", view=lambda h: h.t(), mixup="per_sample",
                    kwargs=dict(target_values=(0.9, 0.01)))
    else:
        raise KeyError(name)
    return spec


CASES = ["2d", "2d_weight_ignore_smoothing", "unbatched", "nchw", "channels_last", "transposed", "sliced",
         "sliced_tiles", "strided_rows", "z_loss", "others", "target_values", "soft_target", "mixup_float",
         "mixup_tensor", "mixup_nchw_per_pixel", "mixup_others_z_loss", "mixup_target_values_transposed"]


def _materialize(name, dtype, device):
    """The leaf's values, the view from h = leaf * 1 to the logits, and the call's arguments."""
    spec = _case(name)
    shape = spec["shape"]
    C = shape[0] if len(shape) == 1 else shape[1]
    if spec["leaf"] == "transposed":
        x = make_logits(shape[::-1], dtype)
    elif spec["leaf"] == "wide":
        x = make_logits((shape[0], C + 3), dtype)
    elif spec["leaf"] == "tall":
        x = make_logits((2 * shape[0], C), dtype)
    else:
        x = make_logits(shape, dtype)
        if spec["leaf"] == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    pos = positions_shape(shape)
    if spec["soft"]:
        target = make_prob_target(shape, dtype)
    else:
        target = make_index_target(pos, C, ignore_every=spec["ignore_every"], ignore_index=spec["ignore_index"])
    kwargs = dict(spec["kwargs"])
    if kwargs.get("weight"):
        kwargs["weight"] = make_weight(C, dtype).to(device)
    args = [target.to(device)]
    fn = smoothce.cross_entropy
    if spec["mixup"]:
        fn = smoothce.mixup_cross_entropy
        target_b = make_index_target(pos, C, seed=11, ignore_every=spec["ignore_every"] + 1 if spec["ignore_every"]
                                     else 0, ignore_index=spec["ignore_index"])
        g = torch.Generator().manual_seed(12)
        if spec["mixup"] == "float":
            lam = 0.35
        elif spec["mixup"] == "per_sample":
            lam = torch.rand(shape[0], generator=g).reshape((shape[0],) + (1,) * (len(pos) - 1)).to(device)
        else:
            lam = torch.rand(pos, generator=g).to(device)
        args += [target_b.to(device), lam]
    return x.to(device), spec["view"], fn, args, kwargs


def _run(fn, x, view, args, kwargs, *, inplace, upstream=None):
    """Forward + backward through h = leaf * 1 (a non-leaf whose backward saves nothing) and the view.
    Returns (loss, leaf.grad, the logits tensor, the gradient autograd handed to the logits' grad_fn)."""
    leaf = x.detach().clone().requires_grad_(True)
    h = leaf * 1
    logits = view(h) if view is not None else h
    seen = []
    logits.register_hook(seen.append)
    loss = fn(logits, *args, inplace_backward=inplace, **kwargs)
    if upstream is None:
        loss.backward(torch.ones_like(loss))
    elif isinstance(upstream, float):  # mean / sum: an upstream gradient != 1 through autograd
        (loss * upstream).backward()
    else:
        loss.backward(upstream.to(loss.dtype))
    assert len(seen) == 1
    return loss.detach(), leaf.grad, logits, seen[0]


def _upstream(kind, reduction, x, view, device):
    if kind == "ones":
        return None
    if reduction == "none":
        shape = view(x).shape if view is not None else x.shape
        return make_logits(positions_shape(shape), torch.float64, seed=21).to(device)
    return 3.0


@pytest.mark.parametrize("upstream", ["ones", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_inplace_equals_out_of_place(device, case, reduction, dtype, upstream):
    """Loss, the gradient reaching the leaf, and the gradient written over the logits: those of
    inplace_backward=False; the logits' grad_fn receives the logits' own storage (no N×C allocation)."""
    x, view, fn, args, kwargs = _materialize(case, dtype, device)
    kwargs["reduction"] = reduction
    up = _upstream(upstream, reduction, x, view, device)
    loss0, grad0, _, logits_grad0 = _run(fn, x, view, args, kwargs, inplace=False, upstream=up)
    loss1, grad1, logits1, logits_grad1 = _run(fn, x, view, args, kwargs, inplace=True, upstream=up)
    _assert_near(loss1, loss0, dtype, "loss")
    assert grad1 is not None
    _assert_near(grad1, grad0, dtype, "leaf gradient")
    # Really in place: the logits now hold their gradient, and that storage is what autograd passed on.
    assert logits_grad1.data_ptr() == logits1.data_ptr(), "the gradient was not written over the logits"
    assert logits_grad1.stride() == logits1.stride()
    _assert_near(logits1.detach(), logits_grad0, dtype, "logits after backward")
    assert logits_grad0.data_ptr() != logits1.data_ptr()

    if dtype == torch.float64:  # and the out-of-place numbers are those of the float64 reference
        ref_fn = ref.mixup_cross_entropy if fn is smoothce.mixup_cross_entropy else ref.cross_entropy
        loss_r, grad_r, _, _ = _run(ref_fn, x, view, args, kwargs, inplace=False, upstream=up)
        torch.testing.assert_close(loss0, loss_r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad0, grad_r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_linear_layer(device, reduction, dtype):
    """logits = feats @ W.T (a layer's output; mm saves its inputs, not its output)."""
    g = torch.Generator().manual_seed(4)
    feats0 = torch.randn(8, 6, generator=g).to(dtype).to(device)
    W0 = torch.randn(11, 6, generator=g).to(dtype).to(device)
    target = make_index_target((8,), 11, ignore_every=3, ignore_index=5).to(device)
    results = []
    for inplace in (False, True):
        feats, W = feats0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
        logits = feats @ W.T
        loss = smoothce.cross_entropy(logits, target, ignore_index=5, reduction=reduction, label_smoothing=0.1,
                                      z_loss=0.01, inplace_backward=inplace)
        (loss * 2.5).sum().backward()
        results.append((loss.detach(), feats.grad, W.grad))
    for what, a, b in zip(("loss", "feats grad", "W grad"), results[1], results[0]):
        _assert_near(a, b, dtype, what)


def test_inplace_module(device):
    """CrossEntropyLoss(inplace_backward=True) passes the keyword through."""
    x, _, _, (target,), _ = _materialize("nchw", torch.float32, device)
    weight = make_weight(5).to(device)
    results = []
    for inplace in (False, True):
        module = smoothce.CrossEntropyLoss(weight, ignore_index=255, label_smoothing=0.1, z_loss=0.02,
                                           inplace_backward=inplace)
        assert ("inplace_backward=True" in repr(module)) == inplace
        leaf = x.clone().requires_grad_(True)
        h = leaf * 1
        loss = module(h, target)
        loss.backward()
        results.append((loss.detach(), leaf.grad, h.detach()))
    _assert_near(results[1][0], results[0][0], torch.float32, "loss")
    _assert_near(results[1][1], results[0][1], torch.float32, "grad")
    _assert_near(results[1][2], results[0][1], torch.float32, "logits after backward")
    assert torch.equal(results[0][2], x), "the out-of-place path must leave the logits alone"


def test_inplace_autograd_grad(device):
    """torch.autograd.grad (no .grad accumulation) with inplace_backward=True."""
    x, _, _, (target,), kwargs = _materialize("2d_weight_ignore_smoothing", torch.float32, device)
    grads = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_(True)
        h = leaf * 1
        loss = smoothce.cross_entropy(h, target, **kwargs, inplace_backward=inplace)
        (g,) = torch.autograd.grad(loss * 1.5, h)
        if inplace:
            assert g.data_ptr() == h.data_ptr()
        grads.append(g.clone())
    _assert_near(grads[1], grads[0], torch.float32, "grad")


# ---------------------------------------------------------------------- safety: the version counter

def _grads(build, inplace, device):
    """build(leaf, inplace) -> scalar loss; backward; returns the leaf's gradient."""
    leaf = make_logits((6, 9), torch.float64, seed=5).to(device).requires_grad_(True)
    loss = build(leaf, inplace)
    loss.backward()
    return leaf.grad


def _target(device, C=9):
    return make_index_target((6,), C, seed=7).to(device)


def _ce(logits, inplace, device, **kwargs):
    return smoothce.cross_entropy(logits, _target(device, logits.shape[1]), label_smoothing=0.1,
                                  inplace_backward=inplace, **kwargs)


# Graphs in which another node saved the logits and its backward necessarily runs after smoothce's
# (the logits are its output, or a second smoothce call saved them): backward must raise.
MUST_RAISE = {
    "exp_output": lambda leaf, inplace, dev: _ce((leaf * 1).exp(), inplace, dev),
    "relu_output": lambda leaf, inplace, dev: _ce(torch.relu(leaf * 1), inplace, dev),
    "tanh_output": lambda leaf, inplace, dev: _ce(torch.tanh(leaf * 1), inplace, dev),
    "softmax_output": lambda leaf, inplace, dev: _ce(torch.softmax(leaf * 1, dim=1), inplace, dev),
    "view_of_exp_output": lambda leaf, inplace, dev: _ce((leaf * 1).exp()[:, :7], inplace, dev),
    "transposed_view_of_exp_output": lambda leaf, inplace, dev: smoothce.cross_entropy(
        (leaf * 1).exp().t(), make_index_target((9,), 6, seed=7).to(dev), inplace_backward=inplace),
    "two_inplace_losses": lambda leaf, inplace, dev: _two_losses(leaf, inplace, inplace, dev),
    "two_inplace_losses_none_sum": lambda leaf, inplace, dev: _two_losses(leaf, inplace, inplace, dev, "none", "sum"),
    "mixup_exp_output": lambda leaf, inplace, dev: smoothce.mixup_cross_entropy(
        (leaf * 1).exp(), _target(dev), _target(dev).flip(0), 0.3, z_loss=0.1, inplace_backward=inplace),
}


def _two_losses(leaf, first_inplace, second_inplace, device, first_reduction="mean",
                second_reduction="mean"):
    """Two smoothce losses on the same logits; the second one's backward runs first."""
    logits = leaf * 1
    a = smoothce.cross_entropy(logits, _target(device), label_smoothing=0.1, reduction=first_reduction,
                               inplace_backward=first_inplace)
    b = smoothce.cross_entropy(logits, _target(device).flip(0), reduction=second_reduction,
                               inplace_backward=second_inplace)
    return a.sum() + b.sum()


@pytest.mark.parametrize("graph", sorted(MUST_RAISE))
def test_saved_logits_raise(device, graph):
    build = MUST_RAISE[graph]
    expected = _grads(lambda leaf, inplace: build(leaf, inplace, device), False, device)
    assert expected is not None and expected.isfinite().all()
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        _grads(lambda leaf, inplace: build(leaf, inplace, device), True, device)


def _aux_square(leaf, inplace, dev, first):
    logits = leaf * 1
    if first:
        aux = (logits ** 2).sum() * 0.01
        return aux + _ce(logits, inplace, dev)
    loss = _ce(logits, inplace, dev)
    return loss + (logits ** 2).sum() * 0.01


def _sigmoid_user(leaf, inplace, dev):
    logits = leaf * 1
    loss = _ce(logits, inplace, dev)
    return loss + torch.sigmoid(logits).sum()


def _matmul_user(leaf, inplace, dev):
    logits = leaf * 1
    M = torch.linspace(-1, 1, 9 * 4, dtype=leaf.dtype, device=dev).reshape(9, 4).requires_grad_(True)
    loss = _ce(logits, inplace, dev, z_loss=0.1)
    return loss + (logits @ M).pow(2).sum() * 0.1


def _mul_user_first(leaf, inplace, dev):
    logits = leaf * 1
    aux = (logits * logits).sum() * 0.05  # mul saves both operands: the logits
    return aux + _ce(logits, inplace, dev)


def _sibling_view_user(leaf, inplace, dev, aux_first=False):
    """The logits are a slice of h; another slice of h is saved by pow (shared version counter)."""
    h = leaf * 1
    if aux_first:
        aux = (h[:, 7:] ** 2).sum()
        return aux + _ce(h[:, :7], inplace, dev)
    loss = _ce(h[:, :7], inplace, dev)
    return loss + (h[:, 7:] ** 2).sum()


# Graphs in which another node saved the logits (or a view sharing their version counter), and
# autograd may run that node's backward before or after smoothce's: either backward raises, or it
# completes with the out-of-place gradient. Never a silently wrong gradient.
RAISE_OR_CORRECT = {
    "square_before": lambda leaf, inplace, dev: _aux_square(leaf, inplace, dev, True),
    "square_after": lambda leaf, inplace, dev: _aux_square(leaf, inplace, dev, False),
    "sigmoid": _sigmoid_user,
    "matmul_with_weight_grad": _matmul_user,
    "mul_self_before": _mul_user_first,
    "sibling_view_saved": _sibling_view_user,
    # The out-of-place mean/sum gradient is computed in forward; 'none' recomputes it from the saved logits.
    "inplace_then_out_of_place_mean": lambda leaf, inplace, dev: _two_losses(leaf, inplace, False, dev),
    "out_of_place_mean_then_inplace": lambda leaf, inplace, dev: _two_losses(leaf, False, inplace, dev),
    "inplace_then_out_of_place_none": lambda leaf, inplace, dev: _two_losses(
        leaf, inplace, False, dev, second_reduction="none"),
    "out_of_place_none_then_inplace": lambda leaf, inplace, dev: _two_losses(
        leaf, False, inplace, dev, first_reduction="none"),
    "out_of_place_sum_then_inplace_none": lambda leaf, inplace, dev: _two_losses(
        leaf, False, inplace, dev, first_reduction="sum", second_reduction="none"),
    "sibling_view_saved_before": lambda leaf, inplace, dev: _sibling_view_user(leaf, inplace, dev, True),
}


@pytest.mark.parametrize("graph", sorted(RAISE_OR_CORRECT))
def test_saved_logits_raise_or_correct(device, graph):
    build = RAISE_OR_CORRECT[graph]
    expected = _grads(lambda leaf, inplace: build(leaf, inplace, device), False, device)
    try:
        got = _grads(lambda leaf, inplace: build(leaf, inplace, device), True, device)
    except RuntimeError as error:
        assert INPLACE_ERROR in str(error), str(error)
        return
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# Other users of the logits that save nothing from them: must work, with the out-of-place gradient.
def _scaled_user(leaf, inplace, dev):
    logits = leaf * 1
    return _ce(logits, inplace, dev) + (logits * 2.0).sum() + logits.mean()


def _sum_then_ce(leaf, inplace, dev):
    logits = leaf * 1
    aux = logits.sum(dim=1).pow(2).sum() * 0.01  # sum saves no input; pow saves the sum, not the logits
    return aux + _ce(logits, inplace, dev)


@pytest.mark.parametrize("build", [_scaled_user, _sum_then_ce], ids=["scaled", "row_sums"])
def test_other_users_that_save_nothing(device, build):
    expected = _grads(lambda leaf, inplace: build(leaf, inplace, device), False, device)
    got = _grads(lambda leaf, inplace: build(leaf, inplace, device), True, device)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- refused and special uses

@pytest.mark.parametrize("view", ["leaf", "slice", "transpose", "reshape", "unbatched_row"])
@pytest.mark.parametrize("mixup", [False, True], ids=["ce", "mixup"])
def test_leaf_logits_refused(device, view, mixup):
    leaf = make_logits((6, 9), seed=3).to(device).requires_grad_(True)
    target = _target(device)
    logits = {"leaf": lambda: leaf, "slice": lambda: leaf[:, :9], "transpose": lambda: leaf.t().t(),
              "reshape": lambda: leaf.view(6, 9, 1), "unbatched_row": lambda: leaf[0]}[view]()
    if view == "reshape":
        target = target.view(6, 1)
    elif view == "unbatched_row":
        target = target[0]
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="inplace_backward") as info:
        if mixup:
            smoothce.mixup_cross_entropy(logits, target, target, 0.5, inplace_backward=True)
        else:
            smoothce.cross_entropy(logits, target, inplace_backward=True)
    assert "leaf" in str(info.value)
    assert torch.equal(leaf.detach(), before)
    # The same call without inplace_backward is fine.
    smoothce.cross_entropy(logits, target).backward()
    assert leaf.grad is not None


def test_module_leaf_logits_refused(device):
    leaf = make_logits((6, 9)).to(device).requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        smoothce.CrossEntropyLoss(inplace_backward=True)(leaf, _target(device))


def test_prob_target_requiring_grad_refused(device):
    h = make_logits((6, 9)).to(device).requires_grad_(True) * 1
    target = make_prob_target((6, 9)).to(device).requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        smoothce.cross_entropy(h, target, inplace_backward=True)
    # A probability target that does not require grad is fine (checked in the equivalence test).


def test_prob_target_grad_with_inference_logits(device):
    """Logits that need no gradient: nothing is written in place, the target's gradient is torch's."""
    x = make_logits((6, 9)).to(device)
    tgt = make_prob_target((6, 9)).to(device)
    grads = []
    for inplace in (False, True):
        target = tgt.clone().requires_grad_(True)
        logits = x.clone()
        smoothce.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=inplace).backward()
        assert torch.equal(logits, x)
        grads.append(target.grad)
    _assert_near(grads[1], grads[0], torch.float32, "target grad")


@pytest.mark.parametrize("how", ["backward", "autograd_grad"])
def test_second_backward_raises(device, how):
    """retain_graph=True: the first backward overwrote the logits; a second one must not read them."""
    x, _, _, (target,), kwargs = _materialize("z_loss", torch.float64, device)
    expected = _run(smoothce.cross_entropy, x, None, [target], kwargs, inplace=False)[1]
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1
    loss = smoothce.cross_entropy(h, target, **kwargs, inplace_backward=True)
    if how == "backward":
        loss.backward(retain_graph=True)
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            loss.backward()
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)  # not accumulated
    else:
        (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            torch.autograd.grad(loss, leaf)


DOUBLE_BACKWARD = {
    "plain_mean": ("2d", "mean"),
    "weight_ignore_sum": ("2d_weight_ignore_smoothing", "sum"),
    "z_loss_none": ("z_loss", "none"),
    "others_mean": ("others", "mean"),
    "target_values_nchw": ("target_values", "mean"),
    "mixup_tensor": ("mixup_tensor", "mean"),
    "mixup_float_none": ("mixup_others_z_loss", "none"),
    "transposed": ("transposed", "sum"),
}


@pytest.mark.parametrize("name", sorted(DOUBLE_BACKWARD))
def test_create_graph_double_backward(device, name):
    """create_graph=True takes the differentiable (out-of-place) path: first and second order equal
    the out-of-place ones, and the logits are left untouched."""
    case, reduction = DOUBLE_BACKWARD[name]
    x, view, fn, args, kwargs = _materialize(case, torch.float64, device)
    v = make_logits(x.shape, torch.float64, seed=31).to(device)
    results = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_(True)
        h = leaf * 1
        logits = view(h) if view is not None else h
        loss = fn(logits, *args, reduction=reduction, inplace_backward=inplace, **kwargs)
        up = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
        (g,) = torch.autograd.grad(loss, leaf, up, create_graph=True)
        assert g.requires_grad
        (hvp,) = torch.autograd.grad((g * v).sum(), leaf)
        assert torch.equal(h.detach(), x), "create_graph must not write over the logits"
        results.append((loss.detach(), g.detach(), hvp))
    for what, a, b in zip(("loss", "grad", "Hessian-vector product"), results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")
    assert results[0][2].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("mode", ["no_grad_logits", "no_grad_mode", "inference_mode", "mixup"])
def test_inference_leaves_logits_unchanged(device, mode, dtype):
    x, _, _, (target,), kwargs = _materialize("2d_weight_ignore_smoothing", dtype, device)
    expected = smoothce.cross_entropy(x, target, **kwargs)
    logits = x.clone()
    if mode == "no_grad_logits":
        loss = smoothce.cross_entropy(logits, target, **kwargs, inplace_backward=True)
    elif mode == "mixup":
        loss = smoothce.mixup_cross_entropy(logits, target, target, 0.25, **kwargs, inplace_backward=True)
    else:
        logits.requires_grad_(True)  # a leaf: refused only where a gradient will be written
        with (torch.no_grad() if mode == "no_grad_mode" else torch.inference_mode()):
            loss = smoothce.cross_entropy(logits, target, **kwargs, inplace_backward=True)
    assert not loss.requires_grad
    _assert_near(loss, expected, dtype, "loss")
    assert torch.equal(logits.detach(), x), "inference must leave the logits unchanged"


def test_no_grad_of_loss_never_writes(device):
    """A loss that never reaches backward leaves the logits intact (the write happens in backward)."""
    x = make_logits((6, 9)).to(device)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1
    loss = smoothce.cross_entropy(h, _target(device), inplace_backward=True)
    other = (h * 2).sum()
    other.backward()
    assert torch.equal(h.detach(), x)
    assert loss.requires_grad


# ---------------------------------------------------------------------------------- option errors

X = make_logits((4, 5))
T = torch.tensor([0, 1, 2, 4])
TB = torch.tensor([1, 2, 3, 0])
P = make_prob_target((4, 5))

# (id, function, kwargs, exception, pattern the message must match)
CE_ERRORS = [
    ("smoothing_unknown", dict(smoothing="other"), ValueError, r"smoothing.*'other'"),
    ("smoothing_case", dict(smoothing="Uniform"), ValueError, "smoothing"),
    ("smoothing_none", dict(smoothing=None), ValueError, "smoothing"),
    ("smoothing_number", dict(smoothing=0.1), ValueError, "smoothing"),
    ("target_values_scalar", dict(target_values=0.9), ValueError, "target_values"),
    ("target_values_triple", dict(target_values=(0.9, 0.05, 0.05)), ValueError, "target_values"),
    ("target_values_single", dict(target_values=[0.9]), ValueError, "target_values"),
    ("target_values_string", dict(target_values="ab"), ValueError, "target_values"),
    ("target_values_dict", dict(target_values={0: 0.9, 1: 0.1}), ValueError, "target_values"),
    ("target_values_tensor", dict(target_values=torch.tensor([0.9, 0.1])), ValueError, "target_values"),
    ("target_values_negative_on", dict(target_values=(-0.5, 0.1)), ValueError, "target_values"),
    ("target_values_negative_off", dict(target_values=(0.9, -0.01)), ValueError, "target_values"),
    ("target_values_nan", dict(target_values=(math.nan, 0.1)), ValueError, "target_values"),
    ("target_values_inf", dict(target_values=(0.9, math.inf)), ValueError, "target_values"),
    ("target_values_neg_inf", dict(target_values=(-math.inf, 0.0)), ValueError, "target_values"),
    ("target_values_str_items", dict(target_values=("0.9", "0.1")), TypeError, "target_values"),
    ("target_values_none_item", dict(target_values=(0.9, None)), TypeError, "target_values"),
    ("target_values_bool_item", dict(target_values=(True, False)), TypeError, "target_values"),
    ("target_values_complex_item", dict(target_values=(0.9 + 1j, 0.0)), TypeError, "target_values"),
    ("target_values_with_smoothing", dict(target_values=(0.9, 0.02), label_smoothing=0.1), ValueError,
     r"target_values.*label_smoothing"),
    ("target_values_with_others", dict(target_values=(0.9, 0.02), smoothing="others"), ValueError,
     r"target_values.*others"),
    ("others_prob_target", dict(target=P, smoothing="others", label_smoothing=0.1), ValueError,
     r"smoothing='others'.*(probability|floating)"),
    ("target_values_prob_target", dict(target=P, target_values=(0.9, 0.02)), ValueError,
     r"target_values.*(probability|floating)"),
    ("z_loss_negative", dict(z_loss=-0.1), ValueError, r"z_loss.*-0\.1"),
    ("z_loss_nan", dict(z_loss=math.nan), ValueError, r"z_loss.*nan"),
    ("z_loss_inf", dict(z_loss=math.inf), ValueError, r"z_loss.*inf"),
    ("z_loss_string", dict(z_loss="0.1"), TypeError, "z_loss"),
    ("z_loss_none", dict(z_loss=None), TypeError, "z_loss"),
    ("z_loss_bool", dict(z_loss=True), TypeError, "z_loss"),
    ("z_loss_tensor", dict(z_loss=torch.tensor(0.1)), TypeError, "z_loss"),
    ("inplace_int", dict(inplace_backward=1), TypeError, "inplace_backward"),
    ("inplace_string", dict(inplace_backward="yes"), TypeError, "inplace_backward"),
    ("inplace_none", dict(inplace_backward=None), TypeError, "inplace_backward"),
    ("inplace_tensor", dict(inplace_backward=torch.tensor(True)), TypeError, "inplace_backward"),
]


def _logits(device, requires_grad=True):
    """Non-leaf logits (so inplace_backward=True itself is allowed)."""
    x = X.to(device)
    return x.clone().requires_grad_(True) * 1 if requires_grad else x.clone()


@pytest.mark.parametrize("requires_grad", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("kwargs,error,pattern", [pytest.param(*c[1:], id=c[0]) for c in CE_ERRORS])
def test_option_errors(device, kwargs, error, pattern, requires_grad):
    kwargs = dict(kwargs)
    target = kwargs.pop("target", T).to(device)
    logits = _logits(device, requires_grad)
    with pytest.raises(error, match=pattern):
        smoothce.cross_entropy(logits, target, **kwargs)
    # The module checks the same arguments when called (it stores target_values as a tuple, so only
    # the sequences keep their meaning there).
    if not isinstance(kwargs.get("target_values"), (dict, str, torch.Tensor, float)):
        module = smoothce.CrossEntropyLoss(**kwargs)
        with pytest.raises(error, match=pattern):
            module(logits, target)


@pytest.mark.parametrize("kwargs,error,pattern", [pytest.param(*c[1:], id=c[0]) for c in CE_ERRORS
                                                  if "target" not in c[1]])
def test_option_errors_mixup(device, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        smoothce.mixup_cross_entropy(_logits(device), T.to(device), TB.to(device), 0.5, **kwargs)


def _lam(values, **kw):
    return torch.tensor(values, **kw)


# (id, target_b, lam, exception, pattern); target_a is T
MIXUP_ERRORS = [
    ("lam_negative", TB, -0.1, ValueError, r"lam.*-0\.1"),
    ("lam_above_one", TB, 1.5, ValueError, r"lam.*1\.5"),
    ("lam_tiny_above_one", TB, 1.0 + 1e-12, ValueError, "lam"),
    ("lam_nan", TB, math.nan, ValueError, r"lam.*nan"),
    ("lam_inf", TB, math.inf, ValueError, "lam"),
    ("lam_string", TB, "0.5", TypeError, "lam"),
    ("lam_none", TB, None, TypeError, "lam"),
    ("lam_bool", TB, True, TypeError, "lam"),
    ("lam_list", TB, [0.5, 0.5, 0.5, 0.5], TypeError, "lam"),
    ("lam_tensor_wrong_shape", TB, _lam([0.1, 0.2, 0.3]), ValueError, r"lam.*shape"),
    ("lam_tensor_too_many_dims", TB, _lam([[0.1, 0.2, 0.3, 0.4]] * 2), ValueError, r"lam.*shape"),
    ("lam_tensor_class_dim", TB, torch.full((4, 5), 0.5), ValueError, r"lam.*shape"),
    ("lam_tensor_int", TB, _lam([1, 0, 1, 0]), TypeError, r"lam.*(dtype|floating)"),
    ("lam_tensor_bool", TB, _lam([True, False, True, False]), TypeError, r"lam.*(dtype|floating)"),
    ("lam_tensor_requires_grad", TB, _lam([0.1, 0.2, 0.3, 0.4], requires_grad=True), ValueError, "lam"),
    ("lam_tensor_meta", TB, _lam([0.1, 0.2, 0.3, 0.4], device="meta"), ValueError, r"lam.*device"),
    ("target_b_shape", TB[:3], 0.5, ValueError, r"target_b.*shape"),
    ("target_b_2d", TB.view(4, 1), 0.5, ValueError, r"target_b.*shape"),
    ("target_b_float", TB.float(), 0.5, ValueError, "target_b"),
    ("target_b_prob", P, 0.5, ValueError, "target_b"),
    ("target_b_dtype", TB.to(torch.uint8), 0.5, TypeError, "target_b"),
    ("target_b_not_tensor", [1, 2, 3, 0], 0.5, TypeError, "target_b"),
    ("target_b_none", None, 0.5, TypeError, "target_b"),
    ("target_b_none_bad_lam", None, 7.0, (TypeError, ValueError), "(target_b|lam)"),
    ("target_b_meta", TB.to("meta"), 0.5, ValueError, r"target_b.*device"),
]

# Checked by the kernels' driver (on CUDA without a host sync: a device-side assert, as torch's
# out-of-range targets), so they run on CPU under the cuda backend.
MIXUP_VALUE_ERRORS = [
    ("lam_tensor_above_one", TB, _lam([0.1, 0.5, 1.5, 0.2]), ValueError, r"lam.*\[0, 1\]"),
    ("lam_tensor_negative", TB, _lam([0.1, -0.5, 0.5, 0.2]), ValueError, r"lam.*\[0, 1\]"),
    ("lam_tensor_nan", TB, _lam([0.1, 0.5, math.nan, 0.2]), ValueError, "lam"),
    ("lam_tensor_inf", TB, _lam([0.1, 0.5, math.inf, 0.2]), ValueError, "lam"),
    ("lam_tensor_broadcast_scalar_bad", TB, _lam(1.25), ValueError, "lam"),
    ("target_b_out_of_range", _lam([1, 5, 3, 0]), 0.5, IndexError, r"target.*5"),
    ("target_b_negative", _lam([1, -3, 3, 0]), 0.5, IndexError, r"target.*-3"),
    ("target_b_other_ignore", _lam([1, -100, 3, 0]), 0.5, IndexError, r"target.*-100"),
]


def _mixup_call(device, target_b, lam, requires_grad=True, **kwargs):
    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
    return smoothce.mixup_cross_entropy(_logits(device, requires_grad), T.to(device), move(target_b), move(lam),
                                        **kwargs)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("target_b,lam,error,pattern", [c if hasattr(c, "marks") else
                                                        pytest.param(*c[1:], id=c[0]) for c in MIXUP_ERRORS])
def test_mixup_errors(device, target_b, lam, error, pattern, requires_grad):
    with pytest.raises(error, match=pattern):
        _mixup_call(device, target_b, lam, requires_grad, inplace_backward=requires_grad)


@pytest.mark.not_on_cuda
@pytest.mark.parametrize("requires_grad", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("target_b,lam,error,pattern", [pytest.param(*c[1:], id=c[0])
                                                        for c in MIXUP_VALUE_ERRORS])
def test_mixup_value_errors(device, target_b, lam, error, pattern, requires_grad):
    # -100 is out of range once ignore_index is another value
    kwargs = dict(ignore_index=2) if bool((target_b == -100).any()) else {}
    with pytest.raises(error, match=pattern):
        _mixup_call(device, target_b, lam, requires_grad, **kwargs)


@pytest.mark.not_on_cuda
def test_mixup_target_a_errors(device):
    logits = _logits(device)
    with pytest.raises(ValueError, match="target_a"):
        smoothce.mixup_cross_entropy(logits, T.float().to(device), TB.to(device), 0.5)
    with pytest.raises(TypeError, match="target_a"):
        smoothce.mixup_cross_entropy(logits, [0, 1, 2, 3], TB.to(device), 0.5)
    with pytest.raises(IndexError, match="target"):
        smoothce.mixup_cross_entropy(logits, torch.tensor([0, 7, 1, 1], device=device), TB.to(device), 0.5)


def test_mixup_lam_tensor_requires_grad_under_no_grad(device):
    """lam.requires_grad only matters where a graph is built: under no_grad it is a plain constant."""
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device, requires_grad=True)
    with torch.no_grad():
        loss = smoothce.mixup_cross_entropy(_logits(device, False), T.to(device), TB.to(device), lam)
        expected = smoothce.mixup_cross_entropy(_logits(device, False), T.to(device), TB.to(device), lam.detach())
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


# Logits whose elements share memory: writing the gradient over them would let one position's
# gradient overwrite another's logits (or gradient). Either refused, or the out-of-place gradient.
OVERLAPPING = {
    "expand": lambda h: h[:1].expand(6, 9),  # stride 0
    "unfold": lambda h: h.reshape(-1)[:14].unfold(0, 9, 1),  # sliding windows: strides (1, 1)
    "as_strided": lambda h: h.as_strided((6, 9), (3, 1)),  # rows overlap by 6 elements
}
@pytest.mark.parametrize("view", sorted(OVERLAPPING))
def test_overlapping_logits_refused_or_correct(device, view):
    make = OVERLAPPING[view]
    target = _target(device)
    grads = []
    for inplace in (False, True):
        leaf = make_logits((6, 9), torch.float64, seed=8).to(device).requires_grad_(True)
        logits = make(leaf * 1)
        try:
            loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=inplace)
            loss.backward()
        except RuntimeError as error:
            assert inplace and "inplace_backward" in str(error), str(error)
            return
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
