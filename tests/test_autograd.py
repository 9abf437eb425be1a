"""torch.autograd.gradcheck in float64, a finite-difference Jacobian check that builds a fresh graph
per backward, and the clear error for second-order gradients."""

import math

import pytest
import torch

import smoothce
from conftest import (REDUCTIONS, make_index_target, make_logits, make_prob_target, make_weight,
                      positions_shape)


CASES = {
    # name: (input shape, soft?, weighted?, eps, ignore_index)
    "2d": ((4, 5), False, False, 0.0, -100),
    "2d_eps_weight": ((4, 5), False, True, 0.2, -100),
    "2d_eps1": ((4, 5), False, True, 1.0, -100),
    "unbatched": ((5,), False, True, 0.1, -100),
    "nchw_ignore": ((2, 5, 2, 3), False, True, 0.1, 255),
    "ncd": ((2, 5, 3), False, False, 0.3, -100),
    "soft": ((4, 5), True, False, 0.0, -100),
    "soft_weight_eps": ((4, 5), True, True, 0.2, -100),
    "soft_nchw": ((2, 5, 2, 2), True, True, 0.1, -100),
    "soft_unbatched": ((5,), True, False, 0.1, -100),
}


def _build(case):
    shape, soft, weighted, eps, ignore_index = CASES[case]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, torch.float64).requires_grad_(True)
    if soft:
        target = make_prob_target(shape, torch.float64).requires_grad_(True)
    else:
        target = make_index_target(positions_shape(shape), C)
        if target.dim():
            target.view(-1)[1] = ignore_index
    weight = make_weight(C, torch.float64) if weighted else None
    return x, target, weight, eps, ignore_index


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck(case, reduction):
    x, target, weight, eps, ignore_index = _build(case)

    def fn(*inputs):
        return smoothce.cross_entropy(inputs[0], inputs[1] if len(inputs) > 1 else target,
                                      weight=weight, ignore_index=ignore_index,
                                      reduction=reduction, label_smoothing=eps)

    inputs = (x, target) if target.is_floating_point() else (x,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def _fresh_graph_jacobians(fn, inputs, h=1e-6):
    """(analytical, numerical) Jacobians of fn w.r.t. each input that requires grad.

    Unlike gradcheck, every analytical row comes from its own forward + one backward, so this
    checks the math even where a second backward through one graph is refused."""
    with torch.no_grad():
        out = fn(*inputs)
    pairs = []
    for i, inp in enumerate(inputs):
        if not inp.requires_grad:
            continue
        analytical = torch.zeros(out.numel(), inp.numel(), dtype=torch.float64)
        for k in range(out.numel()):
            leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
            o = fn(*leaves)
            up = torch.zeros(o.numel(), dtype=o.dtype)
            up[k] = 1
            o.backward(up.view_as(o))
            analytical[k] = leaves[i].grad.reshape(-1)
        numerical = torch.zeros_like(analytical)
        base = inp.detach()
        for j in range(inp.numel()):
            values = []
            for step in (h, -h):
                moved = base.clone()
                moved.view(-1)[j] += step
                args = [t.detach() for t in inputs]
                args[i] = moved
                with torch.no_grad():
                    values.append(fn(*args).reshape(-1))
            numerical[:, j] = (values[0] - values[1]) / (2 * h)
        pairs.append((analytical, numerical))
    return pairs


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_graph_jacobian(case, reduction):
    x, target, weight, eps, ignore_index = _build(case)

    def fn(inp, tgt):
        return smoothce.cross_entropy(inp, tgt, weight=weight, ignore_index=ignore_index,
                                      reduction=reduction, label_smoothing=eps)

    for analytical, numerical in _fresh_graph_jacobians(fn, (x, target)):
        torch.testing.assert_close(analytical, numerical, rtol=1e-5, atol=1e-7)
        assert analytical.abs().max() > 0


@pytest.mark.parametrize("case", ["2d_eps_weight", "soft_weight_eps", "nchw_ignore"])
def test_gradgradcheck(case):
    """Second order is supported (create_graph=True goes through the reference's graph): gradgradcheck
    passes, so the Hessian is neither zero nor detached."""
    x, target, weight, eps, ignore_index = _build(case)

    def fn(x):
        return smoothce.cross_entropy(x, target.detach(), weight=weight, ignore_index=ignore_index,
                                      label_smoothing=eps)

    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def _fresh_leaf_of(x):
    return x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
def test_second_order_grad_matches_torch(reduction, soft):
    """grad(create_graph=True) then a second grad: torch's Hessian-vector product."""
    x, target, weight, eps, ignore_index = _build("soft_weight_eps" if soft else "2d_eps_weight")
    target = target.detach()

    def second(fn):
        leaf = _fresh_leaf_of(x)
        loss = fn(leaf, target, weight=weight, reduction=reduction, label_smoothing=eps)
        (g,) = torch.autograd.grad(loss.sum(), leaf, create_graph=True)
        assert g.requires_grad, "create_graph=True gave a gradient detached from the input"
        return torch.autograd.grad((g * g).sum(), leaf)[0]

    torch.testing.assert_close(second(smoothce.cross_entropy), second(torch.nn.functional.cross_entropy),
                               rtol=1e-9, atol=1e-12)


def test_gradient_penalty_is_not_silently_dropped():
    """A gradient penalty (WGAN-GP / double backprop) differentiates the input gradient again; a
    gradient that silently stopped depending on the input would drop the penalty without notice."""
    x, target, weight, eps, ignore_index = _build("2d_eps_weight")

    def total_grad(fn):
        leaf = _fresh_leaf_of(x)
        loss = fn(leaf, target, weight=weight, label_smoothing=eps)
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        # The penalty joins another term (not the loss itself, whose graph grad() consumed).
        ((leaf * leaf).sum() + (g * g).sum()).backward()
        return leaf.grad

    torch.testing.assert_close(total_grad(smoothce.cross_entropy), total_grad(torch.nn.functional.cross_entropy),
                               rtol=1e-9, atol=1e-12)


def _divided(x, target, weight, eps, ignore_index, divisor, **kwargs):
    from smoothce import _function

    return _function.cross_entropy_impl(x, target, weight, ignore_index, "sum", eps, divisor=divisor, **kwargs)


@pytest.mark.parametrize("case", ["2d_eps_weight", "nchw_ignore", "soft_weight_eps"])
@pytest.mark.parametrize("divisor", [7, "tensor"])
def test_divisor_is_the_sum_divided(case, divisor):
    """cross_entropy_impl(divisor=n) (the transformers integration's sum / num_items_in_batch, with 1/n
    applied in the kernel): value and gradients equal the sum divided by n through every backward path
    — fused, a second backward (recomputed), create_graph (differentiable), an upstream gradient ≠ 1,
    the soft target's gradient — and gradcheck holds."""
    x, target, weight, eps, ignore_index = _build(case)
    n = torch.tensor(7) if divisor == "tensor" else divisor
    upstream = torch.tensor(0.37, dtype=torch.float64)
    inputs = [t for t in (x, target) if t.requires_grad]

    expected = smoothce.cross_entropy(x, target, weight, ignore_index, "sum", eps) / 7
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    loss = _divided(x, target, weight, eps, ignore_index, n)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, inputs, upstream, retain_graph=True)  # fused
    again = torch.autograd.grad(loss, inputs, upstream, retain_graph=True)  # recomputed
    differentiable = torch.autograd.grad(loss, inputs, upstream, create_graph=True)
    for got in (grads, again, differentiable):
        for g, e in zip(got, expected_grads):
            torch.testing.assert_close(g, e)
    if target.requires_grad:
        def fn(x, target):
            return _divided(x, target, weight, eps, ignore_index, n)
    else:
        def fn(x):
            return _divided(x, target, weight, eps, ignore_index, n)
    assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_divisor_with_inplace_backward_and_inference():
    x, target, weight, eps, ignore_index = _build("2d_eps_weight")
    expected = smoothce.cross_entropy(x, target, weight, ignore_index, "sum", eps) / 3
    (expected_grad,) = torch.autograd.grad(expected, x)
    logits = x.detach().clone().requires_grad_(True)
    view = logits * 1  # not a leaf: inplace_backward writes over it
    loss = _divided(view, target, weight, eps, ignore_index, 3, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad, expected_grad)
    with torch.no_grad():
        torch.testing.assert_close(_divided(x, target, weight, eps, ignore_index, 3), expected)


