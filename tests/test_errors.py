"""Every user error names the argument (and, where it helps, the value seen) — for the public
function, the module and the raw op."""
import math

import pytest
import torch

import smoothce
from conftest import ERRORS, REDUCTION_CODE, make_logits

X = make_logits((3, 4))
T = torch.tensor([0, 1, 2])

# (id, kwargs for cross_entropy, argument name that must appear, value that must appear or None)
CASES = [
    ("target_shape", dict(input=X, target=torch.tensor([0, 1])), "target", None),
    ("target_shape_2d", dict(input=X, target=torch.zeros(3, 1, dtype=torch.int64)), "target", None),
    ("target_out_of_range", dict(input=X, target=torch.tensor([0, 4, 1])), "target", "4"),
    ("target_far_out_of_range", dict(input=X, target=torch.tensor([0, 1, 123456])), "target", "123456"),
    ("target_negative", dict(input=X, target=torch.tensor([0, -3, 1])), "target", "-3"),
    ("target_is_other_ignore", dict(input=X, target=torch.tensor([0, -100, 1]), ignore_index=2),
     "target", "-100"),
    ("target_uint8_out_of_range", dict(input=X, target=torch.tensor([0, 200, 1], dtype=torch.uint8)),
     "target", "200"),
    ("target_spatial_out_of_range",
     dict(input=make_logits((2, 4, 3, 3)), target=torch.full((2, 3, 3), 4)), "target", "4"),
    ("target_int32", dict(input=X, target=T.int()), "target", None),
    ("target_int16", dict(input=X, target=T.short()), "target", None),
    ("target_bool", dict(input=X, target=T.bool()), "target", None),
    ("prob_target_shape", dict(input=X, target=torch.rand(3, 5)), "target", None),
    ("prob_target_with_ignore_index", dict(input=X, target=torch.rand(3, 4), ignore_index=0),
     "ignore_index", None),
    ("weight_length", dict(input=X, target=T, weight=torch.ones(5)), "weight", "5"),
    ("weight_2d", dict(input=X, target=T, weight=torch.ones(1, 4)), "weight", None),
    ("weight_0d", dict(input=X, target=T, weight=torch.tensor(1.0)), "weight", None),
    ("weight_dtype", dict(input=X, target=T, weight=torch.ones(4, dtype=torch.float64)), "weight", None),
    ("weight_int", dict(input=X, target=T, weight=torch.ones(4, dtype=torch.int64)), "weight", None),
    ("weight_device", dict(input=X, target=T, weight=torch.ones(4, device="meta")), "weight", None),
    ("input_int", dict(input=X.long(), target=T), "input", None),
    ("input_bool", dict(input=X > 0, target=T), "input", None),
    ("input_0d", dict(input=torch.tensor(1.5), target=torch.tensor(0)), "input", None),
    ("reduction_unknown", dict(input=X, target=T, reduction="avg"), "reduction", "avg"),
    ("reduction_elementwise_mean", dict(input=X, target=T, reduction="elementwise_mean"),
     "reduction", "elementwise_mean"),
    ("label_smoothing_negative", dict(input=X, target=T, label_smoothing=-0.1), "label_smoothing", "-0.1"),
    ("label_smoothing_tiny_negative", dict(input=X, target=T, label_smoothing=-1e-9),
     "label_smoothing", None),
    ("label_smoothing_nan", dict(input=X, target=T, label_smoothing=math.nan), "label_smoothing", "nan"),
    ("label_smoothing_above_1", dict(input=X, target=T, label_smoothing=1.5), "label_smoothing", "1.5"),
    ("label_smoothing_inf", dict(input=X, target=T, label_smoothing=math.inf), "label_smoothing", "inf"),
]


# Out-of-range targets: on CUDA a device-side assert, as torch's (it ends the CUDA context), so those
# cases run on CPU under SMOOTHCE_TEST_BACKEND=cuda; the emulator raises them as IndexError.
OUT_OF_RANGE = {"target_out_of_range", "target_far_out_of_range", "target_negative", "target_is_other_ignore",
                "target_uint8_out_of_range", "target_spatial_out_of_range"}


@pytest.mark.parametrize("kwargs,name,value", [
    pytest.param(*c[1:], id=c[0], marks=[pytest.mark.not_on_cuda] if c[0] in OUT_OF_RANGE else [])
    for c in CASES])
def test_cross_entropy_errors(kwargs, name, value):
    kwargs = dict(kwargs)
    if isinstance(kwargs["input"], torch.Tensor) and kwargs["input"].is_floating_point():
        kwargs["input"] = kwargs["input"].clone().requires_grad_(True)
    with pytest.raises(ERRORS, match=f"(?i){name}") as info:
        smoothce.cross_entropy(**kwargs)
    if value is not None:
        assert value.lower() in str(info.value).lower(), f"{value!r} not in message: {info.value}"


