"""The emulator's device arithmetic (tests/emu/arith.h): in 'device' mode the kernels' float exp, log
and division carry errors up to the CUDA Programming Guide's documented maxima for nvcc
--use_fast_math (__expf, __logf, approximate division), denormals flush to zero, and fp64 stays
exact. These tests check that the errors stay within those bounds, that they are really there (the
mode cannot silently be exact), and that the emulated kernels change their results in device mode
but stay within the accuracy bound of tests/conftest.py.

(SMOOTHCE_EMU_ARITH=device runs the whole emulated suite in this mode; these tests set it
themselves.)"""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import emulator
import smoothce
from smoothce import _function
from conftest import (check_all, make_index_target, make_logits, make_prob_target, make_weight, positions_shape,
                      run_all)

pytestmark = pytest.mark.cpu_only  # (they choose the emulator and its mode themselves)

LOG_ABS_ERROR = 2.0 ** -21.41      # __logf on [0.5, 2]
MIN_NORMAL = torch.finfo(torch.float32).tiny
MAX_FLOAT = torch.finfo(torch.float32).max


@pytest.fixture(scope="module")
def emu():
    return emulator.load()


@pytest.fixture(params=[0, 12345], ids=["seed0", "seed12345"])
def device(emu, request):
    """Device arithmetic (two error patterns) for the test; the previous mode afterwards."""
    previous = emu.arithmetic(), emu.arithmetic_seed()
    emu.set_arithmetic("device", request.param)
    yield emu
    emu.set_arithmetic(*previous)


@pytest.fixture
def exact(emu):
    previous = emu.arithmetic(), emu.arithmetic_seed()
    emu.set_arithmetic("exact")
    yield emu
    emu.set_arithmetic(*previous)


def ordered(x):
    """float32 values as integers in the order of the floats: consecutive floats differ by 1."""
    bits = x.contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def ulps(got, want):
    """|got - want| in representable float32 steps (want: the correctly rounded float)."""
    return (ordered(got) - ordered(want)).abs()


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def flushed(x):
    """Denormal float32 inputs as a -ftz=true device reads them: signed zero."""
    return torch.where(x.abs() < MIN_NORMAL, x * 0, x)


def check_ulp_bound(got, want, bound):
    """got within `bound` ulps of the correctly rounded `want` (float32) where want is normal and
    finite; where want is below the normal range, got must be a (signed) zero; a result that the
    error pushed below the normal range may be flushed too. Returns the signed errors in ulps where
    checked."""
    bound = torch.as_tensor(bound).expand_as(want).long()
    tiny = want.abs() < MIN_NORMAL
    assert (got[tiny] == 0).all(), f"denormal results not flushed: {got[tiny & (got != 0)][:5].tolist()}"
    normal = ~tiny & want.isfinite()
    err = ulps(got, want)
    pushed_below = (got == 0) & (ordered(want.abs()) - bound < ordered(torch.tensor(MIN_NORMAL)))
    bad = normal & ~pushed_below & (err > bound)
    assert not bad.any(), (
        f"errors above the bound: got {got[bad][:5].tolist()}, want {want[bad][:5].tolist()}, "
        f"ulps {err[bad][:5].tolist()}, bound {bound[bad][:5].tolist()}")
    same_special = ~want.isfinite() & ~(got.isnan() & want.isnan())
    assert torch.equal(got[same_special], want[same_special])
    keep = normal & ~pushed_below
    return (ordered(got) - ordered(want))[keep], bound[keep]


def check_really_perturbed(signed_err, bound):
    """The mode is not silently exact: most results move, both ways, some by the full maximum."""
    moved = (signed_err != 0).double().mean().item()
    assert moved > 0.5, f"only {moved:.1%} of the results differ from the correctly rounded value"
    assert (signed_err > 0).any() and (signed_err < 0).any()
    assert (signed_err.abs() == bound).any(), "no result reaches the documented maximum"


def exp_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.cat([
        torch.rand(200_000, generator=g, dtype=torch.float64) * 200 - 110,   # to overflow and underflow
        torch.randn(100_000, generator=g, dtype=torch.float64),              # the softmax range
        -torch.rand(50_000, generator=g, dtype=torch.float64) * 20,
        torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-30, 88.72, 88.73, -87.3, -103.9, -104.0, float("inf"),
                      float("-inf"), float("nan")], dtype=torch.float64),
    ]).float()


