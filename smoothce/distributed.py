"""Vocabulary-parallel cross-entropy: the classes split across the ranks of a torch.distributed group
(tensor-parallel output layers, Megatron-style), with label smoothing, class weights and every variant
computed over all the classes (README "Vocabulary-parallel"; docs/semantics.md §10).

Each rank passes its shard of the logits, classes [vocab_start, vocab_start + C_local) of C. One call:
  1. an all-gather of a few integers per rank: the shards' sizes (vocab_start, C when not given) and
     the arguments every rank must agree on; a rank whose arguments fail their checks says so there,
     so every rank raises instead of waiting for a collective that never comes;
  2. the shard read once (torch.ops.smoothce.shard_stats): per position its max, Σexp and the smoothing
     sums, and the target's logit and weight on the rank that holds it: 10 floats per position;
  3. an all-gather of those (O(N·ranks) floats, never O(N·V)), merged in rank order on every rank;
  4. the shard read again (shard_forward): the loss, the same on every rank, and this shard's gradient.
"""
from __future__ import annotations

import math
import numbers
import struct
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _function
from ._function import (REDUCTIONS, _check_devices, _check_inplace, _check_kernel_device, _check_loss_args,
                        _check_number, _check_tensor, _extension_args, _mixup_lam, _soft_target_grad)
from ._linear import chunk_rows
from ._mixup_target import MixupTarget

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_mixup_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "vocab_parallel_linear_mixup_cross_entropy"]

# torch 2.14 renamed all_gather_into_tensor (kept, deprecated) to all_gather_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_STATS = 10  # kShardStats (csrc/smoothce/row_math.h)


# ---------------------------------------------------------------- agreement between the ranks
_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_MAX_POSITION_DIMS = 6
_AGREEMENT_LENGTH = 40  # integers per rank in the first all-gather (_vocab_parallel_impl fills them)


def _float_bits(value) -> int:
    """A float as the int64 of its bits (exact comparison across ranks; NaN and -0.0 included)."""
    try:
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    except (TypeError, ValueError, OverflowError):
        return -1


def _shape_fields(shape) -> List[int]:
    dims = list(shape)
    fields = [len(dims)] + (dims + [-1] * _MAX_POSITION_DIMS)[:_MAX_POSITION_DIMS]
    return fields + [hash(tuple(dims[_MAX_POSITION_DIMS:]))]


def _fingerprint(values: torch.Tensor) -> int:
    """An int64 that differs, but for a vanishing chance, between tensors of different values (or order):
    Σ bits(v_i)·(2i + 1) with wrap-around, over the values' int64 (indices) or float64 bits (lam). One
    pass over N values, next to the loss's N×C."""
    flat = values.detach().reshape(-1)
    bits = flat.to(torch.float64).view(torch.int64) if flat.is_floating_point() else flat.to(torch.int64)
    odd = torch.arange(1, 2 * flat.numel() + 1, 2, dtype=torch.int64, device=flat.device)
    return int((bits * odd).sum())


class _Agreement:
    """The integers each rank contributes to the first all-gather: its shard and the arguments that
    must be the same on every rank. `fields` name them (for the error message)."""

    def __init__(self):
        self.names: List[str] = []
        self.values: List[int] = []

    def add(self, name, values):
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        self.names += [name] * len(values)
        self.values += [int(v) for v in values]


def _exchange(values: List[int], group, device) -> torch.Tensor:
    """all_gather of one int64 vector per rank → (ranks, len)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    return _all_gather(mine, group).cpu()


def _all_gather(mine: torch.Tensor, group) -> torch.Tensor:
    """Every rank's 1-D `mine` (the same length on each), as a (ranks, len) tensor."""
    out = mine.new_empty(dist.get_world_size(group) * mine.numel())
    _ALL_GATHER(out, mine, group=group)
    return out.view(-1, mine.numel())


def _collective_device(group, input):
    """Where the collectives' tensors live: the input's device for NCCL, CPU for gloo."""
    backend = dist.get_backend(group)
    if isinstance(input, torch.Tensor) and input.device.type != "cpu" and "gloo" not in str(backend):
        return input.device
    return torch.device("cpu")