def test_label_smoothing_message_states_expected_range():
    for bad in (-0.1, math.nan, 1.5):
        with pytest.raises(ValueError, match=r"label_smoothing") as info:
            smoothce.cross_entropy(X, T, label_smoothing=bad)
        assert "[0, 1]" in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_module_rejects_label_smoothing(bad):
    with pytest.raises(ERRORS, match="(?i)label_smoothing"):
        smoothce.CrossEntropyLoss(label_smoothing=bad)(X, T)


def test_module_rejects_reduction():
    with pytest.raises(ERRORS, match="(?i)reduction"):
        smoothce.CrossEntropyLoss(reduction="avg")(X, T)


@pytest.mark.not_on_cuda
def test_target_error_also_under_no_grad():
    with torch.no_grad(), pytest.raises(ERRORS, match="(?i)target") as info:
        smoothce.cross_entropy(X, torch.tensor([0, 9, 1]))
    assert "9" in str(info.value)


def test_boundary_values_are_accepted():
    """The edges of each valid range must not raise."""
    smoothce.cross_entropy(X, torch.tensor([0, 3, -100]))
    smoothce.cross_entropy(X, torch.tensor([0, 3, 7]), ignore_index=7)
    smoothce.cross_entropy(X, T, label_smoothing=0.0)
    smoothce.cross_entropy(X, T, label_smoothing=1.0)
    smoothce.cross_entropy(X, T, label_smoothing=1)  # an int is a number in [0, 1]
    smoothce.cross_entropy(X, torch.rand(3, 4), ignore_index=-1)


# ----------------------------------------------------------------------------------- raw op

def _op_args(input=X, target=T, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0,
             compute_grad=True, float32_loss=False):
    return (input, target, weight, ignore_index, reduction, label_smoothing, compute_grad,
            float32_loss)


OP_CASES = [
    ("target_shape", dict(target=torch.tensor([0, 1])), "target", None),
    ("target_out_of_range", dict(target=torch.tensor([0, 4, 1])), "target", "4"),
    ("target_negative", dict(target=torch.tensor([0, -3, 1])), "target", "-3"),
    ("target_out_of_range_no_grad", dict(target=torch.tensor([0, 4, 1]), compute_grad=False),
     "target", "4"),
    ("target_int32", dict(target=T.int()), "target", None),
    ("prob_target_shape", dict(target=torch.rand(3, 5)), "target", None),
    ("prob_target_with_ignore_index", dict(target=torch.rand(3, 4), ignore_index=0),
     "ignore_index", None),
    ("weight_length", dict(weight=torch.ones(5)), "weight", "5"),
    ("weight_2d", dict(weight=torch.ones(1, 4)), "weight", None),
    ("weight_dtype", dict(weight=torch.ones(4, dtype=torch.float64)), "weight", None),
    ("input_int", dict(input=X.long()), "input", None),
    ("input_0d", dict(input=torch.tensor(1.5), target=torch.tensor(0)), "input", None),
    ("reduction_code", dict(reduction=3), "reduction", "3"),
    ("reduction_code_negative", dict(reduction=-1), "reduction", "-1"),
    ("label_smoothing_negative", dict(label_smoothing=-0.1), "label_smoothing", "-0.1"),
    ("label_smoothing_nan", dict(label_smoothing=math.nan), "label_smoothing", "nan"),
    ("label_smoothing_above_1", dict(label_smoothing=1.5), "label_smoothing", "1.5"),
]


@pytest.mark.parametrize("kwargs,name,value", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_raw_op_errors(kwargs, name, value):
    with pytest.raises(ERRORS, match=f"(?i){name}") as info:
        torch.ops.smoothce.forward(*_op_args(**kwargs))
    if value is not None:
        assert value.lower() in str(info.value).lower(), f"{value!r} not in message: {info.value}"


def test_raw_op_accepts_valid_args():
    """Guards the error tests above: the same call with valid args succeeds."""
    for code in REDUCTION_CODE.values():
        loss, lse, grad = torch.ops.smoothce.forward(*_op_args(reduction=code, label_smoothing=0.1))
        assert grad.shape == X.shape and lse.shape == (3,)


def test_device_without_kernels_is_a_clear_error(monkeypatch):
    """A tensor on a device this build has no kernels for (CUDA in a CPU-only build) gets an error that
    says so, not the dispatcher's 'could not run ... with arguments from the CUDA backend'. Simulated
    here by a build that has no CPU kernels."""
    from smoothce import _function

    monkeypatch.setattr(_function, "_KERNEL_DEVICES", {"meta"})
    # (and the common call's C++ test of the device says no: it does so for meta tensors, and for CUDA
    # ones in a CPU-only build; test_cpp_autograd.py::test_other_calls_go_the_python_way)
    monkeypatch.setattr(smoothce, "_common", lambda *args: None)
    with pytest.raises(NotImplementedError, match=r"no kernels for cpu tensors"):
        smoothce.cross_entropy(X, T)