def test_exp_within_documented_error(device):
    """__expf: 2 + floor(abs(1.173 * x)) ulp (Programming Guide, intrinsic functions table)."""
    x = exp_inputs()
    want = torch.exp(flushed(x).double()).float()
    bound = 2 + torch.floor(x.double().abs() * 1.173).clamp(max=1e6).long()
    for op in ("exp", "__expf"):
        got = device.arith.apply(op, x)
        err, b = check_ulp_bound(got, want, bound)
        check_really_perturbed(err, b)
    # The error grows with |x|: above 2^-22 relative for large arguments
    big = x.abs() > 50
    checked = big & (want > MIN_NORMAL) & want.isfinite()
    rel = ((device.arith.apply("exp", x).double() - want.double()) / want.double()).abs()[checked]
    assert rel.max() > 2.0 ** -20


def log_inputs():
    g = torch.Generator().manual_seed(1)
    steps = torch.arange(-3000, 3000, dtype=torch.int32)
    around_one = (torch.tensor(1.0).view(torch.int32) + steps).view(torch.float32)  # 1 and its neighbours
    return torch.cat([
        torch.exp2(torch.rand(200_000, generator=g, dtype=torch.float64) * 252 - 126).float(),  # the full range
        torch.rand(100_000, generator=g) * 1.5 + 0.5,                                          # [0.5, 2]
        around_one,
        torch.tensor([0.5, 2.0, 0.49999997, 2.0000002, 1e-40, -1e-40, 0.0, -0.0, -1.0, float("inf"),
                      float("-inf"), float("nan"), MAX_FLOAT, MIN_NORMAL]),
    ])


def test_log_within_documented_error(device):
    """__logf: absolute error 2^-21.41 on [0.5, 2], else 3 ulp."""
    x = log_inputs()
    exact = torch.log(flushed(x).double())
    for op in ("log", "__logf"):
        got = device.arith.apply(op, x)
        inner = (x >= 0.5) & (x <= 2)
        abs_err = (got.double() - exact)[inner]
        assert abs_err.abs().max() <= LOG_ABS_ERROR, abs_err.abs().max()
        assert (abs_err.abs() > 0.99 * LOG_ABS_ERROR).any() and (abs_err > 0).any() and (abs_err < 0).any()
        assert (abs_err != 0).double().mean() > 0.5
        # near 1 the absolute error is a large relative one (log(1 + 2^-23) ~ 1.2e-7)
        near_one = (x != 1) & ((x - 1).abs() < 1e-4)
        assert ((got.double() - exact)[near_one] / exact[near_one]).abs().max() > 1.0
        outer = ~inner
        err, b = check_ulp_bound(got[outer], exact.float()[outer], 3)
        check_really_perturbed(err, b)
        # DAZ: a denormal input reads as zero
        assert got[x == 1e-40].item() == float("-inf") and got[x == -1e-40].item() == float("-inf")
        assert got[x == -1.0].isnan().all() and got[x == 0].eq(float("-inf")).all()


def div_inputs():
    g = torch.Generator().manual_seed(2)
    n = 200_000
    a = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-60, 60, (n,), generator=g))
    b = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-60, 60, (n,), generator=g))
    wide_a = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 250 - 125)
    wide_b = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 250 - 125) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return torch.cat([a, wide_a]).float(), torch.cat([b, wide_b]).float()


def test_division_within_documented_error(device):
    """x / y with -prec-div=false, and __fdividef: 2 ulp for |y| in [2^-126, 2^126]."""
    a, b = div_inputs()
    want = (flushed(a).double() / flushed(b).double()).float()
    for op in ("div", "__fdividef"):
        err, bound = check_ulp_bound(device.arith.apply(op, a, b), want, 2)
        check_really_perturbed(err, bound)


