"""Precision of confident rows: every element of the loss and of the gradient against a float64 truth
that does not cancel, to a few fp32 ulps relative to what the element is made of (docs/semantics.md §5).

When the target's probability is near 1 (late LM training, distillation), p_t − 1 and log Σexp are small
numbers: formed as exp(−log Σexp) − 1 and log(1 + rest) they cancel, and fp32 keeps none of their
digits (margin 20: rest = Σ_{j≠t} exp(x_j − x_t) ≈ 2e-9 < 2^-24, so Σexp rounds to 1, the loss to 0 and
the target's gradient to 0). Torch does so. The kernels must not: each row also sums
rest = Σ_{x_j < max} exp(x_j − max), and where one class sits at the max, log Σexp = log1p(rest) and, at
that class, 1 − p = rest/(1 + rest).

Truth (`exact`). Computed in float64 from the inputs' own (fp32 or half) values, per position:
m = max, d_j = m − x_j ≥ 0, rest = Σ_{x_j<m} exp(−d_j), n_max = #{x_j = m}, L = log Σexp(x − m) =
log1p(rest) if n_max = 1 else log(n_max + rest), p_j = exp(−(d_j + L)), r = rest/(1 + rest) (= 1 − p at
a sole max), M = Σ_c w_c·q_c, Z = 2α·v·lse (z-loss), s = the reduction's scale of the position. Then

    loss = Σ_c w_c·q_c·(L + d_c) + α·v·lse²                       (non-negative terms only)
    g_j  = s·[(M + Z)·p_j − w_j·q_j]                              (j not a sole max)
    g_j  = s·[(Σ_{c≠j} w_c·q_c + Z) − (M + Z)·r]                  (j the sole max)

the last being the same number arranged so that no two nearly equal terms are subtracted (Σ_{c≠j} is
summed over the other classes, not formed as M − w_j·q_j). test_truth_matches_mpmath checks this
against 50-digit mpmath on rows of margin up to 30, where float64 itself cancels (it shows that the
float64 reference, which cancels, fails the same check).

Error model (u = 2^-24, half an ulp of 1: an fp32 ulp is at most 2u relative). An element's allowed
error is u times the magnitudes of the terms it is made of, each with its own budget in u:

  * K = 16 for every term: the final rounding, the products and sums of a few numbers, the fp32
    constants (ε/C, on/off, Σ_c w_c).
  * exp_ulps = 2: the CPU kernels' exp (AVX2: a polynomial, ≤ 1.98 ulp; AVX-512: a table and a polynomial,
    ≤ 1.06 ulp; the emulator's exact mode: libm's).
  * S = log2(C) (plus log2(positions) where the mean's denominator enters): sums over C classes (or
    over positions), accumulated in lanes, blocks and trees.
  * exp's argument: d = x − max is rounded once (relative error ≤ u·d in exp(−d)); the gradient's
    argument (x − max) − L twice (≤ 2u·(d + L)). This conditioning is the input's, not the kernel's.
  * rest: Σ_c share_c·(2·exp_ulps(d_c) + d_c) + log2 C, with share_c = exp(−d_c)/rest (the other classes'
    exp errors, weighted by their share of rest).
  * L: rest/(n_max + rest)·rest_budget, plus 1 ulp (2u·L) of log1p for a sole max with rest < 1 (the
    confident rows), elsewhere 2u·L + u of log(n_max + rest).
  * p_j (j not a sole max): 2·(exp_ulps(d_j + L) + exp_ulps(0)) (two exps: the kernels scale a stored
    exp(x − block origin)) + 2·(d_j + L) + L's budget. r: rest's budget + the division + 1.

  Bounds: g_j (not a sole max): u·[(K + S + p_budget)·A + (K + S)·B], A = s·(M + |Z|)·p_j, B = s·w_j·q_j.
  g_j (sole max): u·[(K + S)·(A' + s·off·v·w_j) + (K + S + r_budget)·B'], A' = s·(Σ_{c≠j} w_c·q_c + |Z|),
  B' = s·(M + |Z|)·r. The s·off·v·w_j term is the target's own smoothing share: the kernels know Σ_{c≠j}
  w_c only as Σ_c w_c − w_j (one fp32 sum). It is ε/C-sized: no term of the bound is of the size
  s·w_t·1 of a confident target's p_t − 1, the size of the error that cancellation makes. (|Z| uses
  |m| + L for |lse|, the magnitudes lse is made of.)
  loss: u·[(K + log2 C)·loss + M·L_budget + α·v·2·(|m| + L)·(|m| + L + L_budget)]. With ε = 0 and a
  confident target, loss = w_t·L and the bound is relative to L. Reduced losses add the per-position
  bounds and (K + log2 positions)·u·|total|.

Emulated CUDA kernels in device arithmetic (SMOOTHCE_TEST_BACKEND=emu SMOOTHCE_EMU_ARITH=device) and
the cuda backend (nvcc --use_fast_math): exp_ulps(z) = 2 + ⌊1.173·z⌋ (__expf) in place of 2; the
division 2 ulp (4u); __logf 3 ulp (6u·L), or 2^-21.41 absolute (6u) for arguments in [0.5, 2], wherever
log1p (1 ulp) is not used; rest also gets 2 ulp (4u) per rescaling of a partial sum by exp(Δ) as the
running max rises (⌈log2 C⌉ allowed).

Half precision (bf16, fp16 logits): the kernels compute in fp32 and round once, so the gradient (input
dtype) and the loss (input dtype) must be within 1 ulp of that dtype at the truth plus the fp32 bound.

test_tolerance_rejects_cancellation shows that the bound fails torch's (cancelling) results on the
confident rows, test_not_worse_than_torch and test_issue_example_two_classes check the issue's
statements directly. Probability targets (distillation): the loss and, at the argmax class, the gradient
(which needs Σ_{c≠max} w_c·q_c without cancellation too).
"""
import math
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import smoothce
from conftest import BACKEND, make_weight, ref

U = 2.0 ** -24  # half an fp32 ulp of 1
K = 16
DEVICE_ARITH = BACKEND == "cuda" or (BACKEND == "emu" and os.environ.get("SMOOTHCE_EMU_ARITH", "exact") == "device")
CPU_EXP_ULPS = 2
DIV_U = 4 if DEVICE_ARITH else 1
IGNORE = -100
MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}

# Margins x_t − max_{j≠t} x_j of the confident rows; the largest class counts get fewer rows.
MARGINS = (0.5, 5.0, 10.0, 15.0, 20.0, 30.0)
WRONG_MARGINS = (5.0, 15.0, 30.0)
BIG_MARGINS = (5.0, 15.0, 30.0)
BIG_WRONG_MARGINS = (20.0,)

