"""The vocabulary-parallel ops torch.ops.smoothce.shard_stats / shard_forward in one process: the
classes cut into shards as ranks would hold them, every shard's statistics stacked as the all-gather
stacks them, and each shard's loss and gradient checked against smoothce.cross_entropy on the whole
logits (which test_cross_entropy.py checks against the float64 reference). Fast, and independent of
torch.distributed; tests/test_distributed.py runs the same ops across processes."""
import math

import pytest
import torch

import smoothce
from smoothce import _function
from conftest import BACKEND

pytestmark = pytest.mark.not_on_cuda  # (CPU tensors: under the cuda backend the CPU kernels)


class _Ops:
    """torch.ops.smoothce, or under SMOOTHCE_TEST_BACKEND=emu the emulated CUDA kernels (the backend
    fixture swaps smoothce._function._ops, which smoothce.distributed calls too)."""

    def __getattr__(self, name):
        return getattr(_function._ops, name)


ops = _Ops()
SPLITS = {"even": [250, 250, 251, 250], "uneven": [1, 600, 400], "one_rank": [1001], "single_class_last": [1000, 1],
          "empty_middle": [500, 0, 501]}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=1e-3), torch.float16: dict(rtol=1e-2, atol=1e-4)}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run_shards(x, target, weight, sizes, reduction, label_smoothing=0.0, grad_output=None, compute_grad=True,
                soft=False, **ext):
    """Every shard's (loss, lse, grad) for the whole (N, C) problem cut at `sizes`."""
    C = x.shape[1]
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    shards = [x[:, s:s + n].contiguous() for s, n in zip(starts, sizes)]
    targets = [target[:, s:s + n].contiguous() if soft else target for s, n in zip(starts, sizes)]
    weights = [None if weight is None else weight[s:s + n] for s, n in zip(starts, sizes)]
    stats = torch.stack([ops.shard_stats(xs, ts, ws, s, C, -100, label_smoothing, False, **ext)
                         for xs, ts, ws, s in zip(shards, targets, weights, starts)])
    return [ops.shard_forward(xs, ts, ws, stats, s, C, -100, reduction, label_smoothing, compute_grad, False,
                              grad_output, **ext)
            for xs, ts, ws, s in zip(shards, targets, weights, starts)]