def test_division_special_cases(device):
    huge = torch.tensor([2.0 ** 127, -(2.0 ** 127), 2.0 ** 126 * 1.5])
    one = torch.ones(3)
    # __fdividef returns 0 for 2^126 < |y| < 2^128 (and NaN for inf / such y); x / y does not
    assert torch.equal(device.arith.apply("__fdividef", one * 3, huge), torch.tensor([0.0, -0.0, 0.0]))
    assert device.arith.apply("__fdividef", one * float("inf"), huge).isnan().all()
    div = device.arith.apply("div", one * 2.0 ** 100, huge)
    check_ulp_bound(div, (one * 2.0 ** 100) / huge, 2)
    # a denormal quotient or divisor flushes
    assert device.arith.apply("div", torch.tensor([1e-30]), torch.tensor([1e10])).item() == 0.0
    assert device.arith.apply("div", torch.tensor([1.0]), torch.tensor([1e-40])).item() == float("inf")


def test_fp64_stays_exact(device):
    x = torch.linspace(-700, 700, 20001, dtype=torch.float64)
    assert torch.equal(device.arith.apply("exp", x), torch.tensor([math.exp(v) for v in x.tolist()], dtype=torch.float64))
    y = torch.exp2(torch.linspace(-1070, 1020, 20001, dtype=torch.float64))  # denormals included
    assert torch.equal(device.arith.apply("log", y), torch.tensor([math.log(v) for v in y.tolist()], dtype=torch.float64))
    assert torch.equal(device.arith.apply("div", x, y), x / y)


def test_exact_mode_is_the_host_arithmetic(exact):
    x = exp_inputs()
    assert same_bits(exact.arith.apply("exp", x), exact.arith.apply("__expf", x))
    err = ulps(exact.arith.apply("exp", x), torch.exp(x.double()).float())
    assert err[x.abs() < 80].max() <= 1  # (the host's expf: not always correctly rounded)
    a, b = div_inputs()
    assert torch.equal(exact.arith.apply("div", a, b), a / b)
    assert torch.equal(exact.arith.apply("__fdividef", a, b), a / b)
    assert exact.arith.apply("exp", torch.tensor([-95.0])).item() > 0  # a denormal result stays


def test_identities_stay_exact(device):
    """exp(±0) = 1 and log(1) = 0 (a row of one class: Σexp = 1, log Σexp = 0, a loss of exactly 0)."""
    assert device.arith.apply("exp", torch.tensor([0.0, -0.0, 1e-40])).tolist() == [1.0, 1.0, 1.0]
    assert device.arith.apply("log", torch.tensor([1.0])).item() == 0.0


def test_deterministic(device):
    x = exp_inputs()
    for op in ("exp", "log"):
        assert same_bits(device.arith.apply(op, x), device.arith.apply(op, x.clone()))


def test_mode_switch(emu):
    previous = emu.arithmetic(), emu.arithmetic_seed()
    try:
        for name in ("device", "exact"):
            emu.set_arithmetic(name, 7)
            assert emu.arithmetic() == name and emu.arithmetic_seed() == 7
            assert emu.arith.flush_to_zero() == (name == "device")
        with pytest.raises(ValueError, match="exact' or 'device"):
            emu.set_arithmetic("fast")
    finally:
        emu.set_arithmetic(*previous)


def test_environment_selects_the_mode(emu):
    """emulator.load() applies SMOOTHCE_EMU_ARITH and SMOOTHCE_EMU_ARITH_SEED (a fresh process: load()
    is cached)."""
    code = "import emulator; m = emulator.load(); print(m.arithmetic(), m.arithmetic_seed())"
    env = dict(os.environ, SMOOTHCE_EMU_ARITH="device", SMOOTHCE_EMU_ARITH_SEED="5")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=pathlib.Path(__file__).parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["device", "5"]


def test_seed_changes_the_error_pattern(emu):
    previous = emu.arithmetic(), emu.arithmetic_seed()
    x = exp_inputs()
    try:
        emu.set_arithmetic("device", 0)
        a = emu.arith.apply("exp", x)
        emu.set_arithmetic("device", 1)
        b = emu.arith.apply("exp", x)
    finally:
        emu.set_arithmetic(*previous)
    assert (a != b).double().mean() > 0.5


# x, y and (x*y, x+y, exp(x), x/y) with denormals kept (exact) / flushed (device)
KERNEL_CASES = [
    (1e-20, 1e-20),            # x*y underflows to a denormal (FTZ)
    (1.5e-38, -1.4e-38),       # x+y is a denormal (FTZ)
    (1.0, 1e-40),              # y is a denormal input (DAZ): x*y, x/y
    (-95.0, 1e10),             # exp(x) is a denormal
    (1e-30, 1e10),             # x/y is a denormal
]