OPTIONS = {
    "plain-none": dict(reduction="none"),
    "weighted-sum": dict(weighted=True, reduction="sum"),
    "smooth-weighted-mean": dict(label_smoothing=0.1, weighted=True, reduction="mean"),
    "smooth-none": dict(label_smoothing=0.1, reduction="none"),
    "others-sum": dict(smoothing="others", label_smoothing=0.1, reduction="sum"),
    "values-weighted-mean": dict(target_values=(0.9, 1e-4), weighted=True, reduction="mean"),
    "zloss-weighted-mean": dict(z_loss=1e-3, weighted=True, reduction="mean"),
    "zloss-smooth-none": dict(z_loss=1e-4, label_smoothing=0.1, reduction="none"),
    "mixup-smooth-mean": dict(mixup="other", lam=0.7, label_smoothing=0.1, reduction="mean"),
    "mixup-same-weighted-sum": dict(mixup="same", lam=0.7, weighted=True, reduction="sum"),
}
CLASSES = [2, 3, 17, 33, 1000, pytest.param(32000, marks=pytest.mark.slow),
           pytest.param(128256, marks=pytest.mark.slow)]


# ------------------------------------------------------------------ the truth and its error model

class Truth(NamedTuple):
    loss: torch.Tensor        # (P,) per position, before the reduction
    loss_tol: torch.Tensor    # (P,)
    grad: torch.Tensor        # (P, C), with the reduction's scale
    grad_tol: torch.Tensor    # (P, C)
    grad_mag: torch.Tensor    # (P, C) |A| + |B|: the terms of the non-cancelling arrangement
    grad_exp: torch.Tensor    # (P, C) the part of grad_tol / u that comes from the exps (and their arguments)
    loss_exp: torch.Tensor    # (P,) the part of loss_tol / u that comes from L (the exps, their arguments, the log)
    confident: torch.Tensor   # (P,) a sole max with p_max > 1/2 (rest < 1)


def exp_ulps(z):
    """The kernels' exp error in ulps at argument −z (z ≥ 0)."""
    z = torch.as_tensor(z, dtype=torch.float64)
    return 2 + torch.floor(1.173 * z) if DEVICE_ARITH else torch.full_like(z, CPU_EXP_ULPS)


def exact(x, q, v, w, s, flat, *, z_loss=0.0, mean=False):
    """The float64 truth of the module docstring for rows x (P, C) of logits, target masses q (P, C),
    target mass v (P,) (0: ignored), class weights w (C,), gradient scales s (P,) and the smoothing
    share flat = off·v (P,), with its error bounds."""
    P, C = x.shape
    v, s, flat = v[:, None], s[:, None], flat[:, None]
    m = x.amax(1, keepdim=True)
    at_max = x == m
    n_max = at_max.sum(1, keepdim=True).double()
    d = m - x
    e = torch.where(at_max, torch.zeros_like(d), torch.exp(-d))
    rest = e.sum(1, keepdim=True)
    sole = n_max == 1
    L = torch.where(sole, torch.log1p(rest), torch.log(n_max + rest))
    lse = m + L
    p = torch.exp(-(d + L))
    r = rest / (1 + rest)
    wq = w * q
    M = wq.sum(1, keepdim=True)
    Z = 2 * z_loss * v * lse
    loss = (wq * (L + d)).sum(1, keepdim=True) + z_loss * v * lse ** 2
    peak = at_max & sole
    others = (wq * ~at_max).sum(1, keepdim=True)  # Σ_{c≠j} w_c·q_c at a sole max j
    grad = torch.where(peak, s * (others + Z - (M + Z) * r), s * ((M + Z) * p - wq))

    # Magnitudes (module docstring)
    abs_lse = m.abs() + L
    z_mag = 2 * z_loss * v * abs_lse
    A, B = s * (M + z_mag) * p, s * wq
    A_peak, B_peak = s * (others + z_mag) + s * flat * w, s * (M + z_mag) * r
    grad_mag = torch.where(peak, A_peak + B_peak, A + B)

    # Budgets, in units of u
    S_row = math.log2(C)
    S = S_row + (math.log2(max(P, 2)) if mean else 0.0)
    share = e / rest.clamp_min(torch.finfo(torch.float64).tiny)
    rescale = 4 * math.ceil(math.log2(C)) if DEVICE_ARITH else 0
    rest_exp = (share * (2 * exp_ulps(d) + d)).sum(1, keepdim=True) + rescale
    rest_budget = rest_exp + S_row
    log1p_path = sole & (rest < 1)
    log_other = 6 * L.clamp(min=1) if DEVICE_ARITH else 2 * L + 1
    L_budget = rest / (n_max + rest) * rest_budget + torch.where(log1p_path, 2 * L, log_other)
    y = d + L
    p_exp = 2 * (exp_ulps(y) + exp_ulps(0)) + 2 * y
    p_budget = p_exp + L_budget
    r_budget = rest_budget + DIV_U + 1
    grad_tol = U * torch.where(peak, (K + S) * A_peak + (K + S + r_budget) * B_peak,
                               (K + S + p_budget) * A + (K + S) * B)
    grad_exp = torch.where(peak, rest_exp * B_peak, (p_exp + L_budget) * A)
    loss_exp = M * L_budget + z_loss * v * 2 * abs_lse * (abs_lse + L_budget)
    loss_tol = U * ((K + S_row) * loss + loss_exp)
    return Truth(loss[:, 0], loss_tol[:, 0], grad, grad_tol, grad_mag, grad_exp, loss_exp[:, 0], log1p_path[:, 0])


def on_off(C, opts):
    """(on, off) of an index target under the options (docs/semantics.md §3.1)."""
    if "target_values" in opts:
        return tuple(float(t) for t in opts["target_values"])
    eps = opts.get("label_smoothing", 0.0)
    if opts.get("smoothing") == "others":
        return 1.0 - eps, eps / (C - 1)
    return 1.0 - eps + eps / C, eps / C


def index_q(C, a, b, lam, on, off, w):
    """q (P, C), target mass v (P,), the mean's denominator share k_a·w_a + k_b·w_b (P,), for index
    targets a (and the mixup partner b with share 1 − lam)."""
    P = a.numel()
    q = torch.zeros(P, C, dtype=torch.float64)
    v = torch.zeros(P, dtype=torch.float64)
    den = torch.zeros(P, dtype=torch.float64)
    rows = torch.arange(P)
    for t, share in ((a, lam), (b, 1.0 - lam)) if b is not None else ((a, 1.0),):
        valid = t != IGNORE
        k = valid.double() * share
        idx = torch.where(valid, t, torch.zeros_like(t))
        q += k[:, None] * off
        q[rows, idx] += k * (on - off)
        v += k
        den += k * w[idx]
    return q, v, den


def scales(reduction, P, upstream, den):
    if reduction == "none":
        return upstream
    if reduction == "sum":
        return torch.ones(P, dtype=torch.float64)
    return torch.full((P,), 1.0 / den.sum().item(), dtype=torch.float64)


def reduced(truth, reduction, den):
    """The truth's loss as the reduction returns it, and its bound."""
    if reduction == "none":
        return truth.loss, truth.loss_tol
    total, tol = truth.loss.sum(), truth.loss_tol.sum()
    if reduction == "mean":
        total, tol = total / den.sum(), tol / den.sum()
    return total, tol + (K + math.log2(truth.loss.numel())) * U * total.abs()


# ------------------------------------------------------------------ checks

