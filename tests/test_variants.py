"""The label-smoothing variants of docs/semantics.md §3 and the published losses of its §3.5.

- every keyword (smoothing="others", target_values, z_loss, inplace_backward) and mixup_cross_entropy
  against the float64 reference (smoothce.reference), values and input gradients, over shapes, dtypes,
  reductions, weights and ignore_index;
- each published definition of §3.5 written out here in plain PyTorch (float64 autograd) against smoothce;
- mixup specifics (lam float / per sample / per pixel, edge values, identical targets, ignored targets,
  linearity in lam), "others" with C = 1 and C = 2, target_values with off = 0;
- gradcheck, torch.compile(fullgraph=True), CrossEntropyLoss with the options.

Accuracy rule of this file: max|got - truth| <= RTOL[dtype] x max|truth| (per tensor, truth in float64).
test_tolerance_rejects_wrong_formula shows that this rule fails the plausible wrong formulas (ε/C in place
of ε/(C-1), a forgotten z-loss, mixup's mean over positions, lam and 1 - lam swapped) in every dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import smoothce
from conftest import (DTYPES, REDUCTIONS, dtype_id, make_index_target, make_logits, make_prob_target,
                      make_weight, positions_shape, ref, run, run_truth)

# max|error| allowed, relative to max|truth| of the tensor compared. Observed errors (CPU and emulated
# CUDA kernels): fp64 ~5e-16, fp32 ~2e-7, fp16 ~4e-4, bf16 ~3e-3 (the output's own rounding: ½ ulp of
# the largest element is 4.9e-4 in fp16, 3.9e-3 in bf16).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

SHAPES = [((16, 37), -100), ((2, 11, 3, 5), 3)]  # (input shape, ignore_index); 3 is also a real class
SHAPE_IDS = ["NC", "NCHW"]


def assert_near(actual, truth, dtype, what="value"):
    """max|actual - truth| <= RTOL[dtype] x max|truth|; shapes equal; NaN where and only where the truth has one."""
    assert actual is not None, f"{what}: missing (no gradient?)"
    assert tuple(actual.shape) == tuple(truth.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    a = actual.detach().double()
    t = truth.detach().double()
    assert torch.equal(a.isnan(), t.isnan()), f"{what}: NaN pattern differs: got {a}, expected {t}"
    finite = ~t.isnan()
    a, t = a[finite], t[finite]
    if t.numel() == 0:
        return
    assert a.isfinite().all(), f"{what}: non-finite {a[~a.isfinite()][:5].tolist()}"
    scale = t.abs().max().item() or 1.0
    err = (a - t).abs()
    worst = err.argmax()
    assert err.max().item() <= RTOL[dtype] * scale, (
        f"{what} ({dtype_id(dtype)}): max |error| {err.max().item():.3e} > {RTOL[dtype]:.0e} x max|truth| "
        f"{scale:.3e}; worst at flat index {worst.item()}: got {a[worst].item()!r}, truth {t[worst].item()!r}")


def check(mine, truth, dtype):
    """(loss, grad, _) of smoothce in `dtype` against the float64 truth (loss, grad, _)."""
    loss, grad = mine[0], mine[1]
    assert loss.dtype == dtype, f"loss dtype {loss.dtype}, expected {dtype}"
    assert grad is not None and grad.dtype == dtype, f"grad {None if grad is None else grad.dtype}, expected {dtype}"
    assert_near(loss, truth[0], dtype, "loss")
    assert_near(grad, truth[1], dtype, "input grad")


def upstream_for(reduction, pos_shape, seed=11):
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(pos_shape, generator=g, dtype=torch.float64) * 2 - 0.5
    return torch.tensor(1.0 if reduction == "mean" else 2.5, dtype=torch.float64)


def non_leaf(leaf):
    """inplace_backward needs logits that are not a leaf: the output of a (trivial) layer."""
    return leaf * 1


def as_mixup(fn, target_b, lam):
    """fn(input, a, b, lam, weight=..., **kw) as run()'s fn(input, target, weight=..., **kw)."""
    def call(inp, tgt, weight=None, **kwargs):
        return fn(inp, tgt, target_b, lam, weight=weight, **kwargs)
    return call


def run_mixup(x, a, b, lam, **kwargs):
    return run(as_mixup(smoothce.mixup_cross_entropy, b, lam), x, a, **kwargs)


def run_mixup_truth(x, a, b, lam, *, weight=None, upstream=None, **kwargs):
    lam64 = lam.double() if isinstance(lam, torch.Tensor) else lam
    return run(as_mixup(ref.mixup_cross_entropy, b, lam64), x.double(), a,
               weight=None if weight is None else weight.double(),
               upstream=None if upstream is None else upstream.double(), **kwargs)


def class_last(t):
    """(N, C, ...) -> (..., C) so that a boolean mask over positions selects rows of classes."""
    return t.movedim(1, -1)


def assert_ignored_exactly_zero(loss, grad, valid, reduction):
    """docs/semantics.md §2.1, §2.4: positions that contribute nothing get an exact 0 loss (none) and
    exact 0 gradient."""
    dead = ~valid
    if reduction == "none":
        assert torch.count_nonzero(loss[dead]) == 0, f"ignored positions: loss {loss[dead].tolist()}"
    assert torch.count_nonzero(class_last(grad)[dead]) == 0, "ignored positions have a nonzero gradient"


# ------------------------------------------------------------------ 1. each option against the reference

