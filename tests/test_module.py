"""smoothce.CrossEntropyLoss (the nn.Module twin) and `python -m smoothce`."""
import subprocess
import sys

import pytest
import torch

import smoothce
from conftest import (REDUCTIONS, ROOT, check_all, make_index_target, make_logits,
                      make_prob_target, make_weight, run, run_truth)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
def test_module_matches_torch_module(reduction, soft):
    C = 13
    w = make_weight(C)
    kwargs = dict(weight=w, reduction=reduction, label_smoothing=0.15)
    if not soft:
        kwargs["ignore_index"] = 4
    mine_module = smoothce.CrossEntropyLoss(**kwargs)
    torch_module = torch.nn.CrossEntropyLoss(**kwargs)
    x = make_logits((6, C, 2))
    target = make_prob_target((6, C, 2)) if soft else make_index_target((6, 2), C)
    if not soft:
        target[::2, 0] = 4
    call = lambda module: (lambda inp, tgt, weight=None: module(inp, tgt))  # noqa: E731
    mine = run(call(mine_module), x, target)
    theirs = run(call(torch_module), x, target)
    truth = run_truth(x, target, **kwargs)
    check_all(mine, theirs, truth, torch.float32)


def test_module_defaults_and_attributes():
    m, t = smoothce.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for name in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(m, name) == getattr(t, name), name
    assert m.weight is None
    m = smoothce.CrossEntropyLoss(ignore_index=3, reduction="sum", label_smoothing=0.25)
    assert (m.ignore_index, m.reduction, m.label_smoothing) == (3, "sum", 0.25)
    assert isinstance(m, torch.nn.Module)


def test_module_repr():
    r = repr(smoothce.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"))
    assert r.startswith("CrossEntropyLoss(") and "0.1" in r and "sum" in r, r


def test_module_weight_is_a_buffer_like_torch():
    w = make_weight(9)
    mine, theirs = smoothce.CrossEntropyLoss(weight=w), torch.nn.CrossEntropyLoss(weight=w)
    assert list(mine.parameters()) == []
    assert set(mine.state_dict()) == set(theirs.state_dict()) == {"weight"}
    assert torch.equal(mine.state_dict()["weight"], w)
    assert [n for n, _ in mine.named_buffers()] == ["weight"]
    assert set(smoothce.CrossEntropyLoss().state_dict()) == set(torch.nn.CrossEntropyLoss().state_dict())
    # A torch checkpoint loads into smoothce's module and changes its result.
    other = make_weight(9, seed=7)
    mine.load_state_dict(torch.nn.CrossEntropyLoss(weight=other).state_dict())
    assert torch.equal(mine.weight, other)
    x, t = make_logits((5, 9)), make_index_target((5,), 9)
    with torch.no_grad():
        torch.testing.assert_close(mine(x, t), torch.nn.CrossEntropyLoss(weight=other)(x, t))


def test_module_to_double_moves_weight():
    m = smoothce.CrossEntropyLoss(weight=make_weight(9), label_smoothing=0.1).double()
    assert m.weight.dtype == torch.float64
    x, t = make_logits((5, 9), torch.float64), make_index_target((5,), 9)
    loss, grad, _ = run(lambda i, tg, weight=None: m(i, tg), x, t)
    torch_loss = torch.nn.CrossEntropyLoss(weight=make_weight(9).double(), label_smoothing=0.1)(x, t)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-12, atol=1e-12)
    assert grad.dtype == torch.float64


def test_python_m_smoothce():
    proc = subprocess.run([sys.executable, "-m", "smoothce"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout, proc.stdout
    assert smoothce.__version__ in proc.stdout, proc.stdout