def ulp(t, dtype):
    """The spacing of `dtype` at |t| (subnormal spacing below its normal range)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(t.double().abs().clamp(min=fi.tiny))
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), e.double() - MANTISSA[dtype])


def assert_within(got, want, tol, what, dtype=torch.float32, rows=None):
    """|got − want| ≤ tol elementwise (NaN fails), on the rows selected by the mask `rows` (default: all); the
    message gives the errors in fp32 ulps of the truth."""
    got = got.detach().double().reshape(want.shape)
    err = (got - want).abs()
    bad = ~(err <= tol)
    if rows is not None:
        bad &= rows.reshape(rows.shape + (1,) * (bad.dim() - rows.dim()))
    if bad.any():
        unit = ulp(want, torch.float32)
        excess = torch.where(bad, err / tol.clamp_min(1e-300), torch.zeros_like(err))
        i = int(excess.flatten().argmax())
        at = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else ()
        pick = lambda t: t.flatten()[i].item()  # noqa: E731
        in_ulps = err / unit if rows is None else (err / unit)[rows]
        raise AssertionError(
            f"{what} ({str(dtype).replace('torch.', '')}): {int(bad.sum())} of {in_ulps.numel()} elements outside "
            f"the bound; worst at {at}: got {pick(got)!r}, truth {pick(want)!r}, error {pick(err / unit):.4g} fp32 "
            f"ulps of the truth, allowed {pick(tol / unit):.4g}; largest error {in_ulps.max().item():.4g} ulps")


def assert_half_within(got, want, tol32, what, dtype):
    """A half-precision result: the truth rounded once (1 ulp of dtype) plus the fp32 bound."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert_within(got, want, tol32 + ulp(want, dtype), what, dtype)


# ------------------------------------------------------------------ inputs

def confident_batch(C, *, seed, rows=0):
    """fp32 rows of C logits N(0, 2) and their targets: one row confident in its target per margin, rows
    confident in a wrong class, ordinary rows (the first with a tie at the max), and, last, a confident
    row whose target is ignored. At least `rows` rows (more ordinary ones)."""
    big = C >= 32000
    margins = BIG_MARGINS if big else MARGINS
    wrong = BIG_WRONG_MARGINS if big else WRONG_MARGINS
    hot_rows = [(mg, True) for mg in margins] + [(mg, False) for mg in wrong]
    P = max(len(hot_rows) + 3, rows)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, C, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, C, (P,), generator=g)
    for i, (margin, correct) in enumerate(hot_rows):
        hot = int(t[i]) if correct else (int(t[i]) + 1 + int(torch.randint(0, C - 1, (), generator=g))) % C
        others = x[i].clone()
        others[hot] = -math.inf
        x[i, hot] = others.max() + margin
    others = x[-1].clone()
    others[t[-1]] = -math.inf
    x[-1, t[-1]] = others.max() + 15.0
    x = x.float()
    tie = len(hot_rows)
    j = (int(x[tie].argmax()) + 1) % C
    x[tie, j] = x[tie].max()
    t[-1] = IGNORE
    return x, t


def partner(a, kind, C, seed):
    """Mixup's target_b: another class than a ("other"), or a itself ("same"); ignored where a is."""
    if kind == "same":
        return a.clone()
    g = torch.Generator().manual_seed(seed)
    b = (a + 1 + torch.randint(0, C - 1, a.shape, generator=g)) % C
    return torch.where(a == IGNORE, a, b)


