"""Property test: random shapes, dtypes, layouts and options against the float64 reference."""
import torch
from hypothesis import given, settings, strategies as st

import smoothce
from conftest import check_all, make_logits, make_prob_target, make_weight, run_all


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 4))
    C = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 16, 17, 64, 257]), st.integers(1, 300)))
    if ndim == 1:
        shape = (C,)
    else:
        N = draw(st.integers(0, 6))
        shape = (N, C) + tuple(draw(st.integers(1, 4)) for _ in range(ndim - 2))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        eps=draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0))),
        weighted=draw(st.booleans()),
        soft=draw(st.booleans()),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        ignore_index=draw(st.sampled_from([-100, 0, 255])),
        layout=draw(st.sampled_from(["contiguous", "permuted", "strided"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(shape, layout):
    """(leaf shape, view) producing `shape` with the requested memory layout."""
    if layout == "contiguous":
        return shape, None
    if layout == "strided":  # every other element along the last dim
        leaf = shape[:-1] + (2 * shape[-1],)
        return leaf, lambda t: t[..., ::2]
    if len(shape) == 1:
        return (shape[0], 2), lambda t: t[:, 1]
    leaf = shape[:1] + shape[2:] + shape[1:2]  # classes last, then moved to dim 1
    return leaf, lambda t: t.movedim(-1, 1)


def _inputs(p):
    """(C, generator, view, logits, positions' shape) of a drawn problem."""
    shape = p["shape"]
    leaf_shape, view = _layout(shape, p["layout"])
    x = make_logits(leaf_shape, p["dtype"], seed=p["seed"])
    C = shape[0] if len(shape) == 1 else shape[1]
    pos = shape[1:] if len(shape) == 1 else shape[:1] + shape[2:]
    return C, torch.Generator().manual_seed(p["seed"]), view, x, pos


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_problems(p):
    shape, dtype = p["shape"], p["dtype"]
    C, g, view, x, pos = _inputs(p)
    kwargs = dict(reduction=p["reduction"], label_smoothing=p["eps"])
    if p["soft"]:
        target = make_prob_target(shape, dtype, seed=p["seed"] + 1)
    else:
        target = torch.randint(0, C, pos, generator=g)
        ignored = torch.rand(pos, generator=g) < p["ignore_frac"]
        target[ignored] = p["ignore_index"]
        kwargs["ignore_index"] = p["ignore_index"]
    weight = make_weight(C, dtype, seed=p["seed"] + 2) if p["weighted"] else None
    upstream = None
    if p["reduction"] == "none":
        upstream = torch.randn(pos, generator=g, dtype=torch.float64)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, weight=weight, view=view,
                                  upstream=upstream, target_requires_grad=p["soft"], **kwargs)
    check_all(mine, theirs, truth, dtype, check_target_grad=p["soft"])


@st.composite
def variant_problems(draw):
    """Random option sets of docs/semantics.md §3 (index targets): smoothing, target values, z-loss,
    mixup, in-place."""
    p = draw(problems())
    p["soft"] = False
    kind = draw(st.sampled_from(["uniform", "others", "values"]))
    p["options"] = {}
    if kind == "others":
        p["options"]["smoothing"] = "others"
    elif kind == "values":
        p["eps"] = 0.0
        p["options"]["target_values"] = (draw(st.floats(0.0, 2.0)), draw(st.floats(0.0, 0.5)))
    p["options"]["z_loss"] = draw(st.sampled_from([0.0, 1e-4, 0.1]))
    p["mixup"] = draw(st.sampled_from([None, "float", "tensor"])) if len(p["shape"]) > 1 else None
    p["inplace"] = draw(st.booleans())
    return p


@settings(max_examples=60, deadline=None)
@given(variant_problems())
def test_random_variants(p):
    """Loss and input gradient of random option sets against the float64 reference (in-place or not)."""
    dtype = p["dtype"]
    C, g, view, x, pos = _inputs(p)

    def index_target():
        t = torch.randint(0, C, pos, generator=g)
        t[torch.rand(pos, generator=g) < p["ignore_frac"]] = p["ignore_index"]
        return t

    target = index_target()
    kwargs = dict(reduction=p["reduction"], label_smoothing=p["eps"], ignore_index=p["ignore_index"], **p["options"])
    weight = make_weight(C, dtype, seed=p["seed"] + 2) if p["weighted"] else None
    mixup = ()
    if p["mixup"] is not None:
        lam = (torch.rand(pos, generator=g, dtype=torch.float64) if p["mixup"] == "tensor"
               else float(torch.rand((), generator=g)))
        mixup = (index_target(), lam)
    upstream = torch.randn(pos, generator=g, dtype=torch.float64) if p["reduction"] == "none" else None

    def loss_of(module, inp, w, **extra):
        args = (inp, target) + mixup if mixup else (inp, target)
        fn = module.mixup_cross_entropy if mixup else module.cross_entropy
        return fn(*args, weight=w, **kwargs, **extra)

    leaf = x.detach().clone().requires_grad_(True)
    logits = leaf * 1  # a non-leaf: inplace_backward writes over it
    logits = view(logits) if view is not None else logits
    loss = loss_of(smoothce, logits, weight, inplace_backward=p["inplace"])
    loss.backward((upstream if upstream is not None else torch.ones(())).to(loss.dtype))

    leaf64 = x.detach().double().requires_grad_(True)
    inp64 = view(leaf64) if view is not None else leaf64
    truth = loss_of(smoothce.reference, inp64, weight.double() if weight is not None else None)
    truth.backward(upstream if upstream is not None else torch.ones((), dtype=torch.float64))
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for name, mine, exact in (("loss", loss.detach(), truth.detach()), ("grad", leaf.grad, leaf64.grad)):
        both_nan = torch.isnan(mine.double()) & torch.isnan(exact)
        finite = exact[torch.isfinite(exact)]
        scale = finite.abs().max().clamp_min(1.0) if finite.numel() else 1.0
        err = torch.where(both_nan, 0.0, (mine.double() - exact).abs())
        assert err.numel() == 0 or err.max() <= tol * scale, f"{name}: error {err.max():.3g}, scale {scale:.3g}"