OPTIONS = {
    "others": dict(smoothing="others", label_smoothing=0.2),
    "others_eps1": dict(smoothing="others", label_smoothing=1.0),
    "values": dict(target_values=(0.8, 0.05)),
    "values_off0": dict(target_values=(1.5, 0.0)),
    "values_unnormalized": dict(target_values=(0.3, 0.2)),
    "zloss": dict(z_loss=0.05),
    "zloss_uniform": dict(z_loss=1e-2, label_smoothing=0.1),
    "zloss_others": dict(z_loss=1e-3, smoothing="others", label_smoothing=0.3),
    "zloss_values": dict(z_loss=1e-2, target_values=(0.9, 0.01)),
    "inplace": dict(label_smoothing=0.1, inplace_backward=True),
    "inplace_all": dict(smoothing="others", label_smoothing=0.1, z_loss=1e-2, inplace_backward=True),
    "inplace_values": dict(target_values=(0.7, 0.03), z_loss=1e-3, inplace_backward=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,ignore_index", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_matches_reference(option, shape, ignore_index, reduction, weighted, dtype):
    kwargs = dict(OPTIONS[option])
    C = shape[1]
    x = make_logits(shape, dtype, seed=C)
    t = make_index_target(positions_shape(shape), C, ignore_every=4, ignore_index=ignore_index)
    w = make_weight(C, dtype) if weighted else None
    up = upstream_for(reduction, t.shape)
    view = non_leaf if kwargs.get("inplace_backward") else None
    common = dict(weight=w, upstream=up, view=view, ignore_index=ignore_index, reduction=reduction, **kwargs)
    mine = run(smoothce.cross_entropy, x, t, **common)
    truth = run_truth(x, t, **common)
    check(mine, truth, dtype)
    assert_ignored_exactly_zero(mine[0], mine[1], t != ignore_index, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("option", ["others", "values", "zloss_uniform", "inplace_all"])
def test_option_large_C(option, dtype):
    C = 3001
    kwargs = dict(OPTIONS[option])
    x = make_logits((6, C), dtype, seed=5)
    t = make_index_target((6,), C, ignore_every=5)
    w = make_weight(C, dtype)
    view = non_leaf if kwargs.get("inplace_backward") else None
    mine = run(smoothce.cross_entropy, x, t, weight=w, view=view, **kwargs)
    check(mine, run_truth(x, t, weight=w, view=view, **kwargs), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("option", ["others", "values", "zloss_uniform"])
def test_option_uint8_targets_and_unbatched(option, dtype):
    kwargs = OPTIONS[option]
    C = 9
    x = make_logits((7, C), dtype)
    t = make_index_target((7,), C)
    mine = run(smoothce.cross_entropy, x, t.to(torch.uint8), **kwargs)
    check(mine, run_truth(x, t, **kwargs), dtype)
    # (C,) input with a 0-d target
    mine = run(smoothce.cross_entropy, x[2], t[2], **kwargs)
    check(mine, run_truth(x[2], t[2], **kwargs), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
@pytest.mark.parametrize("option", ["others", "zloss_values", "inplace_all"])
def test_option_non_contiguous_logits(option, layout, dtype):
    """Strided logits (a transposed (N, C), a channels_last (N, C, H, W)), the in-place gradient included."""
    kwargs = OPTIONS[option]
    C = 11
    inplace = kwargs.get("inplace_backward", False)
    if layout == "transposed":
        leaf_x = make_logits((C, 9), dtype)  # the leaf is (C, N); the input its transpose
        t = make_index_target((9,), C, ignore_every=4)

        def view(leaf):
            return leaf.t() * 1 if inplace else leaf.t()
    else:
        leaf_x = make_logits((2, C, 3, 4), dtype)
        t = make_index_target((2, 3, 4), C, ignore_every=4)

        def view(leaf):
            out = leaf.contiguous(memory_format=torch.channels_last)
            return out * 1 if inplace else out
    w = make_weight(C, dtype)
    mine = run(smoothce.cross_entropy, leaf_x, t, weight=w, view=view, reduction="sum", **kwargs)
    check(mine, run_truth(leaf_x, t, weight=w, view=view, reduction="sum", **kwargs), dtype)


def test_options_change_the_result():
    """Each keyword is actually applied: the results differ from plain smoothing."""
    x = make_logits((8, 10))
    t = make_index_target((8,), 10)
    plain = smoothce.cross_entropy(x, t, label_smoothing=0.2)
    for kwargs in (dict(smoothing="others", label_smoothing=0.2), dict(target_values=(0.8, 0.02)),
                   dict(label_smoothing=0.2, z_loss=1e-2)):
        assert abs(smoothce.cross_entropy(x, t, **kwargs).item() - plain.item()) > 1e-3 * plain.item(), kwargs


# ------------------------------------------------------------ the tolerance check fails wrong formulas

def _plain_q(t, C, on, off, ignore_index=-100):
    valid = t != ignore_index
    onehot = F.one_hot(torch.where(valid, t, 0), C).double()
    q = on * onehot + off * (1 - onehot)
    return class_last_inverse(q * valid.unsqueeze(-1))


def class_last_inverse(q):
    """(..., C) -> (N, C, ...)"""
    return q.movedim(-1, 1) if q.dim() > 2 else q


def _plain_loss(x, q, weight=None, z_loss=0.0, mass=None, denom=None, reduction="mean"):
    """-Σ_c w_c q_c lp_c + z_loss·mass·lse² per position, reduced (mean: Σ / denom)."""
    lp = F.log_softmax(x, dim=1)
    w = torch.ones(x.shape[1], dtype=x.dtype) if weight is None else weight
    wshape = [1] * x.dim()
    wshape[1] = -1
    loss = -(w.view(wshape) * q * lp).sum(1)
    if z_loss:
        loss = loss + z_loss * mass * torch.logsumexp(x, dim=1) ** 2
    if reduction == "none":
        return loss
    return loss.sum() / denom if reduction == "mean" else loss.sum()


def _formula_pair(kind, dtype):
    """(smoothce's loss, the right plain-PyTorch formula, a plausible wrong one, x, t): functions of
    (input, target) for a wrong-formula kind."""
    C, N = 5, 12
    eps = 0.4
    x = make_logits((N, C), dtype, seed=21)
    t = make_index_target((N,), C, seed=22)
    if kind == "others_as_uniform":
        t = x.double().argmax(dim=1)  # confident predictions: there the two formulas' values differ clearly
    w = make_weight(C, dtype, seed=23)
    w64 = w.double()  # the weights smoothce sees, in float64

    def others(inp, tgt):
        return smoothce.cross_entropy(inp, tgt, smoothing="others", label_smoothing=eps)

    def others_right(inp, tgt):
        return _plain_loss(inp, _plain_q(tgt, C, 1 - eps, eps / (C - 1)), denom=N)

    if kind == "others_eps_over_C":
        def others_eps_over_C(inp, tgt):
            return _plain_loss(inp, _plain_q(tgt, C, 1 - eps, eps / C), denom=N)
        return others, others_right, others_eps_over_C, x, t
    if kind == "others_as_uniform":
        return others, others_right, lambda inp, tgt: F.cross_entropy(inp, tgt, label_smoothing=eps), x, t
    if kind == "z_loss_forgotten":
        def z_right(inp, tgt):
            mass = torch.ones(N, dtype=torch.float64)
            return _plain_loss(inp, _plain_q(tgt, C, 1, 0), z_loss=0.05, mass=mass, denom=N)
        return lambda inp, tgt: smoothce.cross_entropy(inp, tgt, z_loss=0.05), z_right, F.cross_entropy, x, t

    b, lam, off = t.flip(0), 0.3, 0.1 / C  # mixup with uniform smoothing ε = 0.1: (on, off) = (0.9 + off, off)

    def mix(inp, tgt, lam_, denom):
        q = lam_ * _plain_q(tgt, C, 0.9 + off, off) + (1 - lam_) * _plain_q(b, C, 0.9 + off, off)
        return _plain_loss(inp, q, weight=w64, denom=denom)

    def mixup(inp, tgt):
        return smoothce.mixup_cross_entropy(inp, tgt, b, lam, w, label_smoothing=0.1)

    def mix_right(inp, tgt):
        return mix(inp, tgt, lam, (lam * w64[tgt] + (1 - lam) * w64[b]).sum())

    def mix_swapped(inp, tgt):
        return mix(inp, tgt, 1 - lam, ((1 - lam) * w64[tgt] + lam * w64[b]).sum())

    if kind == "mixup_mean_over_positions":
        return mixup, mix_right, lambda inp, tgt: mix(inp, tgt, lam, N), x, t
    if kind == "mixup_lam_swapped":
        return mixup, mix_right, mix_swapped, x, t
    raise AssertionError(kind)


WRONG_FORMULAS = ["others_eps_over_C", "others_as_uniform", "z_loss_forgotten", "mixup_mean_over_positions",
                  "mixup_lam_swapped"]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", WRONG_FORMULAS)
def test_tolerance_rejects_wrong_formula(kind, dtype):
    """The tests can fail: the RTOL check passes the right plain-PyTorch formula and fails a plausible
    wrong one (on the value and on the gradient separately), in every dtype."""
    fn, good, bad, x, t = _formula_pair(kind, dtype)

    def as_run(f):
        return lambda inp, tgt, weight=None: f(inp, tgt)

    mine = run(as_run(fn), x, t)
    check(mine, run(as_run(good), x.double(), t), dtype)
    wrong = run(as_run(bad), x.double(), t)
    with pytest.raises(AssertionError, match="max .error."):
        assert_near(mine[0], wrong[0], dtype, "loss vs wrong formula")
    with pytest.raises(AssertionError, match="max .error."):
        assert_near(mine[1], wrong[1], dtype, "grad vs wrong formula")


# ------------------------------------------- 2. the published definitions (docs/semantics.md §3.5)
# Each written as its authors publish it, in plain PyTorch, evaluated in float64 with autograd.

def fastai_label_smoothing_ce(x, target, eps):
    """fastai / timm LabelSmoothingCrossEntropy(ε) (2-D, mean)."""
    lp = F.log_softmax(x, dim=-1)
    nll = F.nll_loss(lp, target)
    smooth = (-lp).mean(dim=-1).mean()
    return (1 - eps) * nll + eps * smooth


def tf_label_smoothing_ce(x, target, eps):
    """TensorFlow-style: labels = onehot·(1 − ε) + ε/C; −Σ_c labels·lp; mean over positions."""
    C = x.shape[1]
    labels = class_last_inverse(F.one_hot(target, C).to(x.dtype)) * (1 - eps) + eps / C
    return (-(labels * F.log_softmax(x, dim=1)).sum(dim=1)).mean()


def others_label_smoothing_ce(x, target, eps, reduction="mean"):
    """"ε to the other classes": q = 1 − ε at the target, ε/(C − 1) elsewhere."""
    C = x.shape[1]
    onehot = class_last_inverse(F.one_hot(target, C).to(x.dtype))
    q = onehot * (1 - eps) + (1 - onehot) * eps / (C - 1)
    loss = -(q * F.log_softmax(x, dim=1)).sum(dim=1)
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


class LabelSmoothSoftmaxCE(torch.nn.Module):
    """Segmentation label smoothing (pytorch-loss's LabelSmoothSoftmaxCE): lb_pos at the target, lb_neg
    elsewhere, ignored pixels (lb_ignore) contribute 0; mean = Σ loss / number of non-ignored pixels."""

    def __init__(self, lb_pos=0.9, lb_neg=0.005, reduction="mean", lb_ignore=255):
        super().__init__()
        self.lb_pos, self.lb_neg, self.reduction, self.lb_ignore = lb_pos, lb_neg, reduction, lb_ignore
        self.log_softmax = torch.nn.LogSoftmax(1)

    def forward(self, logits, label):
        num_classes = logits.size(1)
        label = label.clone().detach()
        ignore = label.eq(self.lb_ignore)
        n_valid = ignore.eq(0).sum()
        label[ignore] = 0
        lb_one_hot = torch.empty_like(logits).fill_(self.lb_neg).scatter_(1, label.unsqueeze(1), self.lb_pos).detach()
        lb_one_hot = lb_one_hot.masked_fill(ignore.unsqueeze(1).expand_as(lb_one_hot), 0)
        assert lb_one_hot.shape[1] == num_classes
        loss = -torch.sum(self.log_softmax(logits) * lb_one_hot, dim=1)
        loss[ignore] = 0
        if self.reduction == "mean":
            loss = loss.sum() / n_valid
        if self.reduction == "sum":
            loss = loss.sum()
        return loss


def timm_one_hot(x, num_classes, on_value=1.0, off_value=0.0):
    x = x.long().view(-1, 1)
    return torch.full((x.size()[0], num_classes), off_value, dtype=torch.float64).scatter_(1, x, on_value)


def timm_mixup_target(target, num_classes, lam=1.0, smoothing=0.0):
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = timm_one_hot(target, num_classes, on_value=on_value, off_value=off_value)
    y2 = timm_one_hot(target.flip(0), num_classes, on_value=on_value, off_value=off_value)
    return y1 * lam + y2 * (1.0 - lam)


def timm_soft_target_cross_entropy(x, target):
    loss = torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1)
    return loss.mean()


def palm_z_loss_ce(x, target, alpha, ignore_index=-100, reduction="mean"):
    """PaLM: CE + α·mean(lse²) (the z-loss over the positions the CE counts)."""
    ce = F.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction)
    z = torch.logsumexp(x, dim=1) ** 2
    valid = target != ignore_index
    z = z[valid].mean() if reduction == "mean" else z[valid].sum()
    return ce + alpha * z


def compare_published(dtype, x, target, mine_fn, published_fn):
    """smoothce on x (in dtype) against the published definition on float64 copies, values and grads."""
    mine = run(lambda inp, tgt, weight=None: mine_fn(inp, tgt), x, target)
    truth = run(lambda inp, tgt, weight=None: published_fn(inp, tgt), x.double(), target)
    check(mine, truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [10, 1000])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_published_fastai_timm_label_smoothing(eps, C, dtype):
    x = make_logits((12, C), dtype, seed=C)
    t = make_index_target((12,), C)
    compare_published(dtype, x, t, lambda inp, tgt: smoothce.cross_entropy(inp, tgt, label_smoothing=eps),
                      lambda inp, tgt: fastai_label_smoothing_ce(inp, tgt, eps))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(12, 10), (2, 7, 3, 4)], ids=SHAPE_IDS)
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_published_tensorflow_label_smoothing(eps, shape, dtype):
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), shape[1])
    compare_published(dtype, x, t, lambda inp, tgt: smoothce.cross_entropy(inp, tgt, label_smoothing=eps),
                      lambda inp, tgt: tf_label_smoothing_ce(inp, tgt, eps))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(12, 10), (2, 7, 3, 4)], ids=SHAPE_IDS)
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_published_eps_to_other_classes(eps, shape, reduction, dtype):
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), shape[1])
    compare_published(
        dtype, x, t,
        lambda inp, tgt: smoothce.cross_entropy(inp, tgt, reduction=reduction, smoothing="others", label_smoothing=eps),
        lambda inp, tgt: others_label_smoothing_ce(inp, tgt, eps, reduction))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lb", [(0.9, 0.005), (1 - 0.1, 0.1 / 19)], ids=["pos.9_neg.005", "pos.9_neg.1overC"])
