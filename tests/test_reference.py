"""The oracle itself: smoothce.reference against torch.nn.functional.cross_entropy.

Needs only torch (runs before the extension is built). Where docs/semantics.md §1.4 lists a
deliberate difference from torch, the test checks the documented behaviour instead.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (ERRORS, REDUCTIONS, make_index_target, make_logits, make_prob_target,
                      make_weight, num_classes, positions_shape, ref)

SHAPES = [(6, 7), (7,), (3, 7, 4, 5), (2, 7, 3, 2, 2), (0, 7), (4, 1)]


def _both(fn_args, x, target, upstream_seed=5, **kw):
    out = []
    for fn in (ref.cross_entropy, F.cross_entropy):
        leaf = x.detach().clone().requires_grad_(True)
        tgt = target.detach().clone().requires_grad_(True) if target.is_floating_point() else target
        loss = fn(leaf, tgt, **kw)
        g = torch.Generator().manual_seed(upstream_seed)
        up = torch.rand(loss.shape, generator=g, dtype=loss.dtype) + 0.5
        loss.backward(up)
        out.append((loss.detach(), leaf.grad, tgt.grad if target.is_floating_point() else None))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
def test_reference_matches_torch_float64(shape, reduction, eps, weighted, soft):
    C = num_classes(shape)
    x = make_logits(shape, torch.float64)
    w = make_weight(C, torch.float64) if weighted else None
    if soft:
        target = make_prob_target(shape, torch.float64)
    else:
        target = make_index_target(positions_shape(shape), C, ignore_every=3)
    (l1, g1, tg1), (l2, g2, tg2) = _both(None, x, target, weight=w, reduction=reduction,
                                         label_smoothing=eps)
    assert l1.dtype == l2.dtype == torch.float64
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    if soft:
        torch.testing.assert_close(tg1, tg2, rtol=1e-12, atol=1e-12)


# fp16 with eps > 0 is left out: torch overflows there (★), see test_reference_fp16_smoothing_finite.
@pytest.mark.parametrize("dtype,eps", [(torch.float32, 0.0), (torch.float32, 0.1),
                                       (torch.bfloat16, 0.0), (torch.bfloat16, 0.1),
                                       (torch.float16, 0.0)], ids=str)
def test_reference_low_precision_close_to_torch(dtype, eps):
    x = make_logits((16, 50), dtype)
    t = make_index_target((16,), 50, ignore_every=5)
    (l1, g1, _), (l2, g2, _) = _both(None, x, t, reduction="sum", label_smoothing=eps)
    assert l1.dtype == g1.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(l1, l2, rtol=tol, atol=tol)
    torch.testing.assert_close(g1, g2, rtol=tol, atol=tol)


def test_reference_ignore_index_positive_and_uint8():
    x = make_logits((12, 9), torch.float64)
    t = make_index_target((12,), 9)
    t[::4] = 4
    for reduction in REDUCTIONS:
        a = ref.cross_entropy(x, t, ignore_index=4, reduction=reduction, label_smoothing=0.2)
        b = F.cross_entropy(x, t, ignore_index=4, reduction=reduction, label_smoothing=0.2)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        a8 = ref.cross_entropy(x, t.to(torch.uint8), ignore_index=4, reduction=reduction)
        b8 = F.cross_entropy(x, t.to(torch.uint8), ignore_index=4, reduction=reduction)
        torch.testing.assert_close(a8, b8, rtol=1e-12, atol=1e-12)
    # uint8 targets can never equal -100; the reference must not wrap -100 to 156.
    t8 = torch.full((12,), 156 % 9, dtype=torch.uint8)
    torch.testing.assert_close(ref.cross_entropy(x, t8), F.cross_entropy(x, t8), rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_all_ignored_and_empty(reduction):
    for x, t in [(make_logits((4, 5), torch.float64), torch.full((4,), -100)),
                 (make_logits((0, 5), torch.float64), torch.zeros(0, dtype=torch.int64))]:
        for eps in (0.0, 0.3):
            (l1, g1, _), (l2, g2, _) = _both(None, x, t, reduction=reduction, label_smoothing=eps)
            torch.testing.assert_close(l1, l2, equal_nan=True)
            torch.testing.assert_close(g1, g2)
            assert torch.count_nonzero(g1) == 0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_reference_neg_inf_logits(eps):
    x = make_logits((5, 8), torch.float64)
    x[:, 3] = -math.inf
    t = torch.tensor([0, 1, 2, 4, 7])
    (l1, g1, _), (l2, g2, _) = _both(None, x, t, reduction="mean", label_smoothing=eps)
    assert (math.isinf(l1.item()) and l1.item() > 0) if eps > 0 else math.isfinite(l1.item())
    torch.testing.assert_close(l1, l2)
    assert g1.isfinite().all()
    torch.testing.assert_close(g1, g2)
    if eps == 0:
        assert torch.count_nonzero(g1[:, 3]) == 0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_reference_nonfinite_logit_rows_are_nan(eps):
    x = make_logits((5, 6), torch.float64)
    x[1, 2] = math.inf   # +inf off the target
    x[3, 0] = math.nan
    x[4, 4] = math.inf   # +inf at the target
    t = torch.tensor([0, 1, 2, 3, 4])
    loss = ref.cross_entropy(x, t, reduction="none", label_smoothing=eps)
    assert loss[[1, 3, 4]].isnan().all() and loss[[0, 2]].isfinite().all()
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="none", label_smoothing=eps),
                               equal_nan=True)


def test_reference_fp16_smoothing_finite():
    """docs/semantics.md §1.4 (item 3): torch's fp16 smoothing sum overflows (64 x 3000); the
    reference accumulates in fp32."""
    x = make_logits((64, 3000), torch.float16)
    t = make_index_target((64,), 3000)
    assert not F.cross_entropy(x, t, label_smoothing=0.1).isfinite(), "torch no longer overflows?"
    loss = ref.cross_entropy(x, t, label_smoothing=0.1)
    truth = ref.cross_entropy(x.double(), t, label_smoothing=0.1)
    assert loss.dtype == torch.float16 and loss.isfinite()
    torch.testing.assert_close(loss.double(), truth, rtol=2e-3, atol=0)


@pytest.mark.parametrize("bad", [-0.1, -1e-9, math.nan, 1.0001, 2.0, math.inf])
def test_reference_rejects_label_smoothing(bad):
    x, t = make_logits((3, 4)), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"label_smoothing.*expected a float in \[0, 1\]") as info:
        ref.cross_entropy(x, t, label_smoothing=bad)
    assert str(bad) in str(info.value)


def test_reference_errors():
    x = make_logits((3, 4))
    t = torch.tensor([0, 1, 2])
    cases = [
        (dict(input=x, target=torch.tensor([0, 1])), "target", None),
        (dict(input=x, target=torch.tensor([0, 4, 1])), "target", "4"),
        (dict(input=x, target=torch.tensor([0, -3, 1])), "target", "-3"),
        (dict(input=x, target=t, weight=torch.ones(5)), "weight", "5"),
        (dict(input=x, target=t, weight=torch.ones(4, dtype=torch.float64)), "weight", "float64"),
        (dict(input=x, target=t, weight=torch.ones(1, 4)), "weight", None),
        (dict(input=x, target=t.int()), "target", "int32"),
        (dict(input=x, target=torch.rand(3, 4), ignore_index=0), "ignore_index", "0"),
        (dict(input=x.long(), target=t), "input", "int64"),
        (dict(input=x, target=t, reduction="avg"), "reduction", "avg"),
        (dict(input=torch.tensor(1.0), target=torch.tensor(0)), "input", None),
        (dict(input=x, target=torch.rand(3, 5)), "target", None),
    ]
    for kwargs, name, value in cases:
        with pytest.raises(ERRORS, match=f"(?i){name}") as info:
            ref.cross_entropy(**kwargs)
        if value is not None:
            assert value in str(info.value), (name, str(info.value))
