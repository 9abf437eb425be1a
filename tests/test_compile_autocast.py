"""torch.compile(fullgraph=True) and CPU autocast."""
import copy

import pytest
import torch
import torch.nn.functional as F

import smoothce
from conftest import (assert_close_to_truth, make_index_target, make_logits, make_prob_target,
                      make_weight, run, run_truth)


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.slow
@pytest.mark.parametrize("case", ["index_weight_mean", "prob_none_nchw", "shifted_lm_view"])
def test_compile_function_matches_eager(case):
    torch._dynamo.reset()
    view = None
    if case == "shifted_lm_view":
        # a view with gaps whose gradient keeps its strides (the fake kernel must say the same)
        x = make_logits((3, 9, 30))
        view = lambda leaf: leaf[:, :-1].movedim(-1, 1)  # noqa: E731  ((B, T, V)[:, :-1] as (B, V, T - 1))
        target = make_index_target((3, 8), 30, ignore_every=5)
        kwargs = dict(weight=make_weight(30), reduction="sum", label_smoothing=0.1)
        upstream = torch.tensor(0.5)
    elif case == "index_weight_mean":
        x = make_logits((8, 37))
        target = make_index_target((8,), 37, ignore_every=3)
        kwargs = dict(weight=make_weight(37), reduction="mean", label_smoothing=0.1)
        upstream = torch.tensor(2.5)
    else:
        x = make_logits((2, 7, 3, 4))
        target = make_prob_target((2, 7, 3, 4))
        kwargs = dict(weight=None, reduction="none", label_smoothing=0.2)
        upstream = make_logits((2, 3, 4), seed=5)
    compiled = torch.compile(smoothce.cross_entropy, fullgraph=True)
    loss_c, grad_c, _ = run(compiled, x, target, upstream=upstream, view=view, **kwargs)
    loss_e, grad_e, _ = run(smoothce.cross_entropy, x, target, upstream=upstream, view=view, **kwargs)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-7)
    loss_t, grad_t, _ = run_truth(x, target, upstream=upstream, view=view, **kwargs)
    assert_close_to_truth(loss_c, loss_t, None, torch.float32, "compiled loss")
    assert_close_to_truth(grad_c, grad_t, None, torch.float32, "compiled grad")


class _Classifier(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 37))
        self.loss = loss

    def forward(self, features, target):
        return self.loss(self.body(features), target)


@pytest.mark.slow
def test_compile_model_with_module_loss():
    torch._dynamo.reset()
    torch.manual_seed(0)
    weight = make_weight(37)
    model = _Classifier(smoothce.CrossEntropyLoss(weight=weight, label_smoothing=0.1))
    twin = copy.deepcopy(model)
    twin.loss = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    compiled = torch.compile(model, fullgraph=True)
    features = torch.randn(24, 16)
    target = make_index_target((24,), 37, ignore_every=5)
    for _ in range(2):  # the second call reuses the compiled graph
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        loss = compiled(features, target)
        loss.backward()
        expected = twin(features, target)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- autocast

@pytest.mark.not_on_cuda  # CPU autocast
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autocast_loss_is_fp32(amp_dtype, weighted, reduction):
    torch.manual_seed(0)
    C = 37
    linear = torch.nn.Linear(16, C)
    twin = copy.deepcopy(linear)
    features = torch.randn(64, 16)
    target = make_index_target((64,), C, ignore_every=7)
    weight = make_weight(C) if weighted else None  # fp32 weight with half logits, as users write it
    with torch.autocast("cpu", dtype=amp_dtype):
        logits = linear(features)
        logits.retain_grad()
        loss = smoothce.cross_entropy(logits, target, weight=weight, reduction=reduction,
                                      label_smoothing=0.1)
        logits_t = twin(features)
        logits_t.retain_grad()
        loss_t = F.cross_entropy(logits_t, target, weight=weight, reduction=reduction,
                                 label_smoothing=0.1)
    assert logits.dtype == amp_dtype
    assert loss.dtype == torch.float32 == loss_t.dtype
    assert torch.equal(logits, logits_t)
    upstream = torch.ones_like(loss) * 1.5
    loss.backward(upstream)
    loss_t.backward(upstream)
    assert logits.grad.dtype == amp_dtype
    # The loss is computed from the same half logits that torch upcasts: fp32 accuracy.
    truth_loss, truth_grad, _ = run_truth(logits.detach(), target, weight=weight, upstream=upstream,
                                          reduction=reduction, label_smoothing=0.1)
    assert_close_to_truth(loss, truth_loss, loss_t, torch.float32, "autocast loss")
    assert_close_to_truth(logits.grad, truth_grad, logits_t.grad, amp_dtype, "autocast logits grad")
    assert linear.weight.grad.dtype == torch.float32
    scale = twin.weight.grad.abs().max().item()
    torch.testing.assert_close(linear.weight.grad, twin.weight.grad, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(linear.bias.grad, twin.bias.grad, rtol=2e-2,
                               atol=2e-2 * twin.bias.grad.abs().max().item())


@pytest.mark.not_on_cuda  # CPU autocast
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_autocast_soft_targets(weighted):
    """fp32 probability targets (and weights) with bf16 logits under autocast: torch computes with the
    fp32 values; smoothce must not round them to bf16 on the way."""
    C = 29
    logits = make_logits((16, C), torch.bfloat16)
    target = make_prob_target((16, C), torch.float32)
    weight = make_weight(C) if weighted else None
    results = []
    for fn in (smoothce.cross_entropy, F.cross_entropy):
        leaf = logits.clone().requires_grad_(True)
        tgt = target.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(leaf, tgt, weight=weight, label_smoothing=0.1)
        loss.backward()
        results.append((loss.detach(), leaf.grad, tgt.grad))
    (loss, grad, tgrad), (loss_t, grad_t, tgrad_t) = results
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert tgrad.dtype == torch.float32 == tgrad_t.dtype
    truth = run_truth(logits, target, weight=weight, label_smoothing=0.1, target_requires_grad=True)
    assert_close_to_truth(loss, truth[0], loss_t, torch.float32, "autocast soft loss")
    assert_close_to_truth(grad, truth[1], grad_t, torch.bfloat16, "autocast soft grad")
    assert_close_to_truth(tgrad, truth[2], tgrad_t, torch.float32, "autocast target grad")


_COPIES = ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")


def _nc_copies(prof, N, C):
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name in _COPIES and any(list(s) == [N, C] for s in e.input_shapes)]


@pytest.mark.not_on_cuda  # CPU autocast
def test_autocast_no_fp32_copy_of_logits():
    """docs/semantics.md §5: under autocast the loss is read straight from the half logits."""
    N, C = 64, 37
    logits = make_logits((N, C), torch.bfloat16).requires_grad_(True)
    target = make_index_target((N,), C)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    copies = _nc_copies(prof, N, C)
    assert not copies, f"N x C copies of the logits in forward: {copies}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_hands_gradient_over_without_copy(dtype):
    """The kernel's gradient is the leaf's .grad: no N x C copy anywhere in forward + backward
    (torch's AccumulateGrad steals a gradient nobody else references; a copy there doubles the
    gradient write the fused design saves)."""
    N, C = 64, 37
    logits = make_logits((N, C), dtype).requires_grad_(True)
    target = make_index_target((N,), C)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1)
        loss.backward()
    copies = _nc_copies(prof, N, C)
    assert not copies, f"N x C copies in forward + backward: {copies}"