def test_published_segmentation_label_smooth_softmax_ce(lb, reduction, dtype):
    C = 19
    x = make_logits((2, C, 4, 6), dtype)
    t = make_index_target((2, 4, 6), C, ignore_every=5, ignore_index=255)
    t[1, :2] = 255  # an ignored band
    published = LabelSmoothSoftmaxCE(lb_pos=lb[0], lb_neg=lb[1], reduction=reduction, lb_ignore=255)
    compare_published(
        dtype, x, t,
        lambda inp, tgt: smoothce.cross_entropy(inp, tgt, ignore_index=255, reduction=reduction, target_values=lb),
        published)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_published_timm_mixup_target(eps, lam, dtype):
    C, N = 100, 16
    x = make_logits((N, C), dtype)
    t = make_index_target((N,), C)
    compare_published(
        dtype, x, t,
        lambda inp, tgt: smoothce.mixup_cross_entropy(inp, tgt, tgt.flip(0), lam, label_smoothing=eps),
        lambda inp, tgt: timm_soft_target_cross_entropy(inp, timm_mixup_target(tgt, C, lam, eps)))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(12, 50), (2, 7, 3, 4)], ids=SHAPE_IDS)
@pytest.mark.parametrize("alpha", [1e-4, 1e-2])
@pytest.mark.parametrize("ignore", [False, True], ids=["all_valid", "ignored"])
def test_published_palm_z_loss(ignore, alpha, shape, reduction, dtype):
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), shape[1], ignore_every=3 if ignore else 0)
    compare_published(
        dtype, x, t,
        lambda inp, tgt: smoothce.cross_entropy(inp, tgt, reduction=reduction, z_loss=alpha),
        lambda inp, tgt: palm_z_loss_ce(inp, tgt, alpha, reduction=reduction))


