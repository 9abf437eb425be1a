"""One rank of the vocab-parallel tests (tests/test_distributed.py starts W of these).

    python tests/_distributed_worker.py --rank R --world W --port P --cases FILE --out DIR [--standin]
        [--backend cpu|emu]

Joins a gloo process group on tcp://127.0.0.1:P, then runs every case of FILE (a JSON list of dicts, written
by tests/test_distributed.py; the keys are listed in `Case`) and writes one JSON result per case to
DIR/<name>.r<rank>.json as soon as the case is done: {"name", "rank", "ok", "error" or "detail", ...}.

Every rank builds the FULL inputs of a case from the case's seed (the same on every rank), takes its shard of
the classes, runs smoothce.distributed's loss + backward on the shard, runs smoothce's single-process loss +
backward on the full inputs, and compares: the loss on every rank, the gradient of this rank's shard with the
matching slice of the single-process gradient (and the probability target's gradient likewise).

Error cases ("kind": "error" or "bad") are called on EVERY rank (a rank that skipped the call would leave the
others waiting in a collective); they pass on a rank when the call raised one of the expected exception types
with a message matching the expected fragment, quickly, and the process group still works afterwards (an
all_reduce on it gives the right sum). They run on their own process group with a short timeout, so that an
implementation that hangs costs seconds, not minutes.

DTensor cases ("kind": "dtensor") hand DTensor logits (and DTensor or plain targets and weights) on a 1-D
device mesh of every rank to smoothce.cross_entropy / mixup_cross_entropy / CrossEntropyLoss, and compare the
loss (a replicated DTensor) and the gradients' full_tensor() with the single-process results;
"dtensor_error" cases must raise ValueError on every rank (see `Case`).

Fused linear cases ("kind": "linear") call vocab_parallel_linear_cross_entropy (or its mixup form) with this
rank's rows of the output layer and compare with smoothce.linear_cross_entropy on the whole layer: the loss,
the rank's rows of the layer's gradients, the input's gradient (summed over the group first when
reduce_input_grad=False) and a probability target's slice; "linear_error" cases are error cases of it.

--backend emu runs every smoothce call on the CPU emulation of the CUDA kernels (tests/emulator.py, which
reads SMOOTHCE_EMU_ARITH and SMOOTHCE_EMU_SCHEDULE); cpu (the default) on smoothce's CPU kernels.

A failing case never stops the others (exceptions are caught per case); destroy_process_group always runs.

--standin: use the stand-in implementation at the end of this file (all_gather the shards, call smoothce on
the concatenation) instead of smoothce.distributed. It exists only to check this harness itself; the tests
never pass it unless SMOOTHCE_DIST_STANDIN=1 is set.
"""
import argparse
import datetime
import json
import math
import pathlib
import re
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import smoothce  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# (rtol, atol as a fraction of max|expected|) of the comparison with the single-process result. Half
# precision: both results are rounded to the dtype; they may differ by an ulp or two.
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
             torch.float16: (2e-2, 1e-2), torch.bfloat16: (2e-2, 1e-2)}
EXCEPTIONS = {"ValueError": ValueError, "RuntimeError": RuntimeError, "IndexError": IndexError,
              "TypeError": TypeError}
SHORT_TIMEOUT_S = 15  # the process group of the error cases
CRASH_TIMEOUT_S = 3  # the process group of the cases known to crash a process (after one died, fail fast)
HANG_S = 10.0  # an error case that takes longer than this counts as a (timed-out) hang


DEFAULTS = dict(kind="compare", shape=[16, 37], dtype="float32", seed=0, reduction="mean", label_smoothing=0.0,
                weight=False, ignore_index=-100, ignore_frac=0.0, smoothing="uniform", target_values=None, z_loss=0.0,
                target_dtype="int64", soft=False, soft_grad=False, mixup=None, lam=0.7, lam_shape=None, split=None,
                explicit=False, vocab_starts=None, num_classes=None, transposed=False, group=None, weight_extra=False,
                bad_target=None, bad_target_b=None, per_rank={}, raises=["ValueError", "RuntimeError"], match="",
                check=None, grad=True, placement="shard:class", target_placement=None, target_b_placement=None,
                weight_placement=None, api="function", dt_error=None, classes=37, bias=False, chunk_size=None,
                fp32_grad_weight=True, reduce_input_grad=True, backward_twice=False, requires=None,
                no_grad=False, bad_hidden=False, crash_group=False, inplace=False)