def _expected(x, target, weight, reduction, label_smoothing=0.0, grad_output=None, mixup=None, **kw):
    x = x.detach().clone().requires_grad_()
    names = {0: "none", 1: "mean", 2: "sum"}
    if mixup is not None:
        target_b, lam = mixup
        loss = smoothce.mixup_cross_entropy(x, target, target_b, lam, weight, reduction=names[reduction],
                                            label_smoothing=label_smoothing, **kw)
    else:
        loss = smoothce.cross_entropy(x, target, weight, reduction=names[reduction], label_smoothing=label_smoothing,
                                      **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    return loss.detach(), x.grad


def _check(results, expected, sizes, dtype):
    loss, grad = expected
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    for (shard_loss, lse, shard_grad), s, n in zip(results, starts, sizes):
        torch.testing.assert_close(shard_loss.to(loss.dtype), loss, equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(shard_grad, grad[:, s:s + n], **TOL[dtype])
    for other in results[1:]:  # every rank computes the same loss and lse, bit for bit
        assert torch.equal(other[0].nan_to_num(7.0), results[0][0].nan_to_num(7.0))
        assert torch.equal(other[1], results[0][1])


def _make(dtype, n=24, C=1001, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, C, (n,), generator=g)
    target[::5] = -100
    weight = torch.rand(C, generator=g, dtype=torch.float64).to(dtype)
    return x, target, weight, g


@pytest.mark.parametrize("split", list(SPLITS), ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_index_targets(split, dtype, reduction, weighted, eps):
    x, target, weight, g = _make(dtype)
    weight = weight if weighted else None
    go = torch.rand(x.shape[0], generator=g, dtype=_acc(dtype)) if reduction == 0 else torch.tensor(1.5, dtype=_acc(dtype))
    sizes = SPLITS[split]
    _check(_run_shards(x, target, weight, sizes, reduction, eps, go), _expected(x, target, weight, reduction, eps, go),
           sizes, dtype)


VARIANTS = {
    "others": dict(kw=dict(smoothing="others", label_smoothing=0.2)),
    "target_values": dict(kw=dict(target_values=(0.9, 0.0005))),
    "z_loss": dict(kw=dict(z_loss=1e-3, label_smoothing=0.1)),
    "mixup_float": dict(mixup="float", kw=dict(label_smoothing=0.1)),
    "mixup_tensor_z": dict(mixup="tensor", kw=dict(label_smoothing=0.1, z_loss=1e-2)),
}


def _op_ext(kw, C, mixup):
    """The op's extension arguments for the public keywords (as smoothce._function._extension_args makes them)."""
    ext, eps = {}, kw.get("label_smoothing", 0.0)
    if kw.get("smoothing") == "others":
        ext["target_values"], eps = [1.0 - eps, eps / (C - 1)], 0.0
    if "target_values" in kw:
        ext["target_values"] = list(kw["target_values"])
    if "z_loss" in kw:
        ext["z_loss"] = kw["z_loss"]
    if mixup is not None:
        target_b, lam = mixup
        ext["target_b"] = target_b
        if isinstance(lam, torch.Tensor):
            ext["lam"] = lam
        else:
            ext["lam_value"] = lam
    return eps, ext


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("split", ["uneven", "even", "empty_middle"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_variants(variant, split, reduction, weighted):
    dtype = torch.float32
    x, target, weight, g = _make(dtype, seed=1)
    weight = weight if weighted else None
    spec = VARIANTS[variant]
    mixup = None
    if "mixup" in spec:
        target_b = torch.randint(0, x.shape[1], target.shape, generator=g)
        lam = torch.rand(target.shape, generator=g) if spec["mixup"] == "tensor" else 0.3
        mixup = (target_b, lam)
    eps, ext = _op_ext(spec["kw"], x.shape[1], mixup)
    kw = {k: v for k, v in spec["kw"].items() if k != "label_smoothing"}
    go = torch.rand(x.shape[0], generator=g) if reduction == 0 else None
    expected = _expected(x, target, weight, reduction, spec["kw"].get("label_smoothing", 0.0), go, mixup, **kw)
    _check(_run_shards(x, target, weight, SPLITS[split], reduction, eps, go, **ext), expected, SPLITS[split], dtype)


@pytest.mark.parametrize("split", ["uneven", "even", "empty_middle"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_probability_targets(split, reduction, weighted):
    x, _, weight, g = _make(torch.float64, seed=2)
    weight = weight if weighted else None
    prob = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), 1)
    go = torch.rand(x.shape[0], generator=g, dtype=torch.float64) if reduction == 0 else None
    expected = _expected(x, prob, weight, reduction, 0.1, go)
    _check(_run_shards(x, prob, weight, SPLITS[split], reduction, 0.1, go, soft=True), expected, SPLITS[split],
           torch.float64)


@pytest.mark.parametrize("holder", [0, 1, 2], ids=lambda r: f"max_on_rank{r}")
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_confident_rows_exact(holder, soft):
    """A sole max far above the rest on any rank: loss and gradient within a few fp32 ulps of float64
    (1 − p and log Σexp from the merged `rest`, not by cancellation)."""
    sizes = SPLITS["uneven"]
    starts = [0, 1, 601]
    C = sum(sizes)
    x = torch.zeros(3, C, dtype=torch.float64)
    for row, margin in enumerate((12.0, 20.0, 28.0)):
        x[row, starts[holder]] = margin
        x[row, (starts[holder] + 7) % C] = margin - 1.5
    target = torch.full((3,), starts[holder])
    if soft:
        target = torch.nn.functional.one_hot(target, C).double() * 0.999 + 0.001 / C
    truth_loss, truth_grad = _expected(x, target, None, 2)
    results = _run_shards(x.float(), target.float() if soft else target, None, sizes, 2, soft=soft)
    for (loss, _, grad), s, n in zip(results, starts, sizes):
        assert abs(loss.double() - truth_loss) <= 8 * torch.finfo(torch.float32).eps * abs(truth_loss)
        expect = truth_grad[:, s:s + n]
        big = expect.abs() > 1e-30
        rel = ((grad.double() - expect).abs()[big] / expect.abs()[big])
        assert rel.max() < 64 * torch.finfo(torch.float32).eps


def test_target_out_of_range_names_the_global_range():
    x = torch.randn(4, 10)
    with pytest.raises(IndexError, match=r"out of bounds: expected class indices in \[0, 30\)"):
        ops.shard_stats(x, torch.tensor([1, 2, 30, 3]), None, 10, 30, -100, 0.0, False)


def test_shard_outside_the_classes():
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes = 15\)"):
        ops.shard_stats(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), None, 10, 15, -100, 0.0, False)


def test_stats_of_the_wrong_shape():
    x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    stats = ops.shard_stats(x, t, None, 0, 10, -100, 0.0, False)
    with pytest.raises(ValueError, match=r"stats must be the ranks' shard_stats stacked"):
        ops.shard_forward(x, t, None, stats, 0, 10, -100, 1, 0.0, True, False)  # not stacked: 2-D
    with pytest.raises(ValueError, match=r"stats must be"):
        ops.shard_forward(x, t, None, stats.double()[None], 0, 10, -100, 1, 0.0, True, False)


def _opcheck_args():
    x, target, weight, _ = _make(torch.float32, n=6, C=40)
    stats = torch.stack([ops.shard_stats(x[:, :25].contiguous(), target.clamp_min(0), weight[:25], 0, 40, -100,
                                         0.1, False),
                         ops.shard_stats(x[:, 25:].contiguous(), target.clamp_min(0), weight[25:], 25, 40, -100,
                                         0.1, False)])
    return x[:, 25:].contiguous(), target.clamp_min(0), weight[25:], stats


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(reduction, compute_grad):
    x, target, weight, stats = _opcheck_args()
    torch.library.opcheck(ops.shard_stats.default, (x, target, weight, 25, 40, -100, 0.1, False))
    torch.library.opcheck(ops.shard_forward.default,
                          (x, target, weight, stats, 25, 40, -100, reduction, 0.1, compute_grad, False))


@pytest.mark.parametrize("masked_rank", [0, 2], ids=lambda r: f"masked_rank{r}")
def test_masked_shard_and_logits_below_zero(masked_rank):
    """A rank whose shard is all −inf (a masked, padded vocabulary's last classes) while every other logit
    is below 0: that shard's statistics have max −inf, so the merged max is the row's own. (With 0, the
    row was measured from 0: at max −120 fp32's exp underflows to an infinite loss, and the confident
    row at max −1 lost its precision.)"""
    sizes = [400, 600, 300]
    starts = [0, 400, 1000]
    C = sum(sizes)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, C, generator=g, dtype=torch.float64) * 2
    target = torch.tensor([starts[1] + 3, starts[1] + 5])
    x[1, target[1]] = x[1].max() + 20.0  # confident
    x = x - x.amax(1, keepdim=True) - torch.tensor([[120.0], [1.0]])
    x[:, starts[masked_rank]:starts[masked_rank] + sizes[masked_rank]] = -math.inf
    x = x.float()
    truth_loss, truth_grad = _expected(x.double(), target, None, 0)
    results = _run_shards(x, target, None, sizes, 0, grad_output=torch.ones(2))
    for (loss, _, grad), s, n in zip(results, starts, sizes):
        assert ((loss.double() - truth_loss).abs() <= 8 * torch.finfo(torch.float32).eps * truth_loss.abs()).all()
        expect = truth_grad[:, s:s + n]
        assert torch.equal(grad[expect == 0], torch.zeros_like(grad[expect == 0]))
        big = expect.abs() > 1e-30
        rel = (grad.double() - expect).abs()[big] / expect.abs()[big]
        assert (rel < 64 * torch.finfo(torch.float32).eps).all()


def test_stats_fields_are_the_shards_row_state():
    """The 10 values: max, Σexp(x − max), the part below the max, and the unit-mass smoothing sums."""
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0]], dtype=torch.float64)
    s = ops.shard_stats(x, torch.tensor([2]), None, 4, 10, -100, 0.1, False)[0]
    d = x[0] - 3.0
    assert s[0] == 3.0
    assert math.isclose(s[1], d.exp().sum(), rel_tol=1e-15)
    assert math.isclose(s[2], d.exp().sum() - 2.0, rel_tol=1e-15)  # below the max: not the two 3.0s
    assert math.isclose(s[3], d.sum(), rel_tol=1e-15) and s[4] == 4.0  # Σ(x − max), count of classes
    assert s[6] == 0.0 and s[8] == 0.0  # the target (class 2) is on another rank: no logit, no weight here