# --------------------------------------------------------------------- 3. mixup against the reference

MIXUP_OPTIONS = {
    "plain": dict(),
    "eps": dict(label_smoothing=0.1),
    "others": dict(smoothing="others", label_smoothing=0.2),
    "values": dict(target_values=(0.8, 0.02)),
    "zloss_eps": dict(label_smoothing=0.1, z_loss=1e-2),
    "inplace_zloss": dict(label_smoothing=0.1, z_loss=1e-2, inplace_backward=True),
}

# (input shape, ignore_index, lam kind): per_sample is (N,) for (N, C) and (N, 1, 1) for (N, C, H, W)
MIXUP_CASES = [((16, 37), -100, "float"), ((16, 37), -100, "per_sample"),
               ((2, 11, 3, 5), 3, "float"), ((2, 11, 3, 5), 3, "per_sample"), ((2, 11, 3, 5), 3, "per_pixel")]
MIXUP_IDS = ["NC-float", "NC-per_sample", "NCHW-float", "NCHW-per_sample", "NCHW-per_pixel"]


def make_lam(kind, pos_shape, seed=31):
    if kind == "float":
        return 0.35
    g = torch.Generator().manual_seed(seed)
    shape = (pos_shape[0],) + (1,) * (len(pos_shape) - 1) if kind == "per_sample" else pos_shape
    lam = torch.rand(shape, generator=g, dtype=torch.float64)
    lam.view(-1)[0] = 0.0  # the edge values too
    lam.view(-1)[-1] = 1.0
    return lam.float()


def mixup_targets(pos_shape, C, ignore_index):
    a = make_index_target(pos_shape, C, seed=1, ignore_every=4, ignore_index=ignore_index)
    b = make_index_target(pos_shape, C, seed=2, ignore_every=6, ignore_index=ignore_index)
    b.view(-1)[1] = ignore_index  # a valid, b ignored; flat position 0: both ignored; 4: a ignored
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,ignore_index,lam_kind", MIXUP_CASES, ids=MIXUP_IDS)
@pytest.mark.parametrize("option", sorted(MIXUP_OPTIONS))
def test_mixup_matches_reference(option, shape, ignore_index, lam_kind, reduction, weighted, dtype):
    kwargs = dict(MIXUP_OPTIONS[option])
    C = shape[1]
    x = make_logits(shape, dtype, seed=C + 1)
    pos = positions_shape(shape)
    a, b = mixup_targets(pos, C, ignore_index)
    lam = make_lam(lam_kind, pos)
    w = make_weight(C, dtype) if weighted else None
    up = upstream_for(reduction, pos)
    view = non_leaf if kwargs.get("inplace_backward") else None
    common = dict(weight=w, upstream=up, view=view, ignore_index=ignore_index, reduction=reduction, **kwargs)
    mine = run_mixup(x, a, b, lam, **common)
    truth = run_mixup_truth(x, a, b, lam, **common)
    check(mine, truth, dtype)
    lam_full = torch.as_tensor(lam).expand(pos)
    contributes = ((a != ignore_index) & (lam_full > 0)) | ((b != ignore_index) & (lam_full < 1))
    assert_ignored_exactly_zero(mine[0], mine[1], contributes, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kwargs", [dict(label_smoothing=0.1),
                                    dict(smoothing="others", label_smoothing=0.1, z_loss=1e-3)],
                         ids=["eps", "others_zloss"])
def test_mixup_large_C(kwargs, dtype):
    C = 2003
    x = make_logits((6, C), dtype)
    a = make_index_target((6,), C, seed=1, ignore_every=4)
    b = make_index_target((6,), C, seed=2)
    lam = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, 0.3])
    w = make_weight(C, dtype)
    check(run_mixup(x, a, b, lam, weight=w, **kwargs), run_mixup_truth(x, a, b, lam, weight=w, **kwargs), dtype)


def _ce(x, t, **kwargs):
    return smoothce.cross_entropy(x, t, **kwargs)


MIXUP_EDGE_OPTIONS = [dict(), dict(label_smoothing=0.1), dict(smoothing="others", label_smoothing=0.2, z_loss=1e-2),
                      dict(target_values=(0.85, 0.01), z_loss=1e-3)]