class Case(dict):
    """A case's options (JSON keys; defaults in brackets):

    name; kind ["compare"] | "error" (ranks disagree) | "bad" (same bad input everywhere);
    shape [16, 37] (the FULL shape: C is the total class count); dtype ["float32"]; seed [0];
    reduction ["mean"]; label_smoothing [0.0]; weight [False]; ignore_index [-100]; ignore_frac [0]
    (fraction of positions set to ignore_index; 1 = all); smoothing ["uniform"]; target_values [None];
    z_loss [0.0]; target_dtype ["int64"]; soft [False] (probability targets); soft_grad [False] (the
    probability target requires grad); mixup [None] | "float" | "tensor"; lam [0.7] (float lam);
    lam_shape [positions] (tensor lam); split [even] (classes per rank, in rank order of the group);
    explicit [False] (pass vocab_start and num_classes; "start_only": vocab_start alone); vocab_starts
    [contiguous] (explicit starts per rank); num_classes [C] (the explicit total; per_rank may override);
    transposed [False] (the shard is a column-major leaf); group [None] (None: group=None; "all": a new
    group of every rank; [ranks]: a new group of those ranks, the others skip the case); weight_extra
    [False] (pass one class weight too many: a rank whose own inputs are inconsistent); bad_target [None]
    (a value written at position 0 of the target); bad_target_b [None] (the same for mixup's target_b);
    inplace [False] (inplace_backward=True on x * 1; with (N, C) logits they must hold the gradient after);
    per_rank [{}] ({"rank": {key: value}} overrides, for error cases; match and raises too); raises [["ValueError",
    "RuntimeError"]]; match [""] (regex, case-insensitive, the error message must contain); check
    [None] | "global_count" | "global_sum" (also show that a known wrong formula gives a clearly
    different value); grad [True] (False: the logits do not require grad: forward only, unless soft_grad).

    DTensor cases (kind "dtensor": compare; "dtensor_error": must raise ValueError on every rank) go through
    smoothce.cross_entropy / mixup_cross_entropy / CrossEntropyLoss with DTensor logits on a 1-D device mesh
    of every rank (distribute_tensor of the same full tensor on every rank). Placements are "replicate",
    "shard:D" or "shard:class" (the class dim). placement ["shard:class"] (the logits'); target_placement
    [None] (None: the plain full tensor; else a DTensor so placed); target_b_placement [None] (mixup's
    target_b, likewise); weight_placement [None] (likewise, for the class weights); api ["function"] |
    "module" (smoothce.CrossEntropyLoss(weight, ...)(logits, target)); dt_error [None] | "mesh2d" (logits
    on a 2-D mesh (2, W/2)) | "inplace" (inplace_backward=True) | "other_mesh" (the target a DTensor on
    another 1-D mesh) | "other_mesh_weight" (the weight likewise).

    Fused linear cases (kind "linear": compare; "linear_error": every rank calls, each must raise) go through
    vocab_parallel_linear_cross_entropy (vocab_parallel_linear_mixup_cross_entropy with mixup) and compare
    with smoothce.linear_cross_entropy (linear_mixup_cross_entropy) on the full output layer. There shape is
    the INPUT's shape (..., H), the same on every rank, and classes [37] the vocabulary V; split,
    explicit, vocab_starts, num_classes, weight (class weights), soft (the rank's slice (..., V_local)),
    soft_grad, mixup, lam, ignore_*, reduction, the smoothing options and grad as above, and: bias [False]
    (linear_bias, the rank's slice); chunk_size [None] (passed to both); fp32_grad_weight [True] (both);
    reduce_input_grad [True] (False: the rank's input gradient is a partial sum; the worker all-reduces it
    to compare); backward_twice [False] (backward(retain_graph=True) twice: the gradients are 2x);
    requires [["input", "linear_weight", "linear_bias"]] (which leaves require grad, when grad);
    no_grad [False] (the call under torch.no_grad(), the leaves requiring grad); bad_hidden [False] (this
    rank's linear_weight has H + 1 columns: with per_rank, one rank's own input is wrong).

    crash_group [False]: the case is known to crash a process (tests/test_distributed.py sets it and runs such
    cases last): it runs on a group of every rank whose timeout is CRASH_TIMEOUT_S, so that the ranks left
    waiting on a dead one give up quickly.
    """

    def __getattr__(self, key):
        if key in self:
            return self[key]
        if key in DEFAULTS:
            return DEFAULTS[key]
        raise AttributeError(key)