def test_the_distributed_losses_need_a_process_group():
    import torch.distributed as dist

    from smoothce.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        vocab_parallel_linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_shard_grad_writes_shard_forwards_gradient_over_the_shard(dtype, reduction, soft):
    """inplace_backward's op: the gradient for grad_output over the shard itself, equal to shard_forward's."""
    x, target, weight, g = _make(dtype, n=12, C=300)
    if soft:
        target = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), 1).to(dtype)
    sizes, C = [100, 0, 200], 300
    stats = torch.stack([ops.shard_stats(x[:, s:s + n].contiguous(), target[:, s:s + n].contiguous() if soft else target,
                                         weight[s:s + n], s, C, -100, 0.1, False, z_loss=1e-3)
                         for s, n in ((0, 100), (100, 0), (100, 200))])
    go = torch.rand(12, generator=g, dtype=_acc(dtype)) if reduction == 0 else torch.tensor(0.7, dtype=_acc(dtype))
    for s, n in ((0, 100), (100, 0), (100, 200)):
        shard = x[:, s:s + n].contiguous()
        t = target[:, s:s + n].contiguous() if soft else target
        want = ops.shard_forward(shard, t, weight[s:s + n], stats, s, C, -100, reduction, 0.1, True, False, go,
                                 z_loss=1e-3)[2]
        ops.shard_grad_(shard, t, weight[s:s + n], stats, s, C, -100, reduction, 0.1, False, go, z_loss=1e-3)
        assert torch.equal(shard, want)


def test_opcheck_shard_grad():
    x, target, weight, stats = _opcheck_args()
    for go in (torch.tensor(0.5), torch.rand(x.shape[0])):
        torch.library.opcheck(ops.shard_grad_.default, (x, target, weight, stats, 25, 40, -100,
                                                       0 if go.dim() else 1, 0.1, False, go))