MIXUP_EDGE_IDS = ["plain", "eps", "others_zloss", "values_zloss"]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kwargs", MIXUP_EDGE_OPTIONS, ids=MIXUP_EDGE_IDS)
@pytest.mark.parametrize("shape,ignore_index", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("lam_form", ["float", "tensor"])
def test_mixup_lam_edges_equal_plain_cross_entropy(lam_form, shape, ignore_index, kwargs, reduction, dtype):
    """lam = 1 is cross_entropy of target_a, lam = 0 that of target_b (ignored positions, weights, mean's D)."""
    C = shape[1]
    x = make_logits(shape, dtype, seed=3)
    pos = positions_shape(shape)
    a, b = mixup_targets(pos, C, ignore_index)
    w = make_weight(C, dtype)
    up = upstream_for(reduction, pos)
    common = dict(weight=w, upstream=up, ignore_index=ignore_index, reduction=reduction, **kwargs)
    for lam_value, target in ((1.0, a), (0.0, b)):
        lam = lam_value if lam_form == "float" else torch.full(pos, lam_value)
        mine = run_mixup(x, a, b, lam, **common)
        plain = run(_ce, x, target, **common)
        check(mine, plain, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,ignore_index", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("lam_kind", ["float", "per_sample", "per_pixel"])
def test_mixup_identical_targets_equal_plain_cross_entropy(lam_kind, shape, ignore_index, reduction, dtype):
    C = shape[1]
    x = make_logits(shape, dtype, seed=4)
    pos = positions_shape(shape)
    a, _ = mixup_targets(pos, C, ignore_index)
    lam = make_lam(lam_kind, pos)
    kwargs = dict(weight=make_weight(C, dtype), upstream=upstream_for(reduction, pos), ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    check(run_mixup(x, a, a.clone(), lam, **kwargs), run(_ce, x, a, **kwargs), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("kwargs", MIXUP_EDGE_OPTIONS, ids=MIXUP_EDGE_IDS)
@pytest.mark.parametrize("shape,ignore_index", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("lam_kind", ["float", "per_sample", "per_pixel"])
def test_mixup_is_linear_in_lam(lam_kind, shape, ignore_index, kwargs, weighted, dtype):
    """ℓ_mix = lam·ℓ(a) + (1 − lam)·ℓ(b) per position (ignored targets give ℓ = 0, z-loss included);
    mean = Σ ℓ_mix / Σ [lam·w[a]·valid_a + (1 − lam)·w[b]·valid_b]; gradients likewise. Built from
    smoothce.cross_entropy(reduction='none') of each target alone."""
    C = shape[1]
    x = make_logits(shape, dtype, seed=6)
    pos = positions_shape(shape)
    a, b = mixup_targets(pos, C, ignore_index)
    lam = make_lam(lam_kind, pos)
    lam_full = torch.as_tensor(lam, dtype=torch.float64).expand(pos)
    w = make_weight(C, dtype) if weighted else None
    common = dict(weight=w, ignore_index=ignore_index, **kwargs)
    up = upstream_for("none", pos)
    l_a, g_a, _ = run(_ce, x, a, reduction="none", upstream=up * lam_full, **common)
    l_b, g_b, _ = run(_ce, x, b, reduction="none", upstream=up * (1 - lam_full), **common)
    expected_none = lam_full * l_a.double() + (1 - lam_full) * l_b.double()
    mine = run_mixup(x, a, b, lam, reduction="none", upstream=up, **common)
    check(mine, (expected_none, g_a.double() + g_b.double()), dtype)

    wd = torch.ones(C, dtype=torch.float64) if w is None else w.double()
    va, vb = a != ignore_index, b != ignore_index
    w_a = torch.where(va, wd[a.clamp(0, C - 1)], 0)
    w_b = torch.where(vb, wd[b.clamp(0, C - 1)], 0)
    D = (lam_full * w_a + (1 - lam_full) * w_b).sum()
    _, g_a, _ = run(_ce, x, a, reduction="none", upstream=lam_full / D, **common)
    _, g_b, _ = run(_ce, x, b, reduction="none", upstream=(1 - lam_full) / D, **common)
    mine = run_mixup(x, a, b, lam, reduction="mean", **common)
    check(mine, (expected_none.sum() / D, g_a.double() + g_b.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixup_cutmix_segmentation_per_pixel_vs_per_sample(reduction, dtype):
    """Cutmix on a segmentation map: a per-pixel lam (a box of 1s pasted from target_a) against the dense
    plain-PyTorch mixed target; a (N, 1, 1) lam equals the same value broadcast to (N, H, W)."""
    N, C, H, W = 2, 7, 4, 6
    x = make_logits((N, C, H, W), dtype)
    a = make_index_target((N, H, W), C, seed=1, ignore_every=7, ignore_index=255)
    b = make_index_target((N, H, W), C, seed=2, ignore_every=5, ignore_index=255)
    box = torch.zeros(N, H, W)
    box[0, 1:3, 2:5] = 1.0
    box[1, :, :3] = 1.0
    eps = 0.1

    def dense(inp, tgt, weight=None):
        qa = _plain_q(tgt, C, 1 - eps + eps / C, eps / C, 255)
        qb = _plain_q(b, C, 1 - eps + eps / C, eps / C, 255)
        lam = box.double().unsqueeze(1)
        q = lam * qa + (1 - lam) * qb
        denom = (box.double() * (tgt != 255) + (1 - box.double()) * (b != 255)).sum()
        return _plain_loss(inp, q, denom=denom, reduction=reduction)

    up = upstream_for(reduction, (N, H, W))
    mine = run_mixup(x, a, b, box, ignore_index=255, reduction=reduction, label_smoothing=eps, upstream=up)
    check(mine, run(dense, x.double(), a, upstream=up), dtype)

    lam_sample = torch.tensor([0.25, 0.8]).view(N, 1, 1)
    kwargs = dict(ignore_index=255, reduction=reduction, label_smoothing=eps, upstream=up)
    broadcast = run_mixup(x, a, b, lam_sample, **kwargs)
    expanded = run_mixup(x, a, b, lam_sample.expand(N, H, W).contiguous(), **kwargs)
    check(broadcast, (expanded[0].double(), expanded[1].double()), dtype)
    check(broadcast, run_mixup_truth(x, a, b, lam_sample, **kwargs), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixup_ignored_targets_by_hand(reduction):
    """Positions: both valid / a ignored / b ignored / both ignored, weighted, in float64 by hand."""
    C = 4
    x = make_logits((4, C), torch.float64, seed=8)
    a = torch.tensor([1, -100, 2, -100])
    b = torch.tensor([3, 0, -100, -100])
    lam = torch.tensor([0.25, 0.6, 0.7, 0.5], dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    lp = F.log_softmax(x, dim=1)
    per_pos = torch.stack([
        -(0.25 * w[1] * lp[0, 1] + 0.75 * w[3] * lp[0, 3]),
        -(0.4 * w[0] * lp[1, 0]),
        -(0.7 * w[2] * lp[2, 2]),
        torch.zeros((), dtype=torch.float64),
    ])
    D = 0.25 * w[1] + 0.75 * w[3] + 0.4 * w[0] + 0.7 * w[2]
    expected = {"none": per_pos, "sum": per_pos.sum(), "mean": per_pos.sum() / D}[reduction]
    loss, grad, _ = run_mixup(x, a, b, lam, weight=w, reduction=reduction)
    assert_near(loss, expected, torch.float64, "loss")
    assert torch.count_nonzero(grad[3]) == 0
    # all ignored in both: mean is 0/0 = NaN with a zero gradient (as plain cross_entropy)
    ign = torch.full((4,), -100)
    loss, grad, _ = run_mixup(x, ign, ign, lam, weight=w, reduction=reduction)
    if reduction == "mean":
        assert loss.isnan()
    else:
        assert torch.count_nonzero(loss) == 0
    assert torch.count_nonzero(grad) == 0


# ------------------------------------------- maps whose class lines share cache sets (CPU layouts)

COLLIDING_OPTIONS = {
    "eps": dict(label_smoothing=0.1),
    "others_zloss": dict(smoothing="others", label_smoothing=0.2, z_loss=1e-2),
    "values": OPTIONS["values"],
    "inplace_all": OPTIONS["inplace_all"],
    "mixup": dict(label_smoothing=0.1),
    "soft": dict(label_smoothing=0.1),
}


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("option", sorted(COLLIDING_OPTIONS))
def test_colliding_class_lines(option, dtype):
    """(N, C, H, W) maps whose C class lines, a power-of-two stride apart, share one L1 set (16 KiB apart
    in fp32; AVX2 builds copy such fp32 maps' groups of tiles into buffers, as the half types' always),
    every option, forward + backward against the reference."""
    C, pos = 21, (2, 64, 64)
    x = make_logits((2, C, 64, 64), dtype, seed=7)
    kwargs = dict(COLLIDING_OPTIONS[option])
    w = make_weight(C, dtype)
    common = dict(weight=w, upstream=upstream_for("none", pos), reduction="none",
                  view=non_leaf if kwargs.get("inplace_backward") else None, **kwargs)
    if option == "mixup":
        a, b = mixup_targets(pos, C, -100)
        lam = torch.rand(pos, generator=torch.Generator().manual_seed(4))
        mine, truth = run_mixup(x, a, b, lam, **common), run_mixup_truth(x, a, b, lam, **common)
    else:
        t = make_prob_target((2, C, 64, 64), dtype) if option == "soft" else make_index_target(pos, C, ignore_every=5)
        mine, truth = run(smoothce.cross_entropy, x, t, **common), run_truth(x, t, **common)
    check(mine, truth, dtype)


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_colliding_class_lines_partial_groups(soft, dtype):
    """Forward alone reads a view in place: 4001 positions of every 4096, so each map's last group of
    tiles is cut short, and one tile of it partial, while the class lines still share an L1 set."""
    C = 21
    x = make_logits((2, C, 4096), dtype, seed=8)[..., :4001]
    if soft:
        t = make_prob_target((2, C, 4096), dtype)[..., :4001]
    else:
        t = make_index_target((2, 4001), C, ignore_every=5)
    w = make_weight(C, dtype)
    with torch.no_grad():
        got = smoothce.cross_entropy(x, t, weight=w, reduction="none", label_smoothing=0.1)
    want = ref.cross_entropy(x.double(), t.double() if soft else t, weight=w.double(), reduction="none",
                             label_smoothing=0.1)
    assert_near(got, want, dtype, "loss")


@pytest.mark.cpu_only
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
@pytest.mark.parametrize("shape", [(2, 8, 32, 32), (2, 9, 32, 32), (2, 13, 30, 34)], ids=str)
def test_class_lines_in_one_l1_set_threshold(shape, soft):
    """fp32 maps on either side of the widening threshold (AVX2 builds: more than 8 class lines in one
    L1 set): 8 and 9 classes 4 KiB apart, and 13 classes at a stride that spreads them over the sets,
    forward + backward against the reference."""
    C, pos = shape[1], (shape[0],) + shape[2:]
    x = make_logits(shape, torch.float32, seed=9)
    t = make_prob_target(shape, torch.float32) if soft else make_index_target(pos, C, ignore_every=5)
    kwargs = dict(weight=make_weight(C, torch.float32), upstream=upstream_for("none", pos), reduction="none",
                  label_smoothing=0.1)
    check(run(smoothce.cross_entropy, x, t, **kwargs), run_truth(x, t, **kwargs), torch.float32)


# -------------------------------------------------------- 4. "others" with C = 1, C = 2; off = 0 values

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_others_one_class_has_no_off_value(z_loss, reduction, dtype):
    """C = 1: off = 0 (no other class), on = 1 − ε; lp = 0, so the loss is the z-loss alone, α·x², and the
    gradient 2α·x (zero without z-loss); never NaN from ε/(C − 1) = ε/0."""
    x = make_logits((6, 1), dtype)
    t = torch.zeros(6, dtype=torch.int64)
    t[2] = -100
    kwargs = dict(smoothing="others", label_smoothing=0.3, z_loss=z_loss, reduction=reduction)
    mine = run(smoothce.cross_entropy, x, t, **kwargs)
    truth = run_truth(x, t, **kwargs)
    check(mine, truth, dtype)
    x64 = x.double().squeeze(1)
    valid = (t != -100).double()
    per_pos = z_loss * valid * x64 ** 2
    expected = {"none": per_pos, "sum": per_pos.sum(), "mean": per_pos.sum() / valid.sum()}[reduction]
    s = {"none": 1.0, "sum": 1.0, "mean": 1.0 / valid.sum()}[reduction]
    assert_near(mine[0], expected, dtype, "loss")
    assert_near(mine[1], (2 * z_loss * valid * x64 * s).unsqueeze(1), dtype, "grad")
    # and target_values with C = 1 likewise (off is never used)
    mine = run(smoothce.cross_entropy, x, t, target_values=(0.7, 0.2), z_loss=z_loss, reduction=reduction)
    assert_near(mine[0], expected, dtype, "loss (target_values)")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_others_two_classes(eps, reduction, dtype):
    """C = 2: q = (1 − ε, ε) — the probability target [1 − ε, ε], and uniform smoothing by 2ε."""
    x = make_logits((10, 2), dtype)
    t = make_index_target((10,), 2, ignore_every=4)
    kwargs = dict(reduction=reduction, upstream=upstream_for(reduction, (10,)))
    mine = run(smoothce.cross_entropy, x, t, smoothing="others", label_smoothing=eps, **kwargs)
    check(mine, run_truth(x, t, smoothing="others", label_smoothing=eps, **kwargs), dtype)
    check(mine, run_truth(x, t, label_smoothing=2 * eps, **kwargs), dtype)
    valid = t != -100
    onehot = F.one_hot(t.clamp(min=0), 2).double()
    soft = onehot * (1 - eps) + (1 - onehot) * eps  # [1 − ε, ε] at class (t, other)

    def published(inp, tgt, weight=None):
        loss = F.cross_entropy(inp[valid], soft[valid], reduction="none")
        out = torch.zeros(10, dtype=torch.float64).masked_scatter(valid, loss)
        return {"none": out, "sum": out.sum(), "mean": loss.mean()}[reduction]

    check(mine, run(published, x.double(), t, upstream=kwargs["upstream"]), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,ignore_index", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("on", [1.0, 0.7, 2.0])
def test_target_values_off_zero_is_scaled_plain_ce(on, shape, ignore_index, reduction, weighted, dtype):
    """target_values=(on, 0) = on × plain cross-entropy (mean's D = Σ w[t] is not scaled by on)."""
    C = shape[1]
    x = make_logits(shape, dtype, seed=9)
    t = make_index_target(positions_shape(shape), C, ignore_every=4, ignore_index=ignore_index)
    w = make_weight(C, dtype) if weighted else None
    up = upstream_for(reduction, t.shape)
    common = dict(weight=w, ignore_index=ignore_index, reduction=reduction)
    mine = run(smoothce.cross_entropy, x, t, upstream=up, target_values=(on, 0.0), **common)
    plain = run_truth(x, t, upstream=up * on, **common)
    check(mine, (plain[0] * on, plain[1]), dtype)
    x64 = x.double().requires_grad_(True)
    torch_loss = F.cross_entropy(x64, t, weight=None if w is None else w.double(), ignore_index=ignore_index,
                                 reduction=reduction) * on
    torch_loss.backward(up)
    check(mine, (torch_loss.detach(), x64.grad), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_target_values_reproduce_uniform_and_others(eps, dtype):
    """target_values=(1 − ε + ε/C, ε/C) is label_smoothing=ε; (1 − ε, ε/(C − 1)) is smoothing='others'."""
    C = 13
    x = make_logits((2, C, 3), dtype)
    t = make_index_target((2, 3), C, ignore_every=4)
    w = make_weight(C, dtype)
    for values, kwargs in (((1 - eps + eps / C, eps / C), dict(label_smoothing=eps)),
                           ((1 - eps, eps / (C - 1)), dict(smoothing="others", label_smoothing=eps))):
        mine = run(smoothce.cross_entropy, x, t, weight=w, target_values=values)
        other = run(smoothce.cross_entropy, x, t, weight=w, **kwargs)
        check(mine, (other[0].double(), other[1].double()), dtype)
        check(mine, run_truth(x, t, weight=w, **kwargs), dtype)


# ------------------------------------------------------------------------------------- 5. gradcheck

GRADCHECK_OPTIONS = {
    "others": dict(smoothing="others", label_smoothing=0.2),
    "values": dict(target_values=(0.8, 0.05)),
    "values_off0": dict(target_values=(1.3, 0.0)),
    "zloss": dict(z_loss=0.1),
    "all": dict(smoothing="others", label_smoothing=0.3, z_loss=0.05),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 2, 3)], ids=SHAPE_IDS)
@pytest.mark.parametrize("option", sorted(GRADCHECK_OPTIONS))
def test_gradcheck_cross_entropy(option, shape, reduction):
    C = shape[1]
    x = make_logits(shape, torch.float64).requires_grad_(True)
    t = make_index_target(positions_shape(shape), C, ignore_every=3)
    w = make_weight(C, torch.float64)

    def fn(inp):
        return smoothce.cross_entropy(inp, t, w, reduction=reduction, **GRADCHECK_OPTIONS[option])

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,lam_kind", [((4, 5), "float"), ((4, 5), "per_sample"), ((2, 5, 2, 3), "per_pixel"),
                                            ((2, 5, 2, 3), "per_sample")], ids=["NC-float", "NC-per_sample",
                                                                                "NCHW-per_pixel", "NCHW-per_sample"])
@pytest.mark.parametrize("option", ["plain", "eps", "others", "values", "zloss_eps"])
def test_gradcheck_mixup(option, shape, lam_kind, reduction):
    C = shape[1]
    pos = positions_shape(shape)
    x = make_logits(shape, torch.float64).requires_grad_(True)
    a, b = mixup_targets(pos, C, -100)
    lam = make_lam(lam_kind, pos)
    lam = lam.double() if isinstance(lam, torch.Tensor) else lam
    w = make_weight(C, torch.float64)

    def fn(inp):
        return smoothce.mixup_cross_entropy(inp, a, b, lam, w, reduction=reduction, **MIXUP_OPTIONS[option])

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mixup", [False, True], ids=["cross_entropy", "mixup"])
def test_gradgradcheck_options(mixup):
    """Second order (create_graph=True) with the options."""
    x = make_logits((3, 4), torch.float64).requires_grad_(True)
    t = make_index_target((3,), 4, ignore_every=3)
    w = make_weight(4, torch.float64)
    kwargs = dict(smoothing="others", label_smoothing=0.2, z_loss=0.05)
    if mixup:
        lam = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
        fn = lambda inp: smoothce.mixup_cross_entropy(inp, t, t.flip(0), lam, w, **kwargs)  # noqa: E731
    else:
        fn = lambda inp: smoothce.cross_entropy(inp, t, w, target_values=(0.7, 0.1), z_loss=0.05)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_inplace_backward_finite_differences():
    """gradcheck's repeated backward through one graph is refused by design with inplace_backward; check
    the in-place gradient against central differences instead (a fresh graph per evaluation)."""
    C = 5
    x = make_logits((3, C, 2), torch.float64)
    t = make_index_target((3, 2), C, ignore_every=4)
    w = make_weight(C, torch.float64)
    kwargs = dict(weight=w, smoothing="others", label_smoothing=0.2, z_loss=0.05)
    leaf = x.clone().requires_grad_(True)
    smoothce.cross_entropy(leaf * 1, t, inplace_backward=True, **kwargs).backward()
    numeric = torch.zeros_like(x)
    h = 1e-6
    with torch.no_grad():
        for i in range(x.numel()):
            d = torch.zeros_like(x)
            d.view(-1)[i] = h
            numeric.view(-1)[i] = (smoothce.cross_entropy(x + d, t, **kwargs)
                                   - smoothce.cross_entropy(x - d, t, **kwargs)) / (2 * h)
    torch.testing.assert_close(leaf.grad, numeric, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------- 6. torch.compile

def _all_options(h, t, t2, lam_t, w, with_inplace=True):
    losses = (
        smoothce.cross_entropy(h, t, w, smoothing="others", label_smoothing=0.2),
        smoothce.cross_entropy(h, t, target_values=(0.8, 0.02), reduction="sum"),
        smoothce.cross_entropy(h, t, w, label_smoothing=0.1, z_loss=1e-2, reduction="none").sum(),
        smoothce.mixup_cross_entropy(h, t, t2, 0.3, w, label_smoothing=0.1),
        smoothce.mixup_cross_entropy(h, t, t2, lam_t, smoothing="others", label_smoothing=0.1, z_loss=1e-2,
                                     reduction="none").sum(),
        smoothce.mixup_cross_entropy(h, t, t2, lam_t, w, target_values=(0.9, 0.01), reduction="sum"),
    )
    if with_inplace:
        losses += (
            smoothce.cross_entropy(h * 1, t, w, smoothing="others", label_smoothing=0.1, z_loss=1e-3,
                                   inplace_backward=True),
            smoothce.mixup_cross_entropy(h * 1, t, t2, lam_t, w, label_smoothing=0.1, inplace_backward=True),
        )
    return losses


def _all_options_truth(x, t, t2, lam, w, with_inplace):
    """The float64 reference of sum(_all_options(...)): (loss, grad)."""
    x64 = x.double().requires_grad_(True)
    w64 = w.double()
    lam64 = lam.double()
    total = (
        ref.cross_entropy(x64, t, w64, smoothing="others", label_smoothing=0.2)
        + ref.cross_entropy(x64, t, target_values=(0.8, 0.02), reduction="sum")
        + ref.cross_entropy(x64, t, w64, label_smoothing=0.1, z_loss=1e-2, reduction="none").sum()
        + ref.mixup_cross_entropy(x64, t, t2, 0.3, w64, label_smoothing=0.1)
        + ref.mixup_cross_entropy(x64, t, t2, lam64, smoothing="others", label_smoothing=0.1, z_loss=1e-2,
                                  reduction="none").sum()
        + ref.mixup_cross_entropy(x64, t, t2, lam64, w64, target_values=(0.9, 0.01), reduction="sum"))
    if with_inplace:
        total = (total + ref.cross_entropy(x64, t, w64, smoothing="others", label_smoothing=0.1, z_loss=1e-3)
                 + ref.mixup_cross_entropy(x64, t, t2, lam64, w64, label_smoothing=0.1))
    total.backward()
    return total.detach(), x64.grad


def _run_all_options(fn, x, t, t2, lam, w, with_inplace):
    leaf = x.clone().requires_grad_(True)
    losses = fn(leaf, t, t2, lam, w, with_inplace)
    sum(losses).backward()
    return [loss.detach() for loss in losses], leaf.grad


def _check_compiled_all_options(compile_backend, with_inplace):
    torch._dynamo.reset()
    C = 23
    x = make_logits((8, C))
    t = make_index_target((8,), C, ignore_every=3)
    t2 = make_index_target((8,), C, seed=5, ignore_every=5)
    w = make_weight(C)
    compiled = torch.compile(_all_options, fullgraph=True, backend=compile_backend)
    for step in range(2):  # the second call (another lam tensor) reuses the compiled graph
        lam = torch.linspace(0, 1, 8) * (1 - 0.1 * step)
        losses_c, grad_c = _run_all_options(compiled, x, t, t2, lam, w, with_inplace)
        losses_e, grad_e = _run_all_options(_all_options, x, t, t2, lam, w, with_inplace)
        for i, (lc, le) in enumerate(zip(losses_c, losses_e)):
            torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7, msg=f"loss {i} (step {step})")
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-7)
        # and both are right: against the float64 reference
        truth_loss, truth_grad = _all_options_truth(x, t, t2, lam, w, with_inplace)
        assert_near(sum(losses_c), truth_loss, torch.float32, "compiled loss")
        assert_near(grad_c, truth_grad, torch.float32, "compiled grad")


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph_options_and_mixup(compile_backend):
    """others, target_values, z_loss, mixup with a float and a tensor lam under torch.compile(fullgraph=True)."""
    _check_compiled_all_options(compile_backend, with_inplace=False)


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph_inplace_backward(compile_backend):
    """As above plus inplace_backward=True on a non-leaf (h * 1), for cross_entropy and mixup."""
    _check_compiled_all_options(compile_backend, with_inplace=True)


# ------------------------------------------------------------------------------ 7. CrossEntropyLoss

MODULE_OPTIONS = {
    "others": dict(smoothing="others", label_smoothing=0.2),
    "values": dict(target_values=(0.8, 0.05)),
    "zloss": dict(z_loss=1e-2, label_smoothing=0.1),
    "all_inplace": dict(smoothing="others", label_smoothing=0.1, z_loss=1e-3, inplace_backward=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,ignore_index", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("option", sorted(MODULE_OPTIONS))
def test_module_equals_functional(option, shape, ignore_index, reduction, dtype):
    kwargs = MODULE_OPTIONS[option]
    C = shape[1]
    w = make_weight(C, dtype)
    module = smoothce.CrossEntropyLoss(weight=w, ignore_index=ignore_index, reduction=reduction, **kwargs)
    x = make_logits(shape, dtype)
    t = make_index_target(positions_shape(shape), C, ignore_every=4, ignore_index=ignore_index)
    up = upstream_for(reduction, t.shape)
    view = non_leaf if kwargs.get("inplace_backward") else None
    by_module = run(lambda inp, tgt, weight=None: module(inp, tgt), x, t, upstream=up, view=view)
    functional = run(smoothce.cross_entropy, x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                     upstream=up, view=view, **kwargs)
    torch.testing.assert_close(by_module[0], functional[0], rtol=0, atol=0)
    torch.testing.assert_close(by_module[1], functional[1], rtol=0, atol=0)
    check(by_module, run_truth(x, t, weight=w, ignore_index=ignore_index, reduction=reduction, upstream=up,
                               **kwargs), dtype)


def test_module_repr_mentions_non_default_options():
    default = repr(smoothce.CrossEntropyLoss(label_smoothing=0.1))
    for word in ("smoothing=", "target_values", "z_loss", "inplace_backward"):
        assert word not in default.replace("label_smoothing=", ""), default
    r = repr(smoothce.CrossEntropyLoss(smoothing="others", label_smoothing=0.1, z_loss=1e-3, inplace_backward=True))
    assert "smoothing='others'" in r and "z_loss=0.001" in r and "inplace_backward=True" in r, r
    r = repr(smoothce.CrossEntropyLoss(target_values=[0.9, 0.01]))
    assert "target_values=(0.9, 0.01)" in r, r
    module = smoothce.CrossEntropyLoss(target_values=[0.9, 0.01], z_loss=0.5)
    assert module.target_values == (0.9, 0.01) and module.z_loss == 0.5
    assert set(module.state_dict()) == set()  # the options are attributes, not state