def even_split(C, world):
    base, extra = divmod(C, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def class_dim(shape):
    return 0 if len(shape) == 1 else 1


def positions_of(shape):
    shape = tuple(shape)
    return shape[1:] if len(shape) == 1 else shape[:1] + shape[2:]


def draw_index_target(case, classes, positions, g):
    """Class indices in [0, classes) of the positions' shape from generator g, the case's ignore_frac of
    them (all when it is 1) set to its ignore_index."""
    t = torch.randint(0, classes, positions, generator=g, dtype=torch.int64)
    if case.ignore_frac:
        mask = torch.rand(positions, generator=g, dtype=torch.float64) < case.ignore_frac
        if case.ignore_frac >= 1:
            mask = torch.ones(positions, dtype=torch.bool)
        t = torch.where(mask, torch.full_like(t, case.ignore_index), t)
    return t


def build_full(case):
    """The full inputs of a case, from its seed alone (identical on every rank)."""
    shape = tuple(case.shape)
    dtype = DTYPES[case.dtype]
    C = shape[class_dim(shape)]
    pos = positions_of(shape)
    g = torch.Generator().manual_seed(int(case.seed))
    full = {"C": C, "shape": shape, "dtype": dtype}
    full["x"] = (torch.randn(shape, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    tdtype = torch.uint8 if case.target_dtype == "uint8" else torch.int64
    assert tdtype != torch.uint8 or not case.ignore_frac or 0 <= case.ignore_index < 256, "uint8 ignore_index"

    def index_target():
        return draw_index_target(case, C, pos, g)

    if case.soft:
        scores = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        full["target"] = torch.softmax(scores, dim=class_dim(shape)).to(dtype)
    else:
        full["target"] = index_target()
        if case.bad_target is not None:
            full["target"].view(-1)[0] = int(case.bad_target)
        full["target"] = full["target"].to(tdtype)
    if case.mixup:
        full["target_b"] = index_target()
        if case.bad_target_b is not None:
            full["target_b"].view(-1)[0] = int(case.bad_target_b)
        full["target_b"] = full["target_b"].to(tdtype)
        if case.mixup == "tensor":
            lam_shape = tuple(case.lam_shape) if case.lam_shape is not None else pos
            full["lam"] = torch.rand(lam_shape, generator=g, dtype=torch.float64).to(
                torch.float32 if dtype != torch.float64 else torch.float64)
        else:
            full["lam"] = float(case.lam)
    full["weight"] = ((torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype)
                      if case.weight else None)
    if case.reduction == "none":
        full["upstream"] = torch.randn(pos, generator=g, dtype=torch.float64)
    else:
        full["upstream"] = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    return full


def layout(case, C, world, rank):
    """(vocab_start, size) of this rank's shard, and the kwargs that say where it lies."""
    sizes = list(case.split) if case.split is not None else even_split(C, world)
    if len(sizes) != world:
        raise AssertionError(f"case error: split {sizes} is not one size per rank (world {world})")
    if case.vocab_starts is not None:
        starts = list(case.vocab_starts)
    else:
        starts = [sum(sizes[:r]) for r in range(world)]
    kwargs = {}
    if case.explicit:
        kwargs = {"vocab_start": starts[rank],
                  "num_classes": case.num_classes if case.num_classes is not None else C}
        if case.explicit == "start_only":
            del kwargs["num_classes"]
    return starts[rank], sizes[rank], kwargs


def loss_kwargs(case):
    kw = dict(ignore_index=case.ignore_index, reduction=case.reduction, label_smoothing=case.label_smoothing,
              smoothing=case.smoothing, z_loss=case.z_loss)
    if case.target_values is not None:
        kw["target_values"] = tuple(case.target_values)
    return kw


def shard(tensor, dim, start, size):
    return tensor.narrow(dim, start, size).detach().clone().contiguous()


def run_parallel(api, case, full, start, size, placement, group):
    """smoothce.distributed's loss + backward on this rank's shard: (loss, input grad, target grad)."""
    cdim = class_dim(full["shape"])
    x = shard(full["x"], cdim, start, size)
    if case.transposed:
        x = x.t().contiguous().t()  # same values, column-major strides
    x.requires_grad_(bool(case.grad))
    target = full["target"]
    if case.soft:
        target = shard(target, cdim, start, size).requires_grad_(bool(case.soft_grad))
    weight = full["weight"][start:start + size].clone() if full["weight"] is not None else None
    if weight is not None and case.weight_extra:
        weight = torch.cat([weight, weight[:1]])  # one weight too many on this rank (an error case)
    kw = dict(loss_kwargs(case), group=group, **placement)
    logits = x
    if case.inplace:  # inplace_backward: on a layer's output (refused for a leaf), which then holds its gradient
        logits = x * 1
        kw["inplace_backward"] = True
    if case.mixup:
        loss = api.vocab_parallel_mixup_cross_entropy(logits, target, full["target_b"], full["lam"], weight, **kw)
    else:
        loss = api.vocab_parallel_cross_entropy(logits, target, weight, **kw)
    if case.grad or case.soft_grad:
        loss.backward(full["upstream"].to(loss.dtype))
    if case.inplace and case.grad and x.dim() == 2 and not torch.equal(logits.detach(), x.grad):
        raise AssertionError("inplace_backward: the logits do not hold their gradient after backward")
    return loss.detach(), x.grad, (target.grad if case.soft_grad else None)


def run_single(case, full):
    """smoothce's single-process loss + backward on the full inputs."""
    x = full["x"].detach().clone().requires_grad_(True)
    target = full["target"]
    if case.soft_grad:
        target = target.detach().clone().requires_grad_(True)
    kw = loss_kwargs(case)
    if case.mixup:
        loss = smoothce.mixup_cross_entropy(x, target, full["target_b"], full["lam"], full["weight"], **kw)
    else:
        loss = smoothce.cross_entropy(x, target, full["weight"], **kw)
    loss.backward(full["upstream"].to(loss.dtype))
    return loss.detach(), x.grad, (target.grad if case.soft_grad else None)


def mismatch(actual, expected, dtype, what, tolerance=None):
    """None when actual matches expected to the dtype's tolerance (TOLERANCE, or the given {dtype: (rtol,
    atol)}; NaN and inf where expected has them), else a description of the worst difference."""
    if actual is None:
        return f"{what}: missing (None)"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    rtol, atol = (tolerance or TOLERANCE)[dtype]
    a = actual.detach().double().reshape(-1)
    e = expected.detach().double().reshape(-1)
    nan = a.isnan() != e.isnan()
    if nan.any():
        i = nan.nonzero()[0].item()
        return f"{what}: NaN pattern differs (flat index {i}: got {a[i].item()!r}, expected {e[i].item()!r})"
    inf = e.isinf()
    if not torch.equal(a[inf], e[inf]):
        return f"{what}: infinities differ: got {a[inf][:5].tolist()}, expected {e[inf][:5].tolist()}"
    finite = e.isfinite()
    if not finite.any():
        return None
    a, e = a[finite], e[finite]
    if not a.isfinite().all():
        return f"{what}: non-finite {a[~a.isfinite()][:3].tolist()} where the single-process value is finite"
    scale = e.abs().max().item() or 1.0
    err = (a - e).abs()
    allowed = atol * scale + rtol * e.abs()
    if (err <= allowed).all():
        return None
    worst = (err - allowed).argmax().item()
    return (f"{what} ({str(dtype).replace('torch.', '')}): {int((err > allowed).sum())} of {a.numel()} values "
            f"off; worst at flat index {worst}: got {a[worst].item()!r}, expected {e[worst].item()!r} "
            f"(|diff| {err[worst].item():.3e}, allowed {allowed[worst].item():.3e}); max |diff| {err.max().item():.3e}")


def hexes(t):
    return [float(v).hex() for v in t.detach().double().reshape(-1).tolist()]


def wrong_values(case, full, sizes, starts, rank):
    """The loss of two known wrong formulas (float64; index targets, no weight, mean, uniform ε), next to the
    right one from the same code: {"right": v, "<wrong name>": v, ...}."""
    x = full["x"].double()
    t = full["target"].long()
    assert x.dim() == 2 and full["weight"] is None and case.reduction == "mean" and not case.ignore_frac
    C = x.shape[1]
    eps = float(case.label_smoothing)
    lse = torch.logsumexp(x, dim=1)
    nlp = lse[:, None] - x  # -log p
    nlp_t = nlp.gather(1, t[:, None]).squeeze(1)
    base = (1 - eps) * nlp_t
    out = {"right": (base + eps / C * nlp.sum(1)).mean().item()}
    if case.check == "global_count":
        # ε spread with each shard's own class count: ε/C_r on the classes of rank r.
        smooth = sum(eps / sizes[r] * nlp[:, starts[r]:starts[r] + sizes[r]].sum(1) for r in range(len(sizes)))
        out["local class count"] = (base + smooth).mean().item()
        # Megatron-style: ε times the mean of -log p over this rank's shard only.
        mine = nlp[:, starts[rank]:starts[rank] + sizes[rank]]
        out["mean over the local shard"] = (base + eps * mine.mean(1)).mean().item()
    else:
        s, n = starts[rank], sizes[rank]
        # ε/C times Σ -log p over this rank's classes only (global C).
        out["sum of -log p over the local shard"] = (base + eps / C * nlp[:, s:s + n].sum(1)).mean().item()
        # Transformer-Engine-style: ε·lse − ε/C·Σx with Σx over the local shard only.
        out["sum of x over the local shard"] = (base + eps * lse - eps / C * x[:, s:s + n].sum(1)).mean().item()
    return out


def run_compare(api, case, rank, world, group):
    full = build_full(case)
    start, size, placement = layout(case, full["C"], world, rank)
    dtype = full["dtype"]
    loss, grad, tgrad = run_parallel(api, case, full, start, size, placement, group)
    ref_loss, ref_grad, ref_tgrad = run_single(case, full)
    cdim = class_dim(full["shape"])
    problems = [mismatch(loss, ref_loss, dtype, "loss")]
    if case.grad:
        problems.append(mismatch(grad, ref_grad.narrow(cdim, start, size), dtype, "input grad (this rank's shard)"))
    elif grad is not None:
        problems.append("input grad: the logits do not require grad, yet they received one")
    if case.soft_grad:
        problems.append(mismatch(tgrad, ref_tgrad.narrow(cdim, start, size), dtype,
                                 "probability target grad (this rank's shard)")
                        if tgrad is not None else "probability target grad: None (the target requires grad)")
    result = {"loss": hexes(loss), "shard": [start, size]}
    if case.check:
        sizes = list(case.split) if case.split is not None else even_split(full["C"], world)
        starts = [sum(sizes[:r]) for r in range(world)]
        values = wrong_values(case, full, sizes, starts, rank)
        right = values.pop("right")
        rtol, atol = TOLERANCE[dtype]
        tol = atol * abs(ref_loss.item()) + rtol * abs(ref_loss.item())
        result["values"] = dict(values, right=right, single_process=ref_loss.item(), vocab_parallel=loss.item())
        if abs(right - ref_loss.item()) > tol:
            problems.append(f"harness: the plain formula {right!r} differs from smoothce's single-process loss "
                            f"{ref_loss.item()!r}")
        for what, value in values.items():
            if not abs(value - right) > 100 * tol:
                problems.append(f"harness: the wrong formula ({what}) gives {value!r}, too close to the right "
                                f"{right!r} for this case to tell them apart")
            if abs(loss.item() - value) <= 100 * tol:
                problems.append(f"the vocab-parallel loss {loss.item()!r} equals the wrong formula ({what}): "
                                f"{value!r}; the right value is {right!r}")
    problems = [p for p in problems if p]
    result["ok"] = not problems
    result["detail" if not problems else "error"] = "; ".join(problems) if problems else "matches"
    return result


def group_sum_check(group, rank_in_group, size):
    """None when an all_reduce on the group still gives the right sum (no desync, no broken group)."""
    t = torch.tensor([float(rank_in_group + 1), 7.0], dtype=torch.float64)
    try:
        dist.all_reduce(t, group=group)
    except Exception as exc:  # noqa: BLE001
        return f"the process group is unusable after the error: all_reduce raised {type(exc).__name__}: {exc}"
    expected = [size * (size + 1) / 2, 7.0 * size]
    if t.tolist() != expected:
        return f"the process group is out of step after the error: all_reduce gave {t.tolist()}, expected {expected}"
    return None


def run_error(api, case, rank, world, group, rank_in_group, build=None, run=None):
    """Every rank calls the function (with its per-rank overrides); each must raise as expected, quickly,
    and the group must still work afterwards. build/run: the inputs' builder and the call (default: the
    logits form; run_linear_error passes the fused linear form's)."""
    overrides = case.per_rank.get(str(rank), {})
    mine = Case(case, **overrides)
    full = (build or build_full)(mine)
    start, size, placement = layout(mine, full["C"], world, rank_in_group)
    t0 = time.perf_counter()
    raised = None
    try:
        (run or run_parallel)(api, mine, full, start, size, placement, group)
    except Exception as exc:  # noqa: BLE001
        raised = exc
    return error_result(mine, raised, time.perf_counter() - t0, group, rank_in_group, world)


def error_result(mine, raised, seconds, group, rank_in_group, world):
    """The verdict of an error case on one rank: raised as expected (type, message), quickly, and the group
    still works afterwards."""
    problems = []
    if raised is None:
        problems.append("did not raise")
    else:
        message = f"{type(raised).__name__}: {raised}"
        expected = tuple(EXCEPTIONS[n] for n in mine.raises)
        if not isinstance(raised, expected):
            problems.append(f"raised {message!r}; expected one of {mine.raises}")
        elif re.search(r"timed? ?out|timeout", str(raised), re.IGNORECASE) or seconds > HANG_S:
            problems.append(f"hung or broken group: raised {message!r} after {seconds:.1f} s (a collective timed "
                            f"out, here or in an earlier case)")
        elif mine.match and not re.search(mine.match, str(raised), re.IGNORECASE):
            problems.append(f"raised {message!r}, whose message does not match {mine.match!r}")
    after = group_sum_check(group, rank_in_group, world)
    if after:
        problems.append(after)
    result = {"ok": not problems, "raised": None if raised is None else f"{type(raised).__name__}: {raised}",
              "call_seconds": round(seconds, 3)}
    result["detail" if not problems else "error"] = "; ".join(problems) if problems else result["raised"]
    return result


# ------------------------------------------------------------------------------------------- DTensor cases

def placement_of(spec, shape):
    """A DTensor placement from a case's spec: "replicate", "shard:D" or "shard:class" (the class dim)."""
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415
    if spec == "replicate":
        return Replicate()
    kind, _, dim = spec.partition(":")
    if kind != "shard":
        raise AssertionError(f"case error: placement {spec!r}")
    return Shard(class_dim(shape) if dim == "class" else int(dim))


def make_meshes(cases, world):
    """The device meshes the DTensor cases use, made in the same order on every rank (collective)."""
    kinds = {c.kind for c in cases}
    if not kinds & {"dtensor", "dtensor_error"}:
        return {}
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    meshes = {"1d": init_device_mesh("cpu", (world,))}
    errors = {c.dt_error for c in cases if c.kind == "dtensor_error"}
    if errors & {"other_mesh", "other_mesh_weight"}:
        meshes["other"] = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
    if "mesh2d" in errors:
        if world < 4 or world % 2:
            raise AssertionError(f"case error: a 2-D mesh (2, world/2) needs an even world >= 4, not {world}")
        meshes["2d"] = init_device_mesh("cpu", (2, world // 2))
    return meshes


def dtensor_call(case, x, target, target_b, lam, weight, **extra):
    kw = dict(loss_kwargs(case), **extra)
    if case.api == "module":
        return smoothce.CrossEntropyLoss(weight, **kw)(x, target)
    if case.mixup:
        return smoothce.mixup_cross_entropy(x, target, target_b, lam, weight, **kw)
    return smoothce.cross_entropy(x, target, weight, **kw)


def dtensor_inputs(case, full, mesh):
    """The case's inputs, each the plain full tensor or a DTensor distributed from it (on every rank)."""
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415
    shape = full["shape"]

    def place(value, spec):
        if value is None or spec is None or not isinstance(value, torch.Tensor):
            return value
        return distribute_tensor(value, mesh, [placement_of(spec, shape)])

    x = place(full["x"].detach().clone(), case.placement).requires_grad_(bool(case.grad))
    target = place(full["target"].detach().clone(), case.target_placement)
    if case.soft_grad:
        target.requires_grad_(True)
    target_b = place(full.get("target_b"), case.target_b_placement)
    weight = place(full["weight"], case.weight_placement)
    return x, target, target_b, full.get("lam"), weight


def dtensor_grad_problem(what, tensor, grad, expected, dtype, rank, world, cdim):
    """The gradient of a DTensor (a DTensor with the tensor's placement, full_tensor() the single-process
    gradient) or of a plain full tensor (this rank's torch.chunk piece along the class dim equals the matching
    piece of the single-process gradient, and the rest is zero: the ranks' gradients add up to the full one)."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415
    if grad is None:
        return f"{what}: None (it requires grad)"
    if isinstance(tensor, DTensor):
        if not isinstance(grad, DTensor):
            return f"{what}: a {type(grad).__name__}, expected a DTensor"
        problems = []
        if tuple(grad.placements) != tuple(tensor.placements):
            problems.append(f"{what}: placements {grad.placements}, expected the tensor's {tensor.placements}")
        if tuple(grad.to_local().shape) != tuple(tensor.to_local().shape):
            problems.append(f"{what}: local shape {tuple(grad.to_local().shape)}, expected the tensor's local "
                            f"{tuple(tensor.to_local().shape)}")
        problems.append(mismatch(grad.full_tensor(), expected, dtype, f"{what} (full_tensor())"))
        return "; ".join(p for p in problems if p) or None
    if isinstance(grad, DTensor):
        return f"{what}: a DTensor gradient of a plain tensor"
    if tuple(grad.shape) != tuple(expected.shape):
        return f"{what}: shape {tuple(grad.shape)}, expected {tuple(expected.shape)}"
    size = -(-expected.shape[cdim] // world)  # torch.chunk's piece size
    start = min(rank * size, expected.shape[cdim])
    length = max(0, min(size, expected.shape[cdim] - start))
    problems = [mismatch(grad.narrow(cdim, start, length), expected.narrow(cdim, start, length), dtype,
                         f"{what} (this rank's piece [{start}, {start + length}) of the plain tensor)")]
    rest = grad.clone()
    rest.narrow(cdim, start, length).zero_()
    if rest.count_nonzero().item():
        problems.append(f"{what}: nonzero outside this rank's piece [{start}, {start + length})")
    return "; ".join(p for p in problems if p) or None


def run_dtensor(case, rank, world, meshes):
    """DTensor logits through smoothce's own functions; compared with smoothce on the full plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor  # noqa: PLC0415
    mesh = meshes["1d"]
    full = build_full(case)
    dtype, cdim = full["dtype"], class_dim(full["shape"])
    x, target, target_b, lam, weight = dtensor_inputs(case, full, mesh)
    loss = dtensor_call(case, x, target, target_b, lam, weight)
    problems = []
    if not isinstance(loss, DTensor):
        return {"ok": False, "error": f"the loss is a {type(loss).__name__}, expected a DTensor"}
    if tuple(loss.placements) != (Replicate(),):
        problems.append(f"loss placements {loss.placements}, expected (Replicate(),)")
    if loss.device_mesh != mesh:
        problems.append("the loss is on another device mesh than the logits")
    if case.grad or case.soft_grad:
        upstream = distribute_tensor(full["upstream"].to(loss.dtype), mesh, [Replicate()])
        loss.backward(upstream)
    ref_loss, ref_grad, ref_tgrad = run_single(case, full)
    local = loss.to_local().detach()
    problems.append(mismatch(local, ref_loss, dtype, "loss (to_local())"))
    problems.append(mismatch(loss.full_tensor().detach(), ref_loss, dtype, "loss (full_tensor())"))
    if case.grad:
        problems.append(dtensor_grad_problem("input grad", x, x.grad, ref_grad, dtype, rank, world, cdim))
    elif x.grad is not None:
        problems.append("input grad: the logits do not require grad, yet they received one")
    if case.soft_grad:
        problems.append(dtensor_grad_problem("probability target grad", target, target.grad, ref_tgrad, dtype,
                                             rank, world, cdim))
    problems = [p for p in problems if p]
    result = {"loss": hexes(local), "local_shape": list(x.to_local().shape), "ok": not problems}
    result["detail" if not problems else "error"] = "; ".join(problems) if problems else "matches"
    return result


def run_dtensor_error(case, rank, world, meshes):
    """Every rank makes the same bad call; each must raise ValueError (matching `match`), quickly, and the
    default group must still work afterwards."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: PLC0415
    full = build_full(case)
    cdim = class_dim(full["shape"])
    mesh = meshes["1d"]
    t0 = time.perf_counter()
    raised = None
    try:
        extra = {}
        if case.dt_error == "mesh2d":
            x = distribute_tensor(full["x"].detach().clone(), meshes["2d"], [Replicate(), Shard(cdim)])
            target, target_b, lam, weight = full["target"], full.get("target_b"), full.get("lam"), full["weight"]
        else:
            x, target, target_b, lam, weight = dtensor_inputs(case, full, mesh)
            if case.dt_error == "inplace":
                x = x * 1  # not a leaf: inplace_backward is refused for DTensor logits, not for a leaf
                extra["inplace_backward"] = True
            elif case.dt_error == "other_mesh":
                target = distribute_tensor(full["target"], meshes["other"], [Replicate()])
            elif case.dt_error == "other_mesh_weight":
                weight = distribute_tensor(full["weight"], meshes["other"], [Shard(0)])
            else:
                raise AssertionError(f"case error: dt_error {case.dt_error!r}")
        dtensor_call(case, x, target, target_b, lam, weight, **extra)
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001
        raised = exc
    seconds = time.perf_counter() - t0
    problems = []
    if raised is None:
        problems.append("did not raise")
    else:
        message = f"{type(raised).__name__}: {raised}"
        if not isinstance(raised, ValueError):
            problems.append(f"raised {message!r}; expected a ValueError")
        elif seconds > HANG_S:
            problems.append(f"raised {message!r} only after {seconds:.1f} s")
        elif case.match and not re.search(case.match, str(raised), re.IGNORECASE):
            problems.append(f"raised {message!r}, whose message does not match {case.match!r}")
    after = group_sum_check(None, rank, world)
    if after:
        problems.append(after)
    result = {"ok": not problems, "raised": None if raised is None else f"{type(raised).__name__}: {raised}",
              "call_seconds": round(seconds, 3)}
    result["detail" if not problems else "error"] = "; ".join(problems) if problems else result["raised"]
    return result


# ------------------------------------------------------------------------------------------- fused linear

# bfloat16: both results come from bf16 GEMMs (logits rounded to bf16), chunked differently; compared
# loosely against the single-process bf16 result.
LINEAR_TOLERANCE = {**TOLERANCE, torch.bfloat16: (3e-2, 3e-2)}
LINEAR_LEAVES = ("input", "linear_weight", "linear_bias")


def build_linear_full(case):
    """The full inputs of a fused linear case, from its seed alone (identical on every rank): x (..., H), the
    whole output layer W (V, H) and bias (V,), the targets, class weights (V,) and the upstream gradient."""
    shape = tuple(case.shape)
    dtype = DTYPES[case.dtype]
    H, V, pos = shape[-1], int(case.classes), shape[:-1]
    g = torch.Generator().manual_seed(int(case.seed))
    full = {"C": V, "shape": shape, "dtype": dtype, "positions": pos}
    # The targets and the upstream gradient first (the layer after them): a rank whose H differs draws the same.

    def index_target():
        return draw_index_target(case, V, pos, g)

    if case.soft:
        scores = torch.randn(pos + (V,), generator=g, dtype=torch.float64) * 2
        full["target"] = torch.softmax(scores, dim=-1).to(dtype)
    else:
        full["target"] = index_target()
    if case.mixup:
        full["target_b"] = index_target()
        if case.mixup == "tensor":
            full["lam"] = torch.rand(pos, generator=g, dtype=torch.float64).to(
                torch.float32 if dtype != torch.float64 else torch.float64)
        else:
            full["lam"] = float(case.lam)
    full["weight"] = ((torch.rand(V, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype)
                      if case.weight else None)
    if case.reduction == "none":
        full["upstream"] = torch.randn(pos, generator=g, dtype=torch.float64)
    else:
        full["upstream"] = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    full["x"] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    full["W"] = (torch.randn((V, H), generator=g, dtype=torch.float64) * (3.0 / math.sqrt(H))).to(dtype)  # logits ~3
    full["bias"] = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if case.bias else None
    return full


def linear_kwargs(case):
    kw = dict(loss_kwargs(case), chunk_size=case.chunk_size, fp32_grad_weight=bool(case.fp32_grad_weight))
    return kw


def linear_backward(case, loss, upstream):
    """backward with the case's upstream gradient; twice (retain_graph) with backward_twice."""
    upstream = upstream.to(loss.dtype)
    loss.backward(upstream, retain_graph=bool(case.backward_twice))
    if case.backward_twice:
        loss.backward(upstream)


def run_linear_parallel(api, case, full, start, size, placement, group):
    """The fused vocab-parallel loss + backward on this rank's rows of the output layer: (loss, {leaf name:
    (leaf, grad)}); the input's gradient summed over the group when reduce_input_grad is False."""
    requires = set(case.requires if case.requires is not None else LINEAR_LEAVES) if case.grad else set()
    x = full["x"].detach().clone().requires_grad_("input" in requires)
    lw = shard(full["W"], 0, start, size)
    if case.bad_hidden:
        lw = torch.cat([lw, torch.zeros((size, 1), dtype=lw.dtype)], dim=1)  # H + 1 columns on this rank
    lw.requires_grad_("linear_weight" in requires)
    lb = shard(full["bias"], 0, start, size).requires_grad_("linear_bias" in requires) \
        if full["bias"] is not None else None
    target = full["target"]
    if case.soft:
        target = shard(target, target.dim() - 1, start, size).requires_grad_(bool(case.soft_grad))
    weight = full["weight"][start:start + size].clone() if full["weight"] is not None else None
    kw = dict(linear_kwargs(case), linear_bias=lb, weight=weight, group=group,
              reduce_input_grad=bool(case.reduce_input_grad), **placement)
    with torch.no_grad() if case.no_grad else torch.enable_grad():
        if case.mixup:
            loss = api.vocab_parallel_linear_mixup_cross_entropy(x, lw, target, full["target_b"], full["lam"], **kw)
        else:
            loss = api.vocab_parallel_linear_cross_entropy(x, lw, target, **kw)
    if loss.requires_grad:
        linear_backward(case, loss, full["upstream"])
    leaves = {"input": (x, x.grad), "linear_weight": (lw, lw.grad), "linear_bias": (lb, lb.grad if lb is not None
                                                                                    else None),
              "target": (target, target.grad if case.soft else None)}
    if not case.reduce_input_grad and x.grad is not None:
        summed = x.grad.detach().to(torch.float64)  # (the sum in float64: only the ranks' partial sums differ)
        dist.all_reduce(summed, group=group)
        leaves["input (summed over the ranks)"] = (x, summed.to(x.grad.dtype))
    return loss, leaves


def run_linear_single(case, full):
    """smoothce's single-process fused loss + backward on the whole output layer: (loss, {name: grad})."""
    x = full["x"].detach().clone().requires_grad_(True)
    W = full["W"].detach().clone().requires_grad_(True)
    b = full["bias"].detach().clone().requires_grad_(True) if full["bias"] is not None else None
    target = full["target"]
    if case.soft_grad:
        target = target.detach().clone().requires_grad_(True)
    kw = dict(linear_kwargs(case), linear_bias=b, weight=full["weight"])
    if case.mixup:
        loss = smoothce.linear_mixup_cross_entropy(x, W, target, full["target_b"], full["lam"], **kw)
    else:
        loss = smoothce.linear_cross_entropy(x, W, target, **kw)
    loss.backward(full["upstream"].to(loss.dtype))
    return loss.detach(), {"input": x.grad, "linear_weight": W.grad, "linear_bias": b.grad if b is not None else None,
                           "target": target.grad if case.soft_grad else None}


def run_linear(api, case, rank, world, group):
    full = build_linear_full(case)
    start, size, placement = layout(case, full["C"], world, rank)
    dtype = full["dtype"]
    loss, leaves = run_linear_parallel(api, case, full, start, size, placement, group)
    ref_loss, ref = run_linear_single(case, full)
    times = 2 if case.backward_twice else 1
    problems = [mismatch(loss.detach(), ref_loss, dtype, "loss", LINEAR_TOLERANCE)]
    if case.no_grad and loss.requires_grad:
        problems.append("the loss requires grad under torch.no_grad()")
    # The expected gradient of each leaf: the whole one (input), this rank's rows (the output layer), its
    # slice of the classes (a probability target).
    expected = {"input": ref["input"],
                "linear_weight": ref["linear_weight"].narrow(0, start, size),
                "linear_bias": ref["linear_bias"].narrow(0, start, size) if ref["linear_bias"] is not None else None,
                "target": ref["target"].narrow(-1, start, size) if ref["target"] is not None else None}
    partial = not case.reduce_input_grad and world > 1
    for name, (leaf, grad) in leaves.items():
        if leaf is None:
            continue
        wanted = bool(case.soft_grad) if name == "target" else leaf.requires_grad and not case.no_grad
        what = f"{name} grad" + (" (2 backwards)" if times > 1 else "")
        if not wanted:
            if grad is not None:
                problems.append(f"{what}: it does not require grad (or under no_grad), yet it received one")
        elif grad is None:
            problems.append(f"{what}: None (it requires grad)")
        elif name == "input" and partial:
            # This rank's partial sum: checked for its shape and dtype here, summed over the ranks below.
            if grad.dtype != leaf.dtype or tuple(grad.shape) != tuple(leaf.shape):
                problems.append(f"{what} (this rank's partial sum): {grad.dtype} {tuple(grad.shape)}, expected "
                                f"{leaf.dtype} {tuple(leaf.shape)}")
        else:
            exp = expected["input" if name.startswith("input") else name]
            problems.append(mismatch(grad, exp * times, dtype, what, LINEAR_TOLERANCE))
    problems = [p for p in problems if p]
    result = {"loss": hexes(loss), "shard": [start, size], "ok": not problems}
    result["detail" if not problems else "error"] = "; ".join(problems) if problems else "matches"
    return result


def run_linear_error(api, case, rank, world, group, rank_in_group):
    """run_error for the fused linear form."""
    return run_error(api, case, rank, world, group, rank_in_group, build=build_linear_full, run=run_linear_parallel)


def make_groups(cases, world):
    """Every process group the cases use, created in the same order on every rank (new_group is collective)."""
    groups = {"default": None}
    groups["all"] = dist.new_group(list(range(world)))
    groups["short"] = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    if any(Case(case).crash_group for case in cases):
        groups["crash"] = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=CRASH_TIMEOUT_S))
    for case in cases:
        spec = Case(case).group
        if isinstance(spec, list) and repr(spec) not in groups:
            groups[repr(spec)] = dist.new_group(sorted(spec))
    return groups


def case_group(case, groups, rank, world):
    """(group, rank in it, its size), or None when this rank is not a member."""
    spec = case.group
    if case.crash_group:  # (a case known to crash a process: a group of every rank with a short timeout)
        return groups["crash"], rank, world
    if isinstance(spec, list):
        members = sorted(spec)
        if rank not in members:
            return None
        return groups[repr(spec)], members.index(rank), len(members)
    if case.kind in ("error", "bad", "linear_error") or spec == "short":
        return groups["short"], rank, world
    if spec == "all":
        return groups["all"], rank, world
    return None, rank, world


def use_backend(backend):
    """cpu: smoothce's CPU kernels; emu: the CPU emulation of its CUDA kernels (tests/emulator.py; the
    pytest process has built it already, so this only loads the cached build), for every smoothce call:
    the vocab-parallel ones and the single-process reference alike."""
    if backend == "cpu":
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import emulator  # noqa: PLC0415
    from smoothce import _function  # noqa: PLC0415

    emulator.load()
    _function._ops = torch.ops.smoothce_emu


def load_api(standin):
    if standin:
        return StandIn
    import smoothce.distributed as api  # noqa: PLC0415
    return api


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--standin", action="store_true")
    parser.add_argument("--backend", choices=("cpu", "emu"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    use_backend(args.backend)
    cases = [Case(c) for c in json.loads(pathlib.Path(args.cases).read_text())]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = args.rank, args.world

    from smoothce import _function  # noqa: PLC0415
    ops = getattr(_function._ops, "name", repr(_function._ops))  # the kernels every smoothce call ran on

    def write(name, result):
        result = dict(result, name=name, rank=rank, ops=ops)
        tmp = out / f".{name}.r{rank}.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(out / f"{name}.r{rank}.json")

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        groups = make_groups(cases, world)
        meshes = make_meshes(cases, world)
        try:
            api = load_api(args.standin)
            api_error = None
        except Exception as exc:  # noqa: BLE001
            api, api_error = None, f"cannot import smoothce.distributed: {type(exc).__name__}: {exc}"
        for case in cases:
            print(f"[rank {rank}] {case['name']}", flush=True)  # the log's last line names a case that hangs
            t0 = time.perf_counter()
            try:
                if api is None:
                    result = {"ok": False, "error": api_error}
                else:
                    where = case_group(case, groups, rank, world)
                    if where is None:
                        result = {"ok": True, "skipped": "not a member of the case's group",
                                  "detail": "not a member of the case's group"}
                    elif case.kind == "compare":
                        result = run_compare(api, case, where[1], where[2], where[0])
                    elif case.kind == "dtensor":
                        result = run_dtensor(case, rank, world, meshes)
                    elif case.kind == "dtensor_error":
                        result = run_dtensor_error(case, rank, world, meshes)
                    elif case.kind == "linear":
                        result = run_linear(api, case, where[1], where[2], where[0])
                    elif case.kind == "linear_error":
                        result = run_linear_error(api, case, rank, where[2], where[0], where[1])
                    else:
                        result = run_error(api, case, rank, where[2], where[0], where[1])
            except Exception as exc:  # noqa: BLE001
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = round(time.perf_counter() - t0, 3)
            write(case["name"], result)
        (out / f"done.r{rank}").write_text("done")
    finally:
        dist.destroy_process_group()
    print(f"[rank {rank}] process group destroyed", flush=True)  # (an abort after this line is the teardown's)


# ======================================================================================================
# STAND-IN (harness self-check only; NOT the code under test). Used with --standin: gathers the shards
# (logits, weights, probability targets) on every rank, checks that the ranks agree, and calls smoothce's
# single-process loss on the concatenation; the backward returns this rank's slice of the (replicated)
# gradient. Slow and memory-hungry by design, but obviously right.
# ======================================================================================================

class _GatherClasses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, cdim, starts, sizes, rank, group):
        ctx.where = (cdim, starts[rank], sizes[rank])
        rows = local.detach().movedim(cdim, -1).to(torch.float64)
        width = max(sizes)
        padded = torch.nn.functional.pad(rows, (0, width - rows.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        order = sorted(range(len(sizes)), key=lambda r: starts[r])
        full = torch.cat([parts[r][..., :sizes[r]] for r in order], dim=-1)
        return full.movedim(-1, cdim).to(local.dtype).contiguous()

    @staticmethod
    def backward(ctx, grad):
        cdim, start, size = ctx.where
        return grad.narrow(cdim, start, size).contiguous(), None, None, None, None, None


def _standin(mixup, input, target, target_b, lam, weight, ignore_index, reduction, label_smoothing, group,
             vocab_start, num_classes, smoothing, target_values, z_loss, local_error=None):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cdim = 0 if input.dim() == 1 else 1
    local = input.shape[cdim] if input.dim() else 0
    if weight is not None and tuple(weight.shape) != (local,):
        local_error = f"weight has shape {tuple(weight.shape)}, expected ({local},) (this rank's classes)"
    if (vocab_start is None) != (num_classes is None):
        local_error = "pass both vocab_start and num_classes, or neither"
    meta = {"dtype": str(input.dtype), "target shape": tuple(target.shape[:cdim] + target.shape[cdim + 1:])
            if target.is_floating_point() else tuple(target.shape),
            "positions shape": tuple(input.shape[:cdim] + input.shape[cdim + 1:]),
            "reduction": reduction, "label_smoothing": float(label_smoothing), "ignore_index": ignore_index,
            "smoothing": smoothing, "target_values": target_values, "z_loss": float(z_loss),
            "weight given": weight is not None, "target kind": target.is_floating_point(), "mixup": mixup,
            "num_classes": num_classes, "explicit vocab_start": vocab_start is not None}
    metas = [None] * world
    dist.all_gather_object(metas, (meta, local, vocab_start, local_error), group=group)
    if local_error:  # this rank's own error; the others name the rank(s) that failed
        raise ValueError(f"vocab_parallel (stand-in): rank {rank}: {local_error}")
    failed = [r for r, m in enumerate(metas) if m[3]]
    if failed:
        raise RuntimeError(f"vocab_parallel (stand-in): rank(s) {failed} failed: {metas[failed[0]][3]}")
    for key in meta:
        values = [m[0][key] for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"vocab_parallel (stand-in): the ranks disagree on {key}: {values}")
    sizes = [m[1] for m in metas]
    if vocab_start is None:
        starts = [sum(sizes[:r]) for r in range(world)]
        C = sum(sizes)
    else:
        starts = [m[2] for m in metas]
        C = num_classes
        spans = sorted((s, n) for s, n in zip(starts, sizes) if n)  # (an empty shard may start anywhere)
        edge = 0
        for s, n in spans:
            if s != edge:
                raise ValueError(f"vocab_parallel (stand-in): vocab_start/num_classes do not tile [0, {C}): "
                                 f"shards (start, size) {list(zip(starts, sizes))}")
            edge = s + n
        if edge != C:
            raise ValueError(f"vocab_parallel (stand-in): vocab_start/num_classes do not tile [0, {C}): "
                             f"shards (start, size) {list(zip(starts, sizes))}")
    full = _GatherClasses.apply(input, cdim, starts, sizes, rank, group)
    if target.is_floating_point():
        target = _GatherClasses.apply(target, cdim, starts, sizes, rank, group)
    if weight is not None:
        weight = _GatherClasses.apply(weight, 0, starts, sizes, rank, group)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, smoothing=smoothing,
              target_values=target_values, z_loss=z_loss)
    if mixup:
        return smoothce.mixup_cross_entropy(full, target, target_b, lam, weight, **kw)
    return smoothce.cross_entropy(full, target, weight, **kw)


class StandIn:
    @staticmethod
    def vocab_parallel_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                                     label_smoothing=0.0, *, group=None, vocab_start=None, num_classes=None,
                                     smoothing="uniform", target_values=None, z_loss=0.0):
        return _standin(False, input, target, None, None, weight, ignore_index, reduction, label_smoothing, group,
                        vocab_start, num_classes, smoothing, target_values, z_loss)

    @staticmethod
    def vocab_parallel_mixup_cross_entropy(input, target_a, target_b, lam, weight=None, ignore_index=-100,
                                           reduction="mean", label_smoothing=0.0, *, group=None, vocab_start=None,
                                           num_classes=None, smoothing="uniform", target_values=None, z_loss=0.0):
        return _standin(True, input, target_a, target_b, lam, weight, ignore_index, reduction, label_smoothing,
                        group, vocab_start, num_classes, smoothing, target_values, z_loss)

    @staticmethod
    def vocab_parallel_linear_cross_entropy(input, linear_weight, target, **kw):
        return _standin_linear(False, input, linear_weight, target, None, None, **kw)

    @staticmethod
    def vocab_parallel_linear_mixup_cross_entropy(input, linear_weight, target_a, target_b, lam, **kw):
        return _standin_linear(True, input, linear_weight, target_a, target_b, lam, **kw)


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduces the gradient (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _standin_linear(mixup, input, linear_weight, target, target_b, lam, *, linear_bias=None, weight=None,
                    reduction="mean", ignore_index=-100, label_smoothing=0.0, group=None, vocab_start=None,
                    num_classes=None, smoothing="uniform", target_values=None, z_loss=0.0, chunk_size=None,
                    fp32_grad_weight=True, reduce_input_grad=True):
    """The fused form: this rank's logits x·W_rᵀ (+ b_r) as (positions, V_local), then the stand-in above;
    the input's gradient all-reduced over the group when reduce_input_grad (else each rank's partial sum)."""
    leading, H = tuple(input.shape[:-1]), input.shape[-1]
    local = linear_weight.shape[0]
    error = None
    if linear_weight.dim() != 2 or linear_weight.shape[1] != H:
        error = f"linear_weight has shape {tuple(linear_weight.shape)}, expected (V_local, {H})"
    x = _CopyToRegion.apply(input, group) if reduce_input_grad else input
    n = math.prod(leading)
    if error is None:
        logits = torch.nn.functional.linear(x.reshape(n, H), linear_weight, linear_bias)
    else:
        logits = input.new_zeros((n, local))
    if n == 0 or len(leading) == 0:
        raise NotImplementedError("stand-in: (H,) or empty inputs")
    t = target.reshape(n, local) if target.is_floating_point() else target.reshape(n)
    t_b = target_b.reshape(n) if target_b is not None else None
    lam = lam.reshape(n) if isinstance(lam, torch.Tensor) else lam
    loss = _standin(mixup, logits, t, t_b, lam, weight, ignore_index, reduction, label_smoothing, group, vocab_start,
                    num_classes, smoothing, target_values, z_loss, local_error=error)
    # (the positions' shape is compared as (n,): also compare the input's own shape, H included)
    shapes = [None] * dist.get_world_size(group)
    dist.all_gather_object(shapes, tuple(input.shape), group=group)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"vocab_parallel (stand-in): the ranks disagree on the input's shape: {shapes}")
    return loss.reshape(leading) if reduction == "none" else loss


if __name__ == "__main__":
    # The process ends with os._exit once main() returns (every result and the done file written, the process
    # group destroyed), as bench/distributed.py's ranks do: a rank now and then aborted in the interpreter's
    # teardown after every case passed, failing test_workers_exit_cleanly. A crash during a case still
    # leaves its result missing and a non-zero exit code.
    from bench.harness import run_then_exit  # noqa: E402  (ROOT is on sys.path)

    run_then_exit(main)