def test_flush_to_zero_inside_kernels(emu, device):
    x = torch.tensor([c[0] for c in KERNEL_CASES])
    y = torch.tensor([c[1] for c in KERNEL_CASES])
    out = device.arith.in_kernel(x, y)
    denormal = lambda t: (t != 0) & (t.abs() < MIN_NORMAL)  # noqa: E731
    assert not denormal(out).any(), out
    assert out[0, 0] == 0 and out[1, 1] == 0 and out[2, 0] == 0 and out[3, 2] == 0 and out[4, 3] == 0
    assert out[2, 3] == float("inf")  # 1 / (denormal read as 0)
    # the caller's own arithmetic keeps its denormals after the launch
    assert denormal(torch.tensor([1e-20]) * torch.tensor([1e-20])).all()
    emu.set_arithmetic("exact")
    out = emu.arith.in_kernel(x, y)
    assert denormal(out[0, 0]) and denormal(out[1, 1]) and denormal(out[2, 0]) and denormal(out[3, 2])
    assert denormal(out[4, 3])


# ------------------------------------------------------------------ the emulated kernels in device mode

# One case per kernel family (tests/test_cuda_emulated.py's CASES): rows (one thread, a warp, a block
# per row), split rows, clusters, strided.
KERNEL_PLANS = ["rows_tiny_c", "rows_warp", "rows_block", "split", "cluster", "strided_staged", "strided_unstaged"]


@pytest.fixture
def emulated(emu, monkeypatch):
    """smoothce's calls go to the emulated kernels; limits and the arithmetic mode are restored."""
    from test_cuda_emulated import DEFAULT_LIMITS

    previous = emu.arithmetic(), emu.arithmetic_seed()
    monkeypatch.setattr(_function, "_ops", torch.ops.smoothce_emu)
    yield emu
    emu.set_limits(**DEFAULT_LIMITS)
    emu.set_arithmetic(*previous)


def run_in_both_modes(emu, case, dtype, scale, soft=False, seed=0):
    """{mode: (mine, theirs, truth)} of one index- or probability-target problem on plan `case`
    (device mode with the error pattern `seed`)."""
    from test_cuda_emulated import CASES, _input_shape

    leaf_shape, view, limits, _ = CASES[case]
    emu.set_limits(**limits)
    shape = _input_shape(leaf_shape, view)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(leaf_shape, dtype, seed=len(case), scale=scale)
    if soft:
        target = make_prob_target(shape, dtype)
        kwargs = dict(weight=make_weight(C, dtype), reduction="none", label_smoothing=0.2)
    else:
        target = make_index_target(positions_shape(shape), C, seed=3)
        kwargs = dict(weight=make_weight(C, dtype), reduction="none", label_smoothing=0.1)
    out = {}
    for mode in ("exact", "device"):
        emu.set_arithmetic(mode, seed)
        out[mode] = run_all(smoothce.cross_entropy, x, target, view=view, **kwargs)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("case", KERNEL_PLANS)
def test_kernels_change_within_the_bound(emulated, case, scale, soft, seed):
    """fp32: device mode changes the loss and the gradient, and both modes meet the fp32 accuracy
    bound of conftest.py (wide logits, scale 30: __expf's error grows with |x - max|), whatever the
    pattern of errors (seed)."""
    results = run_in_both_modes(emulated, case, torch.float32, scale, soft, seed)
    for mine, theirs, truth in results.values():
        check_all(mine, theirs, truth, torch.float32)
    exact, device = results["exact"][0], results["device"][0]
    assert not torch.equal(exact[1], device[1]), "device arithmetic left the gradient unchanged"
    if case == "rows_tiny_c" and scale == 3.0:  # losses of O(1): larger ones are coarser than __logf's 3.6e-7
        assert not torch.equal(exact[0], device[0]), "device arithmetic left the loss unchanged"


@pytest.mark.parametrize("case", KERNEL_PLANS)
def test_fp64_kernels_unchanged(emulated, case):
    """fp64 logits: fast math leaves double arithmetic alone, so both modes give identical bits."""
    results = run_in_both_modes(emulated, case, torch.float64, 3.0)
    for a, b in zip(results["exact"][0][:2], results["device"][0][:2]):
        assert torch.equal(a, b)