# ---------------------------------------------------------------- autograd
class _VocabParallelFunction(torch.autograd.Function):
    """Forward: stats, their all-gather, and shard_forward, which also writes this shard's gradient for
    mean and sum (an upstream gradient of 1; backward rescales it in place, a no-op for loss.backward()).
    Reduction 'none' and a second backward recompute it from the saved gathered statistics: no collective
    in backward (the loss is the same on every rank, so is its upstream gradient)."""

    @staticmethod
    def forward(ctx, input, target, weight, group, device, vocab_start, num_classes, ignore_index, reduction,
                label_smoothing, float32_loss, target_values, z_loss, target_b, lam, lam_value, inplace):
        ext = dict(target_values=target_values, z_loss=z_loss, target_b=target_b, lam=lam, lam_value=lam_value)
        shard = (vocab_start, num_classes, ignore_index)
        all_stats = _gather_stats(input, target, weight, shard, group, device, label_smoothing, float32_loss, ext)
        compute_grad = ctx.needs_input_grad[0]
        # inplace_backward: nothing fused; backward writes the gradient over the shard (shard_grad_).
        fuse = compute_grad and reduction != REDUCTIONS["none"] and not inplace
        ctx.inplace = inplace
        loss, lse, grad = _function._ops.shard_forward(input, target, weight, all_stats, *shard, reduction,
                                                       label_smoothing, fuse, float32_loss, **ext)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.args = shard + (reduction, label_smoothing, float32_loss)
        ctx.ext = ext
        ctx.fused_grad = grad if fuse else None
        ctx.save_for_backward(input, target, weight, all_stats, lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if grad_loss is None:
            return (None,) * _APPLY_ARGS
        if torch.is_grad_enabled():
            raise RuntimeError("smoothce.vocab_parallel_cross_entropy: second-order gradients (create_graph=True) are "
                               "not supported")
        vocab_start, num_classes, ignore_index, reduction, label_smoothing, float32_loss = ctx.args
        input, target, weight, all_stats, lse = ctx.saved_tensors
        grad_input = grad_target = None
        if ctx.needs_input_grad[1]:
            grad_target = _soft_target_grad(grad_loss, input, lse, weight, reduction, label_smoothing)
        if ctx.needs_input_grad[0]:
            grad_input, ctx.fused_grad = ctx.fused_grad, None
            if grad_input is not None:
                _function._ops.scale_grad_(grad_input, grad_loss)
            elif ctx.inplace:
                # Bumping the shard's version makes any other user of it in the graph (a saved tensor, or this
                # graph's own second backward) raise autograd's "modified by an inplace operation" error.
                _function._ops.shard_grad_(input, target, weight, all_stats, vocab_start, num_classes, ignore_index,
                                           reduction, label_smoothing, float32_loss, grad_loss, **ctx.ext)
                torch.autograd.graph.increment_version(input)
                grad_input = input
            else:
                _, _, grad_input = _function._ops.shard_forward(input, target, weight, all_stats, vocab_start,
                                                                num_classes, ignore_index, reduction, label_smoothing,
                                                                True, float32_loss, grad_loss, **ctx.ext)
        return (grad_input, grad_target) + (None,) * (_APPLY_ARGS - 2)


_APPLY_ARGS = 17  # _VocabParallelFunction.forward's arguments after ctx


# ---------------------------------------------------------------- the entry point
def _shards(where, sizes: List[int], starts: Optional[List[int]], totals: Optional[List[int]]) -> Tuple[List[int], int]:
    """The shards' starts and C: contiguous in rank order, or the callers' (which must tile [0, C))."""
    if starts is None:
        return [sum(sizes[:r]) for r in range(len(sizes))], sum(sizes)
    if len(set(totals)) != 1:
        raise ValueError(f"{where}: the ranks disagree on num_classes: {totals} (rank by rank)")
    total = totals[0]
    covered = 0
    for start, size in zip(starts, sizes):
        if size == 0 and not 0 <= start <= total:
            raise ValueError(f"{where}: an empty shard's vocab_start must lie in [0, num_classes = {total}], got {start}")
    for start, size in sorted((start, size) for start, size in zip(starts, sizes) if size > 0):
        if start != covered:
            raise ValueError(
                f"{where}: the shards (vocab_start, classes) = {list(zip(starts, sizes))} (rank by rank) do not tile "
                f"the classes [0, {total}): {'overlap' if start < covered else 'gap'} at class {min(start, covered)}")
        covered += size
    if covered != total:
        raise ValueError(f"{where}: the shards (vocab_start, classes) = {list(zip(starts, sizes))} (rank by rank) cover "
                         f"{covered} classes, but num_classes is {total}")
    return starts, total


class _Agreed:
    """What the first all-gather settled: the group, where its collectives' tensors live, this shard's
    place (start, total C), and the loss options as the kernels take them."""

    def __init__(self, group, device, start, total, label_smoothing, target_values, lam_tensor, lam_value,
                 float32_loss):
        self.group, self.device, self.start, self.total = group, device, start, total
        self.label_smoothing, self.target_values = label_smoothing, target_values
        self.lam_tensor, self.lam_value, self.float32_loss = lam_tensor, lam_value, float32_loss


def _agree(where, group, local_checks, input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
           target_values, z_loss, vocab_start, num_classes, mixup, target_b, lam, num_classes_check=None,
           extra=()) -> _Agreed:
    """The ranks' agreement (one all-gather of _AGREEMENT_LENGTH integers per rank): every rank checks its
    own arguments (local_checks() returns the shard's class count and the positions' shape, or raises),
    then learns the shards' sizes and whether every rank's arguments passed and agree. A rank whose checks
    failed raises its error; the others raise naming it: every rank raises, none waits. `input` is what
    the dtype and device come from (the logits, or the fused linear layer's input).
    num_classes_check: the total C the shards must add up to (a DTensor's global class count).
    extra: more (name, int) the ranks must agree on (the fused linear layer's input size H)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialized (call torch.distributed.init_process_group "
                           f"first; a world of 1 works too)")
    if group is None:
        group = dist.group.WORLD
    device = _collective_device(group, input)
    agreement = _Agreement()
    failure = None
    local_classes, position_shape = 0, ()
    try:
        _check_tensor(where, "input", input)
        _check_tensor(where, "target_a" if mixup else "target", target)
        _check_tensor(where, "weight", weight, optional=True)
        label_smoothing = _check_loss_args(where, ignore_index, reduction, label_smoothing)
        if input.dtype not in _DTYPE_CODES:
            raise TypeError(f"{where}: input must be a floating-point tensor (float64, float32, float16 or bfloat16), "
                            f"got dtype {input.dtype}")
        _check_kernel_device(input)
        _check_devices(where, input, target, weight, target_b)
        local_classes, position_shape = local_checks()  # (a shard may be empty: DTensor's Shard of few classes)
        if weight is not None and tuple(weight.shape) != (local_classes,):
            raise ValueError(f"{where}: weight must be this rank's slice of the class weights, shape ({local_classes},) "
                             f"like its shard of the classes, got shape {tuple(weight.shape)}")
        if (vocab_start is None) != (num_classes is None):
            raise ValueError(f"{where}: pass both vocab_start and num_classes, or neither (shards contiguous in rank "
                             f"order); got vocab_start={vocab_start!r}, num_classes={num_classes!r}")
        if vocab_start is not None:
            _check_number("vocab_start", vocab_start, numbers.Integral, where)
            _check_number("num_classes", num_classes, numbers.Integral, where)
            if vocab_start < 0 or vocab_start + local_classes > num_classes:
                raise ValueError(f"{where}: this shard's classes [{vocab_start}, {vocab_start + local_classes}) must lie "
                                 f"in [0, num_classes = {num_classes})")
        # The checks that need no other rank (repeated with the total C below, where "others" needs it).
        _extension_args(where, input, target, label_smoothing, smoothing, target_values, z_loss, False,
                        num_classes=local_classes)
        if mixup:
            _mixup_lam(where, input, target, target_b, lam, positions=torch.Size(position_shape))
    except (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError) as error:
        failure = error
    explicit = vocab_start is not None and num_classes is not None and failure is None
    agreement.add("a failed argument check", int(failure is not None))
    agreement.add("shard size", local_classes)
    agreement.add("vocab_start", vocab_start if explicit else -1)
    agreement.add("num_classes", num_classes if explicit else -1)
    if failure is None:
        soft = target.is_floating_point()
        agreement.add("positions' shape", _shape_fields(position_shape))
        agreement.add("target's shape", _shape_fields(target.shape if not soft else position_shape))
        agreement.add("logits' dtype", _DTYPE_CODES[input.dtype])
        agreement.add("target kind (indices or probabilities)", int(soft))
        agreement.add("weight given", int(weight is not None))
        agreement.add("reduction", REDUCTIONS[reduction])
        agreement.add("ignore_index", ignore_index)
        agreement.add("label_smoothing", _float_bits(label_smoothing))
        agreement.add("smoothing", {"uniform": 0, "others": 1}.get(smoothing, -1) if isinstance(smoothing, str) else -2)
        tv = list(target_values) if isinstance(target_values, (tuple, list)) and len(target_values) == 2 else None
        agreement.add("target_values", [_float_bits(v) for v in tv] if tv else [-1, -1])
        agreement.add("z_loss", _float_bits(z_loss))
        agreement.add("mixup lam", _float_bits(lam) if isinstance(lam, numbers.Real) else (-2 if lam is None else -3))
        agreement.add("autocast", int(torch.is_autocast_enabled(input.device.type)))
        agreement.add("targets' values", _fingerprint(target) if not soft else 0)
        agreement.add("target_b's values", _fingerprint(target_b) if mixup else 0)
        agreement.add("lam's values", _fingerprint(lam) if isinstance(lam, torch.Tensor) else 0)
        for name, value in extra:
            agreement.add(name, value)
    # The same length on every rank (a failed rank sends its first fields and fillers).
    assert len(agreement.values) <= _AGREEMENT_LENGTH
    table = _exchange(agreement.values + [-7] * (_AGREEMENT_LENGTH - len(agreement.values)), group, device)
    if failure is not None:
        raise failure
    bad_ranks = table[:, 0].nonzero().flatten().tolist()
    if bad_ranks:
        raise RuntimeError(f"{where}: rank(s) {bad_ranks} of the group failed their argument checks (their error says "
                           f"why); this rank's arguments were fine")
    differing = []
    for column, name in enumerate(agreement.names):
        if column in (0, 1, 2, 3):  # the shards may differ; checked below
            continue
        if name not in differing and not bool((table[:, column] == table[0, column]).all()):
            differing.append(name)
    if differing:
        raise ValueError(f"{where}: the ranks of the group disagree on {', '.join(differing)}; every rank must pass "
                         f"the same targets and options (only the classes and their weights are sharded)")
    sizes = table[:, 1].tolist()
    starts = table[:, 2].tolist() if bool((table[:, 2] >= 0).all()) else None
    if starts is None and bool((table[:, 2] >= 0).any()):
        raise ValueError(f"{where}: some ranks passed vocab_start/num_classes and others did not "
                         f"(vocab_start rank by rank: {[s if s >= 0 else None for s in table[:, 2].tolist()]})")
    starts, total = _shards(where, sizes, starts, table[:, 3].tolist() if starts is not None else None)
    if num_classes_check is not None and total != num_classes_check:
        raise ValueError(f"{where}: the shards hold {sizes} classes (rank by rank), not the {num_classes_check} "
                         f"of the DTensor")
    label_smoothing, op_target_values = _extension_args(where, input, target, label_smoothing, smoothing,
                                                        target_values, z_loss, False, num_classes=total)
    lam_tensor, lam_value = (_mixup_lam(where, input, target, target_b, lam, positions=torch.Size(position_shape))
                             if mixup else (None, 1.0))
    return _Agreed(group, device, starts[dist.get_rank(group)], total, label_smoothing, op_target_values, lam_tensor,
                   lam_value, torch.is_autocast_enabled(input.device.type))


def _vocab_parallel_impl(where, input, target, weight, ignore_index, reduction, label_smoothing, group, vocab_start,
                         num_classes, smoothing, target_values, z_loss, mixup=False, target_b=None, lam=None,
                         num_classes_check=None, inplace_backward=False):
    shape = {}

    def local_checks():
        if input.dim() == 0:
            raise ValueError(f"{where}: input must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
        class_dim = 0 if input.dim() == 1 else 1
        shape["positions"] = tuple(input.shape[:class_dim] + input.shape[class_dim + 1:])
        if target.is_floating_point():
            if target.shape != input.shape:
                raise ValueError(f"{where}: a probability target must be this rank's shard, shaped like the input "
                                 f"{tuple(input.shape)}, got {tuple(target.shape)}")
        elif tuple(target.shape) != shape["positions"]:
            raise ValueError(f"{where}: target must have the input's shape without the class dimension, "
                             f"{shape['positions']}, got {tuple(target.shape)}")
        if not isinstance(inplace_backward, bool):
            raise TypeError(f"{where}: inplace_backward must be a bool, got {inplace_backward!r}")
        if inplace_backward and torch.is_grad_enabled() and input.requires_grad:
            _check_inplace(where, input, target)
        return input.shape[class_dim], shape["positions"]

    agreed = _agree(where, group, local_checks, input, target, weight, ignore_index, reduction, label_smoothing,
                    smoothing, target_values, z_loss, vocab_start, num_classes, mixup, target_b, lam,
                    num_classes_check)
    if agreed.float32_loss and target.is_floating_point() and target.dtype != input.dtype:
        input, target = input.float(), target.float()

    # The kernels read contiguous rows (positions, C_local): the classes moved last (a copy for (N, C, d...)).
    class_dim = 0 if input.dim() == 1 else 1
    local_classes = input.shape[class_dim]
    positions = math.prod(shape["positions"])
    rows = input.movedim(class_dim, -1).reshape(positions, local_classes).contiguous()
    if target.is_floating_point():
        target_rows = target.movedim(class_dim, -1).reshape(positions, local_classes).contiguous()
    else:
        target_rows = target.reshape(-1)
    target_b_rows = target_b.reshape(-1) if target_b is not None else None
    lam_rows = agreed.lam_tensor.reshape(-1) if agreed.lam_tensor is not None else None
    loss, _ = _VocabParallelFunction.apply(rows, target_rows, weight, agreed.group, agreed.device, agreed.start,
                                           agreed.total, int(ignore_index), REDUCTIONS[reduction],
                                           agreed.label_smoothing, agreed.float32_loss, agreed.target_values,
                                           float(z_loss), target_b_rows, lam_rows, agreed.lam_value,
                                           bool(inplace_backward) and torch.is_grad_enabled() and input.requires_grad)
    if reduction == "none":
        loss = loss.reshape(shape["positions"])
    return loss


def vocab_parallel_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    num_classes: Optional[int] = None,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """``smoothce.cross_entropy`` with the classes split across the ranks of ``group`` (default: the
    world): the loss of the whole logits, every class counted, returned on every rank.

    input: this rank's shard of the logits, classes on dim 1 (dim 0 for (C,)), holding the global
        classes [vocab_start, vocab_start + C_local). Shards may differ in size (an empty one included).
    target: global class indices, the same on every rank; or this rank's slice of the class probabilities
        (shaped like input).
    weight: this rank's slice of the class weights (C_local,).
    vocab_start, num_classes: where this shard starts and the total C; both or neither (default: shards
        contiguous in rank order, their sizes exchanged in the call).
    Other arguments and the keyword variants as ``smoothce.cross_entropy`` (inplace_backward: the shard's
    gradient written over it in backward, as there). The gradient of input is this shard's slice of the
    whole gradient.
    """
    return _vocab_parallel_impl("smoothce.vocab_parallel_cross_entropy", input, target, weight, ignore_index,
                                reduction, label_smoothing, group, vocab_start, num_classes, smoothing, target_values,
                                z_loss, inplace_backward=inplace_backward)


def vocab_parallel_mixup_cross_entropy(
    input: torch.Tensor,
    target_a: Union[torch.Tensor, MixupTarget],
    target_b: Optional[torch.Tensor] = None,
    lam: Union[float, torch.Tensor, None] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    num_classes: Optional[int] = None,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """``smoothce.mixup_cross_entropy`` with the classes split across the ranks of ``group``: q =
    lam·q(target_a) + (1 − lam)·q(target_b), targets global class indices, the same on every rank.
    Shards as ``vocab_parallel_cross_entropy``."""
    where = "smoothce.vocab_parallel_mixup_cross_entropy"
    if isinstance(target_a, MixupTarget):
        if target_b is not None or lam is not None:
            raise TypeError(f"{where}: given a MixupTarget, target_b and lam come from it; do not pass them too")
        target_a, target_b, lam, label_smoothing = target_a.target_a, target_a.target_b, target_a.lam, \
            target_a.label_smoothing
    elif target_b is None or lam is None:
        raise TypeError(f"{where}: target_b and lam are required with index tensors as target_a (or pass a "
                        f"smoothce.MixupTarget as target_a)")
    return _vocab_parallel_impl(where, input, target_a, weight, ignore_index, reduction, label_smoothing, group,
                                vocab_start, num_classes, smoothing, target_values, z_loss, mixup=True,
                                target_b=target_b, lam=lam, inplace_backward=inplace_backward)


# ---------------------------------------------------------------- DTensor
def _chunk_of(value: torch.Tensor, dim: int, pieces: int, index: int) -> torch.Tensor:
    """Piece `index` of `value` cut in `pieces` along dim as DTensor's Shard(dim) cuts it: torch.chunk's
    pieces, and empty ones after them when chunk gives fewer."""
    chunks = value.chunk(pieces, dim=dim)
    return chunks[index] if index < len(chunks) else value.narrow(dim, value.shape[dim], 0)


def dtensor_cross_entropy(where, input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
                          target_values, z_loss, inplace_backward, mixup=False, target_b=None, lam=None):
    """smoothce.cross_entropy (or the mixup form) of DTensor logits on a 1-D device mesh: the logits are
    brought to Shard(class dim) (torchtitan's loss_parallel layout, a no-op then; other placements are
    redistributed), targets to Replicate (index targets) or Shard(class dim) (probabilities), class
    weights to Shard(0); the loss is a replicated DTensor, and the logits' gradient keeps their placement."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(input, DTensor):
        raise TypeError(f"{where}: with DTensor arguments the logits must be a DTensor too, got "
                        f"{type(input).__name__} (distribute them on the targets' mesh)")
    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{where}: DTensor logits on a {mesh.ndim}-D device mesh are not supported: the vocabulary-"
                         f"parallel loss runs on a 1-D mesh (slice the tensor-parallel dimension, e.g. mesh['tp'])")
    if inplace_backward:
        raise ValueError(f"{where}: inplace_backward=True is not supported with DTensor logits")
    if input.dim() == 0:
        raise ValueError(f"{where}: input must have at least 1 dimension, got a 0-d DTensor")
    class_dim = 0 if input.dim() == 1 else 1
    members = mesh.mesh.flatten().tolist()
    if members != sorted(members):  # (the same on every rank: all raise)
        raise ValueError(f"{where}: a device mesh that lists its ranks out of order ({members}) is not supported: "
                         f"its process group ranks them in order, and DTensor places a Shard's data and sizes by "
                         f"different ones of the two")
    coordinate = mesh.get_coordinate()[0]  # (its rank in the mesh's group, then)

    def local(value, placement, name):
        """This rank's part of `value` in `placement`: a DTensor redistributed there (on the logits' mesh), a plain
        tensor cut there by hand (Shard) or taken whole (Replicate)."""
        if value is None or not isinstance(value, torch.Tensor):
            return value
        if isinstance(value, DTensor):
            if value.device_mesh != mesh:
                raise ValueError(f"{where}: {name} is a DTensor on another device mesh than the logits")
            return value.redistribute(mesh, [placement]).to_local()
        if isinstance(placement, Shard):
            return _chunk_of(value, placement.dim, mesh.size(), coordinate)
        return value

    logits = input.redistribute(mesh, [Shard(class_dim)]).to_local()
    soft = isinstance(target, torch.Tensor) and target.is_floating_point()
    target_local = local(target, Shard(class_dim) if soft else Replicate(), "target")
    weight_local = local(weight, Shard(0), "weight")
    # Where this rank's classes start: DTensor's Shard cuts as torch.chunk does, in mesh order, so the
    # start is passed rather than left to the group's rank order.
    num_classes = input.shape[class_dim]
    start = min(coordinate * -(-num_classes // mesh.size()), num_classes)
    loss = _vocab_parallel_impl(where, logits, target_local, weight_local, ignore_index, reduction, label_smoothing,
                                mesh.get_group(), start, num_classes, smoothing, target_values, z_loss, mixup=mixup,
                                target_b=local(target_b, Replicate(), "target_b"), lam=local(lam, Replicate(), "lam"),
                                num_classes_check=num_classes)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


# ---------------------------------------------------------------- fused linear layer + loss
class _VocabParallelLinearFunction(torch.autograd.Function):
    """The loss of logits = x·Wᵀ (+ b) for this rank's rows of W, chunk of rows by chunk of rows: each
    chunk's logits (chunk × V_local, one buffer at a time) give their statistics, one all-gather merges
    them over the ranks, shard_forward gives the chunk's loss and dlogits, and the gradient GEMMs consume
    them at once. For mean and sum the gradients are computed in forward for an upstream gradient of 1 and
    rescaled in backward; 'none' recomputes the chunks in backward from the saved gathered statistics (no
    collective but the input gradient's all-reduce). Mean's D (the targets' weights, held by the ranks that
    hold the targets) comes from the gathered statistics: the chunks run as 'sum' and the results are
    divided by D at the end."""

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, weight, agreed, ignore_index, reduction, z_loss,
                target_b, lam, chunk, reduce_input_grad, fp32_grad_weight):
        needs = ctx.needs_input_grad
        mask = (needs[0], needs[1], linear_bias is not None and needs[2], target.is_floating_point() and needs[3])
        fuse = reduction != REDUCTIONS["none"] and any(mask)
        ctx.agreed, ctx.mask, ctx.chunk = agreed, mask, chunk
        ctx.args = (ignore_index, reduction, z_loss, reduce_input_grad, fp32_grad_weight)
        losses, all_stats, grads = _linear_chunks(x, linear_weight, linear_bias, target, weight, agreed, ignore_index,
                                                  reduction, z_loss, target_b, lam, chunk, mask if fuse else None,
                                                  None, reduce_input_grad, fp32_grad_weight)
        denominator = _mean_denominator(all_stats, target, target_b, lam, agreed, ignore_index)
        if reduction == REDUCTIONS["none"]:
            loss = losses
        else:
            loss = losses.sum(dtype=torch.float64)
            if reduction == REDUCTIONS["mean"]:
                loss = loss / denominator
            loss = loss.to(losses.dtype)
        if fuse and reduction == REDUCTIONS["mean"]:
            divisor = _gradient_divisor(denominator, target, target_b, ignore_index)
            for g in grads:
                if g is not None:
                    g.div_(divisor)  # (in place: the accumulators are this call's own)
        ctx.fused = [g.to(t.dtype) if g is not None else None
                     for g, t in zip(grads, (x, linear_weight, linear_bias, target))] if fuse else None
        ctx.save_for_backward(x, linear_weight, linear_bias, target, weight, target_b, lam, *all_stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * _LINEAR_APPLY_ARGS
        if torch.is_grad_enabled():
            raise RuntimeError("smoothce.vocab_parallel_linear_cross_entropy: second-order gradients "
                               "(create_graph=True) are not supported")
        if ctx.fused is not None:
            grads, ctx.fused = ctx.fused, None
            for g in grads:
                if g is not None:
                    _function._ops.scale_grad_(g, grad_loss)
        else:  # reduction 'none', or a second backward: recompute the chunks for the upstream gradient
            x, linear_weight, linear_bias, target, weight, target_b, lam = ctx.saved_tensors[:7]
            ignore_index, reduction, z_loss, reduce_input_grad, fp32_grad_weight = ctx.args
            stats = list(ctx.saved_tensors[7:])
            upstream = grad_loss
            if reduction == REDUCTIONS["mean"]:
                upstream = grad_loss / _mean_denominator(stats, target, target_b, lam, ctx.agreed, ignore_index)
            _, _, grads = _linear_chunks(x, linear_weight, linear_bias, target, weight, ctx.agreed, ignore_index,
                                         reduction, z_loss, target_b, lam, ctx.chunk, ctx.mask, (stats, upstream),
                                         reduce_input_grad, fp32_grad_weight)
            grads = [g.to(t.dtype) if g is not None else None
                     for g, t in zip(grads, (x, linear_weight, linear_bias, target))]
        return tuple(g if wanted else None for g, wanted in zip(grads, ctx.mask)) + \
            (None,) * (_LINEAR_APPLY_ARGS - 4)


_LINEAR_APPLY_ARGS = 14  # _VocabParallelLinearFunction.forward's arguments after ctx


def _mean_denominator(all_stats, target, target_b, lam, agreed, ignore_index):
    """D of reduction 'mean': the positions (probability targets), else Σ k_a·w_a + k_b·w_b over the
    positions with the targets' weights from the gathered statistics (fields 8 and 9, summed over the
    ranks: the one holding a target gave its weight), in float64, the same on every rank."""
    if target.is_floating_point():
        return torch.tensor(float(target.shape[0]), dtype=torch.float64, device=target.device)
    stats = torch.cat(all_stats, dim=1).to(torch.float64)  # (ranks, positions, 10)
    w_a, w_b = stats[..., 8].sum(0), stats[..., 9].sum(0)
    share = torch.as_tensor(agreed.lam_value if lam is None else lam, dtype=torch.float64, device=w_a.device)
    valid_a = (target != ignore_index).to(w_a.device)
    total = (share * valid_a * w_a).sum()
    if target_b is not None:
        total = total + ((1 - share) * (target_b != ignore_index).to(w_a.device) * w_b).sum()
    return total


def _gradient_divisor(denominator, target, target_b, ignore_index):
    """What the chunks' 'sum' gradients are divided by for 'mean': D, as the single-process kernels scale
    every valid position by 1/D. Where D = 0 they give what those give: all-zero gradients when no position
    is valid (ignored positions contribute exact zeros), NaN when valid positions weigh 0 (a 1/0 scale);
    no host synchronisation either way."""
    if target.is_floating_point():
        return denominator
    valid = (target != ignore_index).any()
    if target_b is not None:
        valid = valid | (target_b != ignore_index).any()
    nan_or_one = torch.where(valid, torch.full_like(denominator, math.nan), torch.ones_like(denominator))
    return torch.where(denominator != 0, denominator, nan_or_one)


def _linear_chunks(x, linear_weight, linear_bias, target, weight, agreed, ignore_index, reduction, z_loss, target_b,
                   lam, chunk, mask, recompute, reduce_input_grad, fp32_grad_weight):
    """Runs the chunks. mask: the gradients to compute (input, linear_weight, linear_bias, target), for an
    upstream gradient of 1 ('sum'; the caller divides by mean's D), or None for the loss alone.
    recompute: (the saved gathered statistics, the upstream gradient) to compute the gradients from instead
    of exchanging statistics again. Returns the per-position losses ('none') or the chunks' sums, the
    gathered statistics of each chunk, and the gradients (fp32 accumulators for half-precision weights)."""
    n = x.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wants = mask if mask is not None else (False,) * 4
    grad_input = torch.zeros_like(x, dtype=acc if x.dtype in (torch.float16, torch.bfloat16) else x.dtype) \
        if wants[0] else None
    w_dtype = acc if (fp32_grad_weight and linear_weight.dtype in (torch.float16, torch.bfloat16)) \
        else linear_weight.dtype
    grad_weight = torch.zeros(linear_weight.shape, dtype=w_dtype, device=x.device) if wants[1] else None
    grad_bias = torch.zeros(linear_bias.shape, dtype=w_dtype, device=x.device) if wants[2] else None
    grad_target = torch.empty_like(target) if wants[3] else None
    losses, gathered = [], []
    shard = (agreed.start, agreed.total, ignore_index)
    ext = dict(target_values=agreed.target_values, z_loss=z_loss)
    for c, begin in enumerate(range(0, max(n, 1), chunk)):
        end = min(n, begin + chunk)
        rows = slice(begin, end)
        logits = torch.nn.functional.linear(x[rows], linear_weight, linear_bias)
        t = target[rows]
        ext_c = dict(ext, target_b=None if target_b is None else target_b[rows],
                     lam=None if lam is None else lam[rows], lam_value=agreed.lam_value)
        if recompute is None:
            stats = _gather_stats(logits, t, weight, shard, agreed.group, agreed.device, agreed.label_smoothing,
                                  agreed.float32_loss, ext_c)
            upstream = None
        else:
            stats = recompute[0][c]
            upstream = recompute[1]
            if upstream.dim() > 0:
                upstream = upstream[rows]
        gathered.append(stats)
        chunk_reduction = REDUCTIONS["none"] if reduction == REDUCTIONS["none"] else REDUCTIONS["sum"]
        loss, lse, dlogits = _function._ops.shard_forward(
            logits, t, weight, stats, *shard, chunk_reduction, agreed.label_smoothing,
            mask is not None and any(mask[:3]), agreed.float32_loss, upstream, **ext_c)
        losses.append(loss.reshape(-1))
        if grad_input is not None:
            grad_input[rows] = (dlogits @ linear_weight).to(grad_input.dtype)
        if grad_weight is not None:
            grad_weight.addmm_(dlogits.t().to(w_dtype), x[rows].to(w_dtype))
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=w_dtype)
        if grad_target is not None:
            scale = upstream if upstream is not None else torch.ones((), dtype=lse.dtype, device=lse.device)
            grad_target[rows] = _soft_target_grad(scale, logits, lse, weight, REDUCTIONS["none"] if scale.dim() > 0
                                                  else REDUCTIONS["sum"], agreed.label_smoothing)
        del logits, dlogits  # (before the next chunk's: one chunk of logits and one of gradient at a time)
    if grad_input is not None and reduce_input_grad:
        dist.all_reduce(grad_input, group=agreed.group)
    losses = torch.cat(losses) if reduction == REDUCTIONS["none"] else torch.stack(losses)
    return losses, gathered, [grad_input, grad_weight, grad_bias, grad_target]


def _gather_stats(logits, target, weight, shard, group, device, label_smoothing, float32_loss, ext):
    """shard_stats of a chunk, all-gathered over the group with a flag for a rank whose shard could not
    be read (every rank raises then); (ranks, positions, 10) with each rank's slice contiguous."""
    failure = None
    stats = None
    try:
        stats = _function._ops.shard_stats(logits, target, weight, *shard, label_smoothing, float32_loss, **ext)
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        failure = error
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    positions = logits.shape[0]
    mine = torch.empty(positions * _STATS + 1, dtype=acc, device=device)
    if stats is None:
        mine.fill_(math.nan)
    else:
        mine[:-1].copy_(stats.reshape(-1))
        mine[-1] = 0.0
    gathered = _all_gather(mine, group)
    if failure is not None:
        raise failure
    # (CUDA: not read, to keep the host from waiting on the device; the healthy ranks' loss is then NaN)
    failed = torch.isnan(gathered[:, -1]).nonzero().flatten().tolist() if device.type == "cpu" else []
    if failed:
        raise RuntimeError(f"smoothce.distributed: rank(s) {failed} of the group failed to read their shard (their "
                           f"error says why); this rank's arguments were fine")
    return gathered[:, :-1].reshape(gathered.shape[0], positions, _STATS).to(logits.device)


def _vocab_parallel_linear_impl(where, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                label_smoothing, group, vocab_start, num_classes, smoothing, target_values, z_loss,
                                chunk_size, fp32_grad_weight, reduce_input_grad, mixup=False, target_b=None,
                                lam=None):
    def local_checks():
        _check_tensor(where, "linear_weight", linear_weight)
        _check_tensor(where, "linear_bias", linear_bias, optional=True)
        if input.dim() < 1:
            raise ValueError(f"{where}: input must have shape (..., H), got a 0-d tensor")
        if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
            raise ValueError(f"{where}: linear_weight must be this rank's rows of the output layer, shape (V_local, H) "
                             f"with H = {input.shape[-1]} (the input's last dimension), got {tuple(linear_weight.shape)}")
        if linear_weight.dtype != input.dtype:
            raise TypeError(f"{where}: linear_weight must have the input's dtype {input.dtype}, got {linear_weight.dtype}")
        local = linear_weight.shape[0]
        if linear_bias is not None and (tuple(linear_bias.shape) != (local,) or linear_bias.dtype != input.dtype):
            raise ValueError(f"{where}: linear_bias must be this rank's slice, shape ({local},) and dtype {input.dtype}, "
                             f"got {tuple(linear_bias.shape)} {linear_bias.dtype}")
        _check_devices(where, input, None, None, None, linear_weight=linear_weight, linear_bias=linear_bias)
        positions = tuple(input.shape[:-1])
        expected = positions + ((local,) if target.is_floating_point() else ())
        if tuple(target.shape) != expected:
            kind = "a probability target (this rank's slice)" if target.is_floating_point() else "target"
            raise ValueError(f"{where}: {kind} must have shape {expected}, got {tuple(target.shape)}")
        if chunk_size is not None:
            _check_number("chunk_size", chunk_size, numbers.Integral, where)
            if chunk_size < 1:
                raise ValueError(f"{where}: chunk_size must be a positive number of rows or None, got {chunk_size}")
        for name, flag in (("fp32_grad_weight", fp32_grad_weight), ("reduce_input_grad", reduce_input_grad)):
            if not isinstance(flag, bool):
                raise TypeError(f"{where}: {name} must be a bool, got {flag!r}")
        return local, positions

    hidden = input.shape[-1] if isinstance(input, torch.Tensor) and input.dim() > 0 else -1
    agreed = _agree(where, group, local_checks, input, target, weight, ignore_index, reduction, label_smoothing,
                    smoothing, target_values, z_loss, vocab_start, num_classes, mixup, target_b, lam,
                    extra=(("the input's size H (its last dimension)", hidden),))
    leading = input.shape[:-1]
    n, local = leading.numel(), linear_weight.shape[0]
    x = input.reshape(n, input.shape[-1])
    t = target.reshape((n, local) if target.is_floating_point() else (n,))
    t_b = target_b.reshape(n) if target_b is not None else None
    lam_rows = agreed.lam_tensor.reshape(n) if agreed.lam_tensor is not None else None
    needs_weight_grad = torch.is_grad_enabled() and linear_weight.requires_grad
    chunk = chunk_rows(n, x.shape[1], max(local, 1), x.dtype, device=x.device.type, chunk_size=chunk_size,
                       fp32_grad_weight=fp32_grad_weight, needs_weight_grad=needs_weight_grad)
    loss = _VocabParallelLinearFunction.apply(x, linear_weight, linear_bias, t, weight, agreed, int(ignore_index),
                                              REDUCTIONS[reduction], float(z_loss), t_b, lam_rows, chunk,
                                              reduce_input_grad, fp32_grad_weight)
    return loss.reshape(leading) if reduction == "none" else loss


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    group=None,
    vocab_start: Optional[int] = None,
    num_classes: Optional[int] = None,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    fp32_grad_weight: bool = True,
    reduce_input_grad: bool = True,
) -> torch.Tensor:
    """``smoothce.linear_cross_entropy`` with the output layer split by vocabulary across the ranks of
    ``group``: the loss of logits = input·Wᵀ (+ b) over all the classes, returned on every rank, without
    any rank holding the N×V logits (nor its N×V_local share: rows go through in chunks).

    input: (..., H), the same on every rank. linear_weight: this rank's rows of the output layer
        (V_local, H), the classes [vocab_start, vocab_start + V_local); linear_bias: its slice (V_local,).
    target: global class indices (...), the same on every rank, or this rank's slice of the class
        probabilities (..., V_local). weight: this rank's slice of the class weights.
    reduce_input_grad: all-reduce the input's gradient over the group (default), so every rank holds the
        whole of it; False leaves each rank its partial sum (for a column-parallel layer whose input
        gradient is all-reduced by the layer before it, as Megatron-LM's copy_to_tensor_model_parallel_region).
    chunk_size, fp32_grad_weight: as ``smoothce.linear_cross_entropy``; other arguments as
    ``vocab_parallel_cross_entropy``.
    """
    return _vocab_parallel_linear_impl("smoothce.vocab_parallel_linear_cross_entropy", input, linear_weight, target,
                                       linear_bias, weight, reduction, ignore_index, label_smoothing, group,
                                       vocab_start, num_classes, smoothing, target_values, z_loss, chunk_size,
                                       fp32_grad_weight, reduce_input_grad)


def vocab_parallel_linear_mixup_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: Union[float, torch.Tensor],
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    group=None,
    vocab_start: Optional[int] = None,
    num_classes: Optional[int] = None,
    smoothing: str = "uniform",
    target_values: Optional[Tuple[float, float]] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    fp32_grad_weight: bool = True,
    reduce_input_grad: bool = True,
) -> torch.Tensor:
    """The mixup form of ``vocab_parallel_linear_cross_entropy``: q = lam·q(target_a) + (1 − lam)·q(target_b)."""
    return _vocab_parallel_linear_impl("smoothce.vocab_parallel_linear_mixup_cross_entropy", input, linear_weight,
                                       target_a, linear_bias, weight, reduction, ignore_index, label_smoothing, group,
                                       vocab_start, num_classes, smoothing, target_values, z_loss, chunk_size,
                                       fp32_grad_weight, reduce_input_grad, mixup=True, target_b=target_b, lam=lam)