def upstream_for(P, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.rand(P, generator=g, dtype=torch.float64)


class Case(NamedTuple):
    x: torch.Tensor          # (P, C) logits in their dtype
    a: torch.Tensor
    b: object                # mixup partner or None
    weight: object           # (C,) in the logits' dtype or None
    upstream: object         # (P,) in the loss dtype (reduction none) or None
    opts: dict


def make_case(x, a, opts, seed):
    P, C = x.shape
    weight = make_weight(C, torch.float32, seed=seed + 1).to(x.dtype) if opts.get("weighted") else None
    b = partner(a, opts["mixup"], C, seed + 2) if "mixup" in opts else None
    upstream = upstream_for(P, seed + 3).to(x.dtype) if opts["reduction"] == "none" else None
    return Case(x, a, b, weight, upstream, opts)


def loss_kwargs(case):
    o = case.opts
    kw = dict(weight=case.weight, reduction=o["reduction"], label_smoothing=o.get("label_smoothing", 0.0),
              z_loss=o.get("z_loss", 0.0))
    if "smoothing" in o:
        kw["smoothing"] = o["smoothing"]
    if "target_values" in o:
        kw["target_values"] = o["target_values"]
    return kw


def to_layout(rows, layout):
    """(P, C) rows as the input of `layout`: "NC" (classes contiguous) or "NCHW" (classes strided, H·W = 8)."""
    if layout == "NC":
        return rows
    P, C = rows.shape
    return rows.reshape(P // 8, 2, 4, C).permute(0, 3, 1, 2).contiguous()


def from_layout(t, layout):
    return t if layout == "NC" else t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def positions(t, layout):
    return t if layout == "NC" else t.reshape(-1, 2, 4)


def run_smoothce(case, layout="NC"):
    """smoothce's (loss, gradient rows) for the case."""
    leaf = to_layout(case.x, layout).detach().clone().requires_grad_(True)
    kw = loss_kwargs(case)
    a = positions(case.a, layout)
    if case.b is not None:
        loss = smoothce.mixup_cross_entropy(leaf, a, positions(case.b, layout), case.opts["lam"], **kw)
    else:
        loss = smoothce.cross_entropy(leaf, a, **kw)
    loss.backward(None if case.upstream is None else positions(case.upstream, layout))
    return loss.detach(), from_layout(leaf.grad, layout)


def truth_of(case):
    """(Truth, the reduced loss, its bound) for the case."""
    P, C = case.x.shape
    x = case.x.double()
    w = case.weight.double() if case.weight is not None else torch.ones(C, dtype=torch.float64)
    on, off = on_off(C, case.opts)
    q, v, den = index_q(C, case.a, case.b, case.opts.get("lam", 1.0), on, off, w)
    reduction = case.opts["reduction"]
    up = case.upstream.double() if case.upstream is not None else None
    truth = exact(x, q, v, w, scales(reduction, P, up, den), off * v, z_loss=case.opts.get("z_loss", 0.0),
                  mean=reduction == "mean")
    return (truth,) + reduced(truth, reduction, den)


def check_case(case, loss, grad_rows, what=""):
    truth, total, total_tol = truth_of(case)
    dtype = case.x.dtype
    if dtype == torch.float32:
        assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}"
        assert_within(loss.flatten(), total.flatten(), total_tol.flatten(), f"loss{what}")
        assert_within(grad_rows, truth.grad, truth.grad_tol, f"input grad{what}")
    else:
        assert_half_within(loss.flatten(), total.flatten(), total_tol.flatten(), f"loss{what}", dtype)
        assert_half_within(grad_rows, truth.grad, truth.grad_tol, f"input grad{what}", dtype)
    return truth


# ------------------------------------------------------------------ 1. the truth itself

def mp_row(x, q, w, v, s, z_loss):
    """Loss and gradient of one row in 50-digit arithmetic, straight from the formulas (cancelling
    freely: 50 digits are enough)."""
    import mpmath

    mp = mpmath.mp
    xs = [mp.mpf(float(t)) for t in x]
    lse = mp.log(mp.fsum(mp.exp(t) for t in xs))
    wq = [mp.mpf(float(a)) * mp.mpf(float(b)) for a, b in zip(w, q)]
    M, Z = mp.fsum(wq), 2 * mp.mpf(z_loss) * mp.mpf(float(v)) * lse
    loss = mp.fsum(c * (lse - t) for c, t in zip(wq, xs)) + mp.mpf(z_loss) * mp.mpf(float(v)) * lse ** 2
    grad = [mp.mpf(float(s)) * ((M + Z) * mp.exp(t - lse) - c) for c, t in zip(wq, xs)]
    return float(loss), [float(g) for g in grad]


MP_CASES = {
    "C2-weighted": dict(C=2, opts=dict(weighted=True, reduction="sum"), cancels=True),
    "C5-smooth-zloss": dict(C=5, opts=dict(label_smoothing=0.1, weighted=True, z_loss=1e-3, reduction="sum")),
    "C17-mixup-others": dict(C=17, opts=dict(mixup="other", lam=0.7, smoothing="others", label_smoothing=0.2,
                                             reduction="mean")),
    "C17-soft": dict(C=17, soft=True, cancels=True),
}


@pytest.mark.cpu_only
@pytest.mark.parametrize("name", list(MP_CASES))
def test_truth_matches_mpmath(name):
    """exact() agrees with mpmath (50 digits) to 2^-44 of the magnitudes each element is made of, on rows of
    margin up to 30. Where ε = 0 (the target's gradient is −s·w·(1 − p), nothing else), the float64 reference
    (which forms p − 1 and log(1 + rest)) does not: the check sees cancellation even in float64."""
    import mpmath

    spec = MP_CASES[name]
    C = spec["C"]
    g = torch.Generator().manual_seed(7)
    margins = (0.5, 10.0, 20.0, 30.0)
    x = torch.randn(len(margins) + 1, C, generator=g, dtype=torch.float64) * 2
    a = torch.randint(0, C, (len(margins) + 1,), generator=g)
    for i, margin in enumerate(margins + (25.0,)):
        hot = int(a[i]) if i < len(margins) else (int(a[i]) + 1) % C  # the last row: confident in a wrong class
        others = x[i].clone()
        others[hot] = -math.inf
        x[i, hot] = others.max() + margin
    x = x.float().double()
    P = x.shape[0]
    ones = torch.ones(P, dtype=torch.float64)
    if spec.get("soft"):
        q, w, v, s, z = distillation_target(x.float(), 0.5).double(), torch.ones(C, dtype=torch.float64), ones, ones, 0
        flat = torch.zeros(P, dtype=torch.float64)
    else:
        case = make_case(x.float(), a, spec["opts"], seed=3)
        w = case.weight.double() if case.weight is not None else torch.ones(C, dtype=torch.float64)
        on, off = on_off(C, case.opts)
        q, v, den = index_q(C, a, case.b, case.opts.get("lam", 1.0), on, off, w)
        s, z = scales(case.opts["reduction"], P, None, den), case.opts.get("z_loss", 0.0)
        flat = off * v
    truth = exact(x, q, v, w, s, flat, z_loss=z)

    with mpmath.workdps(50):
        want = [mp_row(x[i], q[i], w, v[i], s[i], z) for i in range(P)]
    mp_loss = torch.tensor([lw for lw, _ in want], dtype=torch.float64)
    mp_grad = torch.tensor([gr for _, gr in want], dtype=torch.float64)
    bound = 2.0 ** -44
    assert_within(truth.loss, mp_loss, bound * mp_loss.abs(), f"{name}: float64 truth's loss against mpmath")
    assert_within(truth.grad, mp_grad, bound * truth.grad_mag, f"{name}: float64 truth's gradient against mpmath")

    if not spec.get("cancels"):
        return
    # The same check fails the float64 reference: it cancels even in float64 at margin 30.
    leaf = x.clone().requires_grad_(True)
    if spec.get("soft"):
        loss = ref.cross_entropy(leaf, q, reduction="none")
    else:
        kw = {k: val for k, val in loss_kwargs(case).items() if k not in ("weight", "reduction")}
        if case.b is not None:
            loss = ref.mixup_cross_entropy(leaf, a, case.b, case.opts["lam"], weight=w, reduction="none", **kw)
        else:
            loss = ref.cross_entropy(leaf, a, weight=w, reduction="none", **kw)
    loss.backward(s)
    ref_err = ((leaf.grad - mp_grad).abs() / truth.grad_mag).max().item()
    assert ref_err > bound, f"{name}: the float64 reference came within {ref_err:.3g}: the check cannot tell"


# ------------------------------------------------------------------ 2. confident rows, every kernel

@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("C", CLASSES)
def test_confident_rows(C, option):
    """(N, C) logits: C ≤ 32 and C > 32 take different CPU kernels (tiles of rows, one row at a time)."""
    x, a = confident_batch(C, seed=C)
    case = make_case(x, a, OPTIONS[option], seed=C)
    check_case(case, *run_smoothce(case))


@pytest.mark.parametrize("option", ["plain-none", "weighted-sum", "smooth-weighted-mean", "zloss-smooth-none",
                                    "mixup-same-weighted-sum", "mixup-smooth-mean"])
@pytest.mark.parametrize("C", [3, 40, 1000, 3000, 32000])
def test_confident_rows_strided_classes(C, option):
    """(N, C, H, W) logits: the classes strided, positions contiguous (the CPU's tiles across positions, the
    CUDA strided kernel: one lane or thread walks all C classes of a position). Summed in one run, those
    walks' sums had the gradient at 1000 classes 98 ulps off (bound 53), at 3000 136 (bound 31): they
    sum in chunks of about √C classes (walk_chunk, row_math.h)."""
    x, a = confident_batch(C, seed=100 + C, rows=16)
    case = make_case(x, a, OPTIONS[option], seed=C)
    check_case(case, *run_smoothce(case, "NCHW"))


@pytest.mark.parametrize("option", ["plain-none", "smooth-weighted-mean", "zloss-weighted-mean"])
def test_confident_rows_linear(option):
    """linear_cross_entropy with input = eye(N) and linear_weight = logitsᵀ: the GEMM's logits are exact, and
    linear_weight's gradient is the logits' gradient, transposed."""
    x, a = confident_batch(1000, seed=5)
    case = make_case(x, a, OPTIONS[option], seed=5)
    P = x.shape[0]
    inp = torch.eye(P, dtype=torch.float32).requires_grad_(True)
    lw = x.t().contiguous().requires_grad_(True)
    kw = loss_kwargs(case)
    loss = smoothce.linear_cross_entropy(inp, lw, a, chunk_size=4, **kw)
    loss.backward(case.upstream)
    check_case(case, loss.detach(), lw.grad.t(), " (linear_cross_entropy)")


@pytest.mark.parametrize("option", ["weighted-sum", "smooth-none"])
@pytest.mark.parametrize("C", [17, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_confident_rows_half(dtype, C, option):
    """bf16 / fp16 logits: loss and gradient in the input dtype, the float64 truth of the half values
    rounded once (1 ulp of the dtype) plus the fp32 bound."""
    x, a = confident_batch(C, seed=200 + C)
    case = make_case(x.to(dtype), a, OPTIONS[option], seed=C)
    loss, grad = run_smoothce(case)
    assert loss.dtype == dtype and grad.dtype == dtype
    check_case(case, loss, grad)


@pytest.mark.parametrize("option", ["plain-none", "smooth-weighted-mean", "zloss-smooth-none"])
@pytest.mark.parametrize("C", [40, 3000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_confident_rows_half_strided(dtype, C, option):
    """The same with the classes strided ((N, C, H, W): the CPU's widened tiles, the CUDA strided kernel),
    where one lane or thread walks a position's classes. (The half types' own rounding, 1 ulp, is far
    above what chunking the sums changes: test_confident_rows_strided_classes checks that in fp32.)"""
    x, a = confident_batch(C, seed=300 + C, rows=16)
    case = make_case(x.to(dtype), a, OPTIONS[option], seed=C)
    loss, grad = run_smoothce(case, "NCHW")
    assert loss.dtype == dtype and grad.dtype == dtype
    check_case(case, loss, grad)


MASK_BLOCK = 2048  # the CPU rows kernel's block of classes (kRowBlock in csrc/cpu/cross_entropy.cpp)
ROW_SHIFTS = (1.0, 120.0, -5.0, 30.0)  # each row's max becomes −shift (fp32's exp underflows below −103)


@pytest.mark.parametrize("option", ["plain-none", "weighted-sum", "zloss-weighted-mean", "mixup-same-weighted-sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_confident_rows_masked_blocks(dtype, option):
    """Rows with whole blocks of masked (−inf) logits, as a vocabulary padded to a multiple of the block and
    masked ends with, and every logit below 0: the 2053 classes of a confident batch sit in the classes
    2048..4095 and 6144..6148 of 6149, the rest −inf, each row shifted so that its max is −1, −120, 5 or
    −30. A block with no finite logit has no max: taking its sums' origin 0 for one made the row's max 0,
    measured every logit from 0 (exp(−120) underflows: an infinite loss) and lost the confident rows'
    precision. The truth is the compact rows' (a −inf logit adds nothing where ε = 0); the gradient
    is exactly 0 at the masked classes."""
    x, a = confident_batch(MASK_BLOCK + 5, seed=7)
    P, C0 = x.shape
    shift = torch.tensor(ROW_SHIFTS * (P // len(ROW_SHIFTS) + 1))[:P, None]
    x = (x - x.amax(1, keepdim=True) - shift).to(dtype)
    case = make_case(x, a, OPTIONS[option], seed=7)
    cols = torch.cat([torch.arange(MASK_BLOCK, 2 * MASK_BLOCK), torch.arange(3 * MASK_BLOCK, 3 * MASK_BLOCK + 5)])
    C = 3 * MASK_BLOCK + 5
    wide = torch.full((P, C), -math.inf, dtype=dtype)
    wide[:, cols] = case.x
    weight = None
    if case.weight is not None:
        weight = torch.ones(C, dtype=dtype)
        weight[cols] = case.weight
    spread = lambda t: t if t is None else torch.where(t == IGNORE, t, cols[t.clamp_min(0)])  # noqa: E731
    wide_case = case._replace(x=wide, a=spread(case.a), b=spread(case.b), weight=weight)
    loss, grad = run_smoothce(wide_case)
    masked = torch.ones(C, dtype=torch.bool)
    masked[cols] = False
    assert torch.count_nonzero(grad[:, masked]) == 0
    check_case(case, loss, grad[:, cols])


# ------------------------------------------------------------------ 3. the issue's statements

def test_issue_example_two_classes():
    """logits (−6.58, 8.45), target 1, a class weight, reduction='sum' (fp32): torch's gradient is 20% off;
    smoothce's loss and gradient must be within 4 fp32 ulps of the float64 value beyond the conditioning
    of exp's argument, which fp32 rounds (x − max = −15.03 to u·15.03, relative, in rest = exp(x − max);
    (x − max) − L twice in p), and, in device arithmetic, its documented exp and division errors at
    exp(−15.03): 2 + ⌊1.173·15.03⌋ + 2 ulps."""
    x = torch.tensor([[-6.58, 8.45]])
    weight = torch.tensor([0.7, 1.3])
    case = Case(x, torch.tensor([1]), None, weight, None, dict(reduction="sum"))
    loss, grad = run_smoothce(case)
    truth, total, _ = truth_of(case)
    d = (x[0, 1] - x[0, 0]).double()
    L = torch.log1p(torch.exp(-d))
    ulps = 4 + (exp_ulps(d).item() + 2 if DEVICE_ARITH else 0)
    total = total.reshape(1)
    assert_within(loss.reshape(1), total, ulps * ulp(total, torch.float32) + U * d * total.abs(), "loss")
    assert_within(grad, truth.grad, ulps * ulp(truth.grad, torch.float32) + U * 2 * (d + L) * truth.grad.abs(),
                  "input grad")


def torch_comparison_batch(C, seed):
    g = torch.Generator().manual_seed(seed)
    if C == 2:
        x = torch.randn(2000, 2, generator=g, dtype=torch.float64) * 6
        t = x.argmax(1)
        flip = torch.rand(2000, generator=g) < 0.1
        t = torch.where(flip, 1 - t, t)
    else:
        x = torch.randn(64, C, generator=g, dtype=torch.float64) * 2
        t = torch.randint(0, C, (64,), generator=g)
        x[torch.arange(64), t] += 25 * torch.rand(64, generator=g, dtype=torch.float64)
    return x.float(), t


@pytest.mark.parametrize("option", ["weighted-sum", "smooth-none"])
@pytest.mark.parametrize("C", [2, 1000])
def test_not_worse_than_torch(C, option):
    """On every confident row (a sole max with p > 1/2) of a random batch, smoothce's error is at most
    torch's (F.cross_entropy, same fp32 input and options) plus 4 ulps (8u) of the magnitudes and the
    exps' part of the bound (their own ulps and their arguments' conditioning: the two implementations
    round exp and x − max − L differently)."""
    x, a = torch_comparison_batch(C, seed=C)
    case = make_case(x, a, OPTIONS[option], seed=C)
    _, grad = run_smoothce(case)
    leaf = x.clone().requires_grad_(True)
    kw = loss_kwargs(case)
    torch_loss = F.cross_entropy(leaf, a, **{k: val for k, val in kw.items() if k != "z_loss"})
    torch_loss.backward(case.upstream)
    truth, _, _ = truth_of(case)
    rows = truth.confident
    assert rows.sum() > (20 if C == 2 else 5), "too few confident rows to compare"
    margin = U * (8 * truth.grad_mag + truth.grad_exp)
    err_torch = (leaf.grad.double() - truth.grad).abs()
    assert_within(grad, truth.grad, err_torch + margin, "input grad (vs torch's error)", rows=rows)
    # the loss per position: reduction 'none' from both
    kw_none = dict(kw, reduction="none")
    mine = smoothce.cross_entropy(x, a, **kw_none).double()
    theirs = F.cross_entropy(x, a, **{k: val for k, val in kw_none.items() if k != "z_loss"}).double()
    loss_margin = U * (8 * truth.loss + truth.loss_exp)
    assert_within(mine, truth.loss, (theirs - truth.loss).abs() + loss_margin, "loss per position (vs torch's error)",
                  rows=rows)


@pytest.mark.cpu_only
def test_tolerance_rejects_cancellation():
    """The bound is sharp enough to fail a kernel that cancels: torch's results on the confident rows
    (ε = 0, margins ≥ 10: the target's gradient and the loss) are outside it."""
    x, a = confident_batch(17, seed=17)
    case = make_case(x, a, OPTIONS["weighted-sum"], seed=17)
    truth, _, _ = truth_of(case)
    leaf = x.clone().requires_grad_(True)
    F.cross_entropy(leaf, a, weight=case.weight, reduction="sum").backward()
    per_row = F.cross_entropy(x, a, weight=case.weight, reduction="none").double()
    hot = [i for i, margin in enumerate(MARGINS) if margin >= 10]
    rows = torch.arange(len(a))
    t_err = (leaf.grad.double() - truth.grad)[rows, a.clamp(min=0)].abs()
    t_tol = truth.grad_tol[rows, a.clamp(min=0)]
    assert (t_err[hot] > t_tol[hot]).all(), "torch's cancelling target gradients passed the bound"
    assert ((per_row - truth.loss).abs()[hot] > truth.loss_tol[hot]).all(), "torch's cancelling losses passed"


# ------------------------------------------------------------------ 4. probability targets (distillation)

def distillation_target(x, fraction):
    """A teacher about as confident as the logits: P = 1 − δ at each row's argmax, δ = fraction·(1 − p_max)
    spread over the other classes by a softmax of random scores (fp32; rows sum to 1 up to rounding)."""
    P, C = x.shape
    x64 = x.double()
    hot = x64.argmax(1)
    p = torch.softmax(x64, 1)
    delta = fraction * (1 - p[torch.arange(P), hot])
    g = torch.Generator().manual_seed(11)
    spread = torch.softmax(torch.randn(P, C, generator=g, dtype=torch.float64), 1)
    spread[torch.arange(P), hot] = 0
    spread = spread / spread.sum(1, keepdim=True)
    target = delta[:, None] * spread
    target[torch.arange(P), hot] = 1 - delta
    return target.float()


def distillation_case(C, eps=0.0, repeat=1, strided=False, inplace=False):
    """Rows of margins 5 … 30 (`repeat` times over) against distillation_target; eps: label smoothing,
    q = (1 − ε)·P + ε/C; strided: the logits as the transpose of a contiguous tensor; inplace: with
    inplace_backward (on a copy of the leaf)."""
    g = torch.Generator().manual_seed(300 + C)
    margins = (5.0, 10.0, 15.0, 20.0, 30.0) * repeat
    x = torch.randn(len(margins), C, generator=g, dtype=torch.float64) * 2
    for i, margin in enumerate(margins):
        hot = int(torch.randint(0, C, (), generator=g))
        others = x[i].clone()
        others[hot] = -math.inf
        x[i, hot] = others.max() + margin
    x = x.float()
    target = distillation_target(x, 0.5)
    P = x.shape[0]
    ones = torch.ones(P, dtype=torch.float64)
    q = (1 - eps) * target.double() + eps / C
    truth = exact(x.double(), q, ones, torch.ones(C, dtype=torch.float64), ones, torch.zeros(P, dtype=torch.float64))
    leaf = (x.t().contiguous().t() if strided else x.clone()).requires_grad_(True)
    loss = smoothce.cross_entropy(leaf * 1 if inplace else leaf, target, reduction="none", label_smoothing=eps,
                                  inplace_backward=inplace)
    loss.backward(torch.ones_like(loss))
    return truth, loss.detach(), leaf.grad


@pytest.mark.parametrize("C", [17, 1000])
def test_soft_target_distillation_loss(C):
    """Probability target P = 1 − δ on the argmax, δ ≈ 1 − p_max spread over the others, ε = 0: the loss
    (a sum of non-negative terms) within the bound, relative."""
    truth, loss, _ = distillation_case(C)
    assert_within(loss, truth.loss, truth.loss_tol, "loss (probability target)")


@pytest.mark.parametrize("C", [17, 1000])
def test_soft_target_distillation_grad(C):
    """The same rows' gradient: at the argmax class it is Σ_{c≠max} w_c·q_c − M·r, a difference of two
    numbers of size δ and 1 − p_max, which M·p_max − w·q (both ≈ 1) cannot give."""
    truth, _, grad = distillation_case(C)
    assert_within(grad, truth.grad, truth.grad_tol, "input grad (probability target)")


@pytest.mark.parametrize("C,strided", [(150, False), (1000, False), (3000, False), (150, True), (1000, True),
                                       (3000, True), (32000, True)])
def test_soft_target_smoothing_confident(C, strided):
    """The distillation rows with label smoothing ε = 0.1: q = (1 − ε)·P + ε/C adds the same ε/C at every
    class, and a kernel that sums Σq (the gradient's softmax coefficient) or its part below the max one
    class after another in fp32 rounds all those adds the same way. The strided tiles (one lane per
    position, 20 positions: a whole tile and a part) summed so and were 2e-6 relative off at the argmax
    at 150 classes, 1.1e-5 at 1000 (4–7 times the gradient's bound). The CUDA strided kernel, a thread
    per position, summed the same way: on the emulator with device arithmetic its gradient came to 27
    ulps (bound 18) at 150 classes and its loss to 131 ulps (bound 24) at 1000. Both sum compensated
    now. Loss and gradient within the bounds. (At 3000 classes the tiles' Σexp, then one run of fp32
    adds a lane, put the gradient at 3 times the bound; every such sum is chunked now, see
    test_confident_rows_strided_classes. Chunked but not compensated, the emulated CUDA strided
    kernel's gradient came to 1.1 times the bound at 32000 classes.)"""
    truth, loss, grad = distillation_case(C, eps=0.1, repeat=4, strided=strided)
    assert_within(loss, truth.loss, truth.loss_tol, "loss (smoothed probability target)")
    assert_within(grad, truth.grad, truth.grad_tol, "input grad (smoothed probability target)")


@pytest.mark.parametrize("C", [17, 1000, 3000])
def test_soft_target_inplace_backward(C):
    """inplace_backward writes the gradient over the logits: the distillation rows' gradient must be,
    bitwise, what it is without it, and within the bound. fp32 rows used to keep their exps in the
    gradient, over the logits, when the gradient at a sole max looked for its class in them: none was
    found, and that element lost its cancellation-free form (0.28 relative error at margin 20)."""
    truth, _, grad = distillation_case(C, eps=0.1)
    _, _, grad_inplace = distillation_case(C, eps=0.1, inplace=True)
    assert torch.equal(grad_inplace, grad)
    assert_within(grad_inplace, truth.grad, truth.grad_tol, "input grad (inplace_backward)")


# ------------------------------------------------------------------ 4. the CPU kernels' exp

def exp_rows(d, layout):
    """Rows (0, −d, −200, …): 16 classes for "tile" (tiles of gathered rows), else 40, along rows or
    strided ("strided": the transpose of a contiguous tensor, tiles in place)."""
    C = 16 if layout == "tile" else 40
    x = torch.full((d.numel(), C), -200.0)
    x[:, 0] = 0.0
    x[:, 1] = -d
    return x.t().contiguous().t() if layout == "strided" else x


@pytest.mark.cpu_only
@pytest.mark.parametrize("layout", ["tile", "rows", "strided"])
def test_cpu_exp_accuracy(layout):
    """The CPU kernels' vector exp, seen through the loss of rows (0, −d, −200, …) with target 0 and ε = 0:
    the loss is log1p(exp(−d)), and every step but the exp is exact or one rounding (log1p: 1 ulp, the
    store: half an ulp). Over 4000 values of d in [0.01, 87.3] (exp(−d) down to 2^−126) the loss must
    be within 3u for the exp (AVX-512's: at most 1.06 ulp; AVX2's polynomial reaches 1.98 ulp at its
    worst arguments, none of these) + 3u of float64. exp_u20's one-constant reduction of d by n·ln 2
    lost up to 3.3 ulp near d = 87 and fails this. The layouts take the three CPU loop shapes: 16
    classes (tiles of gathered rows), 40 classes along rows, and 40 classes strided (tiles in place)."""
    d = torch.linspace(0.01, 87.3, 4000, dtype=torch.float32)
    x = exp_rows(d, layout)
    loss = smoothce.cross_entropy(x, torch.zeros(d.numel(), dtype=torch.long), reduction="none")
    want = torch.log1p(torch.exp(-d.double()))
    assert_within(loss, want, 6 * U * want.abs(), "loss")


@pytest.mark.cpu_only
@pytest.mark.parametrize("layout", ["tile", "rows", "strided"])
def test_cpu_exp_underflow(layout):
    """Below the normal range: the gradient at class 1 of rows (0, −d, −200, …), target 0, ε = 0, is
    p_1 = exp(−d)/(1 + exp(−d)). AVX-512 builds scale by 2^n with vscalefps, so for d in [87.3, 104]
    p_1 is a denormal within 3·2^−149 of float64 (AVX2 and default builds flush it to 0, allowed
    there); past d = 104.7 (p_1 < 2^−151) and for the −200 columns every build gives exactly 0."""
    d = torch.linspace(80.0, 120.0, 2000, dtype=torch.float32)
    x = exp_rows(d, layout)
    x.requires_grad_()
    smoothce.cross_entropy(x, torch.zeros(d.numel(), dtype=torch.long), reduction="sum").backward()
    got = x.grad[:, 1].double()
    want = torch.softmax(x.detach().double(), dim=1)[:, 1]
    tiny = 2.0 ** -149
    ok = (got - want).abs() <= torch.maximum(6 * U * want, torch.full_like(want, 3 * tiny))
    if smoothce.build_info()["cpu_capability"] != "avx512":
        ok |= (got == 0) & (want < 2.0 ** -126)
    assert ok.all(), f"d = {d[~ok][:5].tolist()}: got {got[~ok][:5].tolist()}, want {want[~ok][:5].tolist()}"
    assert (got[want < 2.0 ** -151] == 0).all()
    assert (x.grad[:, 2:] == 0).all()
    if smoothce.build_info()["cpu_capability"] == "avx512":  # gradual underflow, not a flush
        assert (got[(want > 2.0 ** -140) & (want < 2.0 ** -127)] > 0).all()


@pytest.mark.parametrize("C", [40, 1000, pytest.param(2048, marks=pytest.mark.slow),
                               pytest.param(2049, marks=pytest.mark.slow), pytest.param(5000, marks=pytest.mark.slow)])
def test_rows_with_several_logits_at_the_max(C):
    """Rows with k logits exactly at the max (k = 1, 2, 3, 7, 16, 17; exp(0) = 1 each) and the others
    below it, spread over the row (past a 2048-class block too), ε = 0 and 0.1: loss and gradient
    within the error model's bound. The AVX-512 rows kernel counts the logits at the max instead of
    summing Σexp beside the rest (kCountAtMax: Σexp = rest + k), so a miscount shows here."""
    gen = torch.Generator().manual_seed(C)
    for k in (1, 2, 3, 7, 16, 17):
        x = -(torch.rand(6, C, generator=gen) * 6 + 0.25)  # below 0
        x[:, :k] = 0.0
        x = x[:, torch.randperm(C, generator=gen)].contiguous()
        t = torch.randint(0, C, (6,), generator=gen)
        for eps in (0.0, 0.1):
            case = Case(x, t, None, None, None, dict(reduction="sum", label_smoothing=eps))
            loss, grad = run_smoothce(case)
            check_case(case, loss, grad, f", k = {k}, eps = {eps}")


@pytest.mark.cpu_only
def test_cpu_exp_every_binade():
    """The kernels' vector exp itself (smoothce._C._tile_exp runs the function they inline, in this
    build's instructions) at every 101st float from −0 to −106 (the kernels' arguments, x − max) and
    special values: within 1.1 ulp of exp in double with AVX-512 (a table of 2^(j/16) and a degree-3
    polynomial: 1.06 at worst at every float of [−106, 0] with a normal result), 2 with AVX2 (the
    degree-5 polynomial: 1.98 at worst), 4 in builds without SIMD (at::vec's exp_u20) for normal
    results (the extra arguments: near the polynomial's worst, −2.937, the table's, −58.77, and the
    edges of the normal and denormal results); results below 2^−126 within 1.5·2^−149 (AVX-512: one
    rounding of a value already within 2^−149, vscalefps; 1.0006 at worst at every 7th float) or 0
    (other builds flush them); exactly 1 at ±0, 0 at −inf and below −106, NaN at NaN; and a wrong
    size or dtype is refused."""
    import numpy as np

    capability = smoothce.build_info()["cpu_capability"]
    bound = {"avx512": 1.1, "avx2": 2.0}.get(capability, 4.0)
    x = np.arange(0x80000000, 0xC2D40001, 101, dtype=np.uint32).view(np.float32)  # −0 .. −106
    x = np.concatenate([x, np.array([-2.9371498, -58.765896, -87.33654, -87.33655, -103.97208, -0.0],
                                    dtype=np.float32)])
    out = np.empty_like(x)
    smoothce._C._tile_exp(x, out)
    want = np.exp(x.astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    err = np.abs(out.astype(np.float64) - want) / ulp
    worst = int(np.argmax(np.where(normal, err, 0)))
    assert err[worst] < bound, f"exp({x[worst]!r}) = {out[worst]!r}, want {want[worst]!r}: {err[worst]:.3f} ulp"
    tiny = ~normal
    if capability == "avx512":
        sub = np.abs(out[tiny].astype(np.float64) - want[tiny]) / 2.0 ** -149
        assert sub.max() <= 1.5, f"denormal results off by {sub.max():.3f} of 2^-149"
        assert (out[want > 2.0 ** -148] > 0).all()
    else:
        assert ((out[tiny] == 0) | (np.abs(out[tiny] - want[tiny]) <= 2.0 ** -148)).all()
    assert (out[x == 0] == 1).all() and (x == 0).sum() == 2
    special = np.array([-np.inf, np.nan, -106.5, -1e30, -3.4e38], dtype=np.float32)
    got = np.empty_like(special)
    smoothce._C._tile_exp(special, got)
    assert np.isnan(got[1]) and (got[[0, 2, 3, 4]] == 0).all(), got
    with pytest.raises(ValueError, match="float32 buffers of the same size"):
        smoothce._C._tile_exp(special, np.empty(4, dtype=np.float32))
    with pytest.raises(ValueError, match="float32 buffers of the same size"):
        smoothce._C._tile_exp(special.astype(np.float64), np.empty(5, dtype=np.float64))


@pytest.mark.cpu_only
@pytest.mark.parametrize("layout,C", [("tile", 16), ("rows", 48), ("strided", 40), ("strided", 600)])
def test_cpu_bf16_denormal_gradient(layout, C):
    """bf16 gradient elements below the normal range round to bf16's denormals, as torch rounds fp32 to
    bf16 (the kernels compute in fp32 and round once). Rows (0, −d, −200, …), target 0, ε = 0: the
    gradient at class 1 is p_1 = exp(−d)/(1 + exp(−d)), 2^−121 … 2^−134 for d = x_0 − x_1 in [84, 94).
    Builds with AVX512-BF16 conversions (build_info()["cpu_bf16"]) convert with vcvtneps2bf16, which
    reads a denormal as 0: vectors holding one must round another way. AVX-512 builds: within half a bf16 ulp
    (2^−134 among denormals) plus fp32's bound of float64, and nonzero wherever float64 is at least
    bf16's smallest denormal (2^−133); AVX2 and default builds may flush below 2^−126 (their exp does).
    The layouts take the bf16 stores: gathered rows of 16 classes (masked row stores), rows of 48
    (stores of two vectors and of one), strided maps of 40 classes (widened tiles) and of 600 (tiles
    in place)."""
    d = torch.linspace(84.0, 93.0, 300).to(torch.bfloat16).unique().float()  # 0.5 apart
    frac = torch.arange(64) / 64  # the leading logit, so that x_0 − x_1 is 1/64 apart
    x = torch.full((d.numel() * frac.numel(), C), -200.0)
    x[:, 0] = frac.repeat(d.numel())
    x[:, 1] = -d.repeat_interleave(frac.numel())
    if layout == "strided":
        x = x.t().contiguous().t()
    x = x.to(torch.bfloat16).requires_grad_()
    smoothce.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.long), reduction="sum").backward()
    got = x.grad[:, 1].double()
    want = torch.softmax(x.detach().double(), dim=1)[:, 1]
    tol = torch.maximum(want * (2.0 ** -8 + 6 * U), torch.full_like(want, 2.0 ** -134 + 3 * 2.0 ** -149))
    ok = (got - want).abs() <= tol
    if smoothce.build_info()["cpu_capability"] != "avx512":
        ok |= (got == 0) & (want < 2.0 ** -126)
    assert ok.all(), (f"x_1 = {x.detach()[~ok, 1][:5].tolist()}: got {got[~ok][:5].tolist()}, "
                      f"want {want[~ok][:5].tolist()}")
    if smoothce.build_info()["cpu_capability"] == "avx512":
        assert (got[want >= 2.0 ** -133] > 0).all()
        assert ((got > 0) & (got < 2.0 ** -126)).sum() > 500  # denormals were produced and kept
    assert (x.grad[:, 2:] == 0).all()


# ------------------------------------------------------------------ 5. the CPU tiles' log1p

@pytest.mark.cpu_only
@pytest.mark.parametrize("layout", ["tile", "strided"])
def test_cpu_tile_log1p_accuracy(layout):
    """The tiles' vector log1p (log Σexp = log1p(Σexp − 1), or log1p(rest) at a sole max), over arguments
    the exp cannot blur: rows of m logits 0 and the others −1e30 (exp exactly 1 or 0), so the loss at
    target 0 with ε = 0 is log(m) = log1p(m − 1) exactly (small arguments, exp(−d) at a sole max, are
    covered by test_cpu_exp_accuracy). Within 2u (1 ulp) + U (the store) of float64; and the argument −1
    (every logit −inf: Σexp = 0) gives lse = −inf, not NaN or a finite value."""
    C = 16 if layout == "tile" else 40
    m = torch.arange(1, C + 1)
    x = torch.where(torch.arange(C)[None, :] < m[:, None], 0.0, -1e30).float()
    if layout == "strided":
        x = x.t().contiguous().t()
    loss = smoothce.cross_entropy(x, torch.zeros(C, dtype=torch.long), reduction="none")
    want = torch.log(m.double())
    assert_within(loss, want, 3 * U * want.abs(), "loss of m equal maxima")
    # m = 1: a sole max with nothing below it, log1p(rest = 0) = 0 exactly
    assert float(loss[0]) == 0.0
    # Σexp = 0 in a tile: log1p(−1) = −inf, so lse = −inf (as the rows kernel gives) and the loss NaN
    x = torch.full((3, C), -float("inf"))
    if layout == "strided":
        x = x.t().contiguous().t()
    got, lse, _ = torch.ops.smoothce.forward(x, torch.zeros(3, dtype=torch.long), None, -100, 0, 0.0, False, False)
    assert torch.equal(lse, torch.full((3,), -float("inf"))), lse
    assert torch.isnan(got).all(), got


@pytest.mark.cpu_only
def test_cpu_tile_log1p_every_binade():
    """The tiles' vector log1p itself (smoothce._C._tile_log1p runs the function the kernels inline, in
    this build's instructions) at every 1021st float from −1 to +inf, both signs, and special values:
    under 1 ulp (of the float32 result) from log1p in double (0.811 at worst at every float ≥ −1 with
    AVX-512's reduction, 0.756 with musl's; plain C++ builds call libm's log1pf, glibc 2.36's 1.293),
    exactly 0 at ±0, −inf at −1, +inf at +inf, NaN below −1 and at NaN; and a wrong size or dtype is
    refused."""
    import numpy as np

    bound = 1.0 if smoothce.build_info()["cpu_capability"] in ("avx2", "avx512") else 1.5

    positive = np.arange(0, 0x7F800000, 1021, dtype=np.uint32)  # +0 .. the largest finite float
    negative = np.arange(0x80000000, 0xBF800000, 1021, dtype=np.uint32)  # −0 .. just above −1
    x = np.concatenate([positive, negative]).view(np.float32)
    x = np.concatenate([x, np.array([np.finfo(np.float32).max, 2.0**-149, 1e-30, 0.5, 1.5, 3.0, 2.0**24, 2.0**25,
                                     0.41421357, -0.29289323, -0.25, 0.75 - 1, 1.5 - 1], dtype=np.float32)])
    out = np.empty_like(x)
    smoothce._C._tile_log1p(x, out)
    want = np.log1p(x.astype(np.float64))
    ulp = np.spacing(np.abs(want.astype(np.float32)))
    err = np.abs(out.astype(np.float64) - want) / ulp
    worst = int(np.argmax(err))
    assert err[worst] < bound, f"log1p({x[worst]!r}) = {out[worst]!r}, want {want[worst]!r}: {err[worst]:.3f} ulp"
    assert (out[x == 0] == 0).all() and len(out[x == 0]) == 2
    special = np.array([-1.0, np.inf, np.nan, -1.5, -np.inf, -3e38], dtype=np.float32)
    got = np.empty_like(special)
    smoothce._C._tile_log1p(special, got)
    assert got[0] == -np.inf and got[1] == np.inf and np.isnan(got[2:]).all(), got
    with pytest.raises(ValueError, match="float32 buffers of the same size"):
        smoothce._C._tile_log1p(special, np.empty(5, dtype=np.float32))
    with pytest.raises(ValueError, match="float32 buffers of the same size"):
        smoothce._C._tile_log1p(special.astype(np.float64), np.empty(6, dtype=np.float64))