# An upstream gradient other than 1 (loss / k in gradient accumulation, loss * s). Half types: the
# gradient must be the one the kernel computes with that upstream gradient inside, each element
# rounded once. Scaling the fused gradient, already rounded to bf16/fp16, rounds twice (bf16,
# loss / 3: about a third of the elements 1 ulp off); that is exact only for powers of two, and not in
# fp16, whose subnormal gradients (below 6.1e-5) then change their rounding (2.0 put 37% of them off
# at (64, 300)). fp32 and fp64 rescale: within a few ulps of the kernel's own scaling. The C++ node serves
# index targets, the Python autograd.Function a probability target that requires grad.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("upstream", [1 / 3, 0.1, 3.0, 0.5, 2.0, -1.0, 1.0])
@pytest.mark.parametrize("case", ["rows", "map", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_gradient_rounds_once(dtype, upstream, case, reduction):
    from smoothce import _function

    shape = (2, 37, 5, 7) if case == "map" else (64, 300)
    C = shape[1]
    x = make_logits(shape, torch.float32, scale=4.0).to(dtype).requires_grad_(True)
    weight = make_weight(C, dtype)
    if case == "soft":
        target = make_prob_target(shape, dtype).requires_grad_(True)
    else:
        target = make_index_target(positions_shape(shape), C, ignore_every=5)
    loss = smoothce.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1)
    (loss * upstream).backward()
    _, _, expected = _function._ops.forward(
        x.detach(), target.detach(), weight, -100, _function.REDUCTIONS[reduction], 0.1, True, False,
        torch.tensor(upstream, dtype=loss.dtype))
    assert x.grad.dtype == dtype
    if dtype in (torch.float32, torch.float64):  # the rescale's rounding, and the kernel's scaled coefficients
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(x.grad, expected, rtol=4 * eps, atol=4 * eps * expected.abs().max().item())
        return
    mismatched = (x.grad != expected).sum().item()
    assert mismatched == 0, f"{mismatched} of {x.numel()} gradient elements differ from the kernel's own scaling"


def _backward_work(backward):
    """What `backward()` ran of the gradient's ops: ("recompute" where it ran the forward op again, "rescale"
    where it scaled the fused gradient in place), as a set."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        backward()
    names = {event.name.split("::")[-1] for event in prof.events()}
    return {work for op, work in (("forward", "recompute"), ("scale_grad_", "rescale")) if op in names}


class _Guess:
    """The C++ node's guess of the upstream gradient (csrc/autograd.cpp, g_expected_scale), as the tests
    expect it: what a fused forward scales its gradient by, and what its backward then does."""

    def __init__(self, dtype):
        self.dtype, self.guess, self.last = dtype, 1.0, 1.0  # (conftest's fresh_upstream_guess)

    def forward_scale(self):
        s = self.guess
        if self.dtype in (torch.float32, torch.float64):  # powers of two within 2^±64
            return s if math.frexp(s)[0] == 0.5 and 2.0 ** -64 <= s <= 2.0 ** 64 else 1.0
        return s

    def backward(self, used, g):
        """The work ("recompute", "rescale") a backward that receives g does after a forward that used
        `used`; then the guess learns g: it becomes the guess where the last backward received it too."""
        half = self.dtype in (torch.bfloat16, torch.float16)
        if g == used:
            work = set()
        elif not half:
            work = {"rescale"}
        elif used == 1.0 and self.dtype == torch.bfloat16 and math.frexp(g)[0] == 0.5:
            work = {"rescale"}
        else:
            work = {"recompute"}
        if math.isfinite(g) and g > 0:
            self.guess = g if g == self.last else 1.0
            self.last = g
        return work


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d)[6:])
def test_fused_gradient_for_a_guessed_upstream_gradient(dtype):
    """In eager mode on CPU, a fused forward scales its gradient inside the kernel by the upstream
    gradient the last two backwards received, where they received the same (fp32, fp64: a power of two
    within 2^±64), and a backward that gets that one does nothing more: a loop that scales its loss the
    same way at every step (loss / k) pays no recompute or rescale. Another one is recomputed (half
    types) or rescaled. The bits are the same either way: the kernel's own scaling (half types), the
    rescale of the kernel's gradient for 1 (fp32, fp64). Zero, negative and non-finite upstream
    gradients are not guessed; upstream gradients taking turns leave the guess at 1."""
    from smoothce import _function

    x = make_logits((64, 300), torch.float32, scale=4.0).to(dtype)
    target = make_index_target((64,), 300, ignore_every=5)
    half = dtype in (torch.bfloat16, torch.float16)
    model = _Guess(dtype)

    def kernel(upstream):
        return _function._ops.forward(x, target, None, -100, 1, 0.1, True, False,
                                      torch.tensor(upstream, dtype=dtype))[2]

    hits = 0
    steady = [0.3] * 3 + [0.5] * 3 + [1.0] * 2 + [4.0] * 3 + [0.125] * 3
    bounds = [2.0 ** -64] * 3 + [2.0 ** -65] * 3 + [2.0 ** 64] * 3 + [2.0 ** 65] * 3
    turns = [0.5, 1.0] * 3 + [0.3, 0.7] * 2
    unusable = [0.125] * 2 + [0.0, 0.125, float("nan"), 0.125, float("inf"), 0.125, -0.5, 0.125, -0.3, 0.125]
    for upstream in steady + bounds + turns + unusable:
        upstream = torch.tensor(upstream, dtype=dtype).item()  # (the loss's dtype: fp16's 2^±64 are 0 and inf)
        used = model.forward_scale()
        leaf = x.clone().requires_grad_(True)
        loss = smoothce.cross_entropy(leaf, target, label_smoothing=0.1) * upstream
        work = _backward_work(loss.backward)
        expected_work = model.backward(used, upstream)
        assert work == expected_work, (upstream, used, work)
        hits += not work
        # (a rescale of the gradient for 1 by a negative upstream gradient also turns its zeros into -0)
        expected = kernel(upstream) if half and work != {"rescale"} else kernel(1.0) * upstream
        if half and not math.isfinite(upstream):
            continue  # (the kernel's own scaling by inf or NaN: not compared)
        assert torch.equal(leaf.grad.nan_to_num(7.0), expected.nan_to_num(7.0)), upstream
        assert torch.equal(leaf.grad.signbit(), expected.signbit()), upstream
    assert hits >= 8  # (steady upstream gradients hit from their third step on)
    if not half:  # what an fp32/fp64 guess relies on (fp16's subnormal gradients round again)
        assert torch.equal(kernel(0.125), kernel(1.0) * 0.125)


# Why the fp32/fp64 guess keeps the rescale's bits: the kernels' gradient for an upstream gradient 2^k is
# 2^k times their gradient for 1, bit for bit (every rounded step is scaled exactly), on every loop
# shape and variant, for elements that stay normal.
GUESS_SHAPES = {"rows": (64, 300), "small_rows": (50, 10), "map": (2, 21, 16, 16), "map_wide": (2, 21, 64, 64),
                "map_150": (1, 150, 9, 11), "large_vocab": (4, 40000), "unbatched": (300,)}


@pytest.mark.parametrize("variant", ["plain", "weight", "z_loss", "target_values", "soft", "mixup"])
@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", sorted(GUESS_SHAPES))
def test_kernel_scales_exactly_by_powers_of_two(shape, dtype, reduction, variant):
    from smoothce import _function

    shape = GUESS_SHAPES[shape]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype, scale=5.0)
    target = make_index_target(positions_shape(shape), C, ignore_every=7)
    weight, eps = None, 0.1
    extra = {}
    if variant == "weight":
        weight = make_weight(C, dtype)
    elif variant == "z_loss":
        extra["z_loss"] = 1e-3
    elif variant == "target_values":
        extra["target_values"], eps = (0.8, 0.01), 0.0
    elif variant == "soft":
        target = make_prob_target(shape, dtype)
    elif variant == "mixup":
        extra["target_b"], extra["lam_value"] = make_index_target(positions_shape(shape), C, seed=4), 0.3
    one = _function._ops.forward(x, target, weight, -100, reduction, eps, True, False, **extra)[2]
    for scale in (0.5, 2.0, -0.25, 2.0 ** -20, 2.0 ** 20):
        scaled = _function._ops.forward(x, target, weight, -100, reduction, eps, True, False,
                                        torch.tensor(scale, dtype=dtype), **extra)[2]
        assert torch.equal(scaled, one * scale), scale
