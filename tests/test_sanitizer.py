"""The emulator as a GPU sanitizer (tests/emu): shared-memory racecheck, launch rules as a GPU enforces
them (static + dynamic shared memory, the opt-in, __launch_bounds__), schedules, and the launch paths
they guard in csrc/cuda: plans in every 48 KiB window, several work items per block and per cluster,
the cluster fallbacks (no cluster fits; the query fails) and a binary without sm_90 code on an sm_90
device. Known-bad kernels: tests/emu/sanitizer_selftest.cpp."""
import re

import pytest
import torch

import emulator
import smoothce
from conftest import (DTYPES, assert_close_to_truth, check_all, dtype_id, loss_magnitude, make_index_target,
                      make_logits, make_prob_target, ref, run_all)

# the emulated ops' limits, and the fixtures: emu (the module), on_emu (smoothce on the emulated kernels)
from test_cuda_emulated import DEFAULT_LIMITS, H100_LIMITS, emu, on_emu  # noqa: F401

pytestmark = pytest.mark.cpu_only

DEFAULT_SMEM = 48 * 1024
ACC_BYTES = {torch.float64: 8, torch.float32: 4, torch.float16: 4, torch.bfloat16: 4}
DTYPE_NAME = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
              torch.bfloat16: "bfloat16"}


# ------------------------------------------------------------------------ racecheck (known kernels)

RACE = {"barrier": 0, "no_barrier": 1, "write_after_read": 2, "warp_no_sync": 3, "warp_sync": 4,
        "static_no_barrier": 5, "same_thread": 6, "partial_syncwarp": 7}


@pytest.mark.parametrize("schedule", ["fifo", "lifo", "random"])
@pytest.mark.parametrize("mode", ["barrier", "warp_sync", "same_thread"])
def test_correct_kernels_pass_racecheck(emu, mode, schedule):
    with emulator.scheduled(emu, schedule, 3):
        out = emu.sanitizer.race(2, 64, RACE[mode])
    t = torch.arange(64)
    want = {"barrier": (t + 32) % 64, "warp_sync": t - t % 32 + (t % 32 + 1) % 32, "same_thread": t}[mode]
    assert torch.equal(out.view(2, 64), want.int().expand(2, 64))


@pytest.mark.parametrize("mode, hazard, memory", [
    # (thread 0 reads slot 32 before thread 32 writes it under the default schedule: either order races)
    ("no_barrier", "(read after write|write after read)", "dynamic shared memory, byte 128"),
    ("static_no_barrier", "(read after write|write after read)",
     r"static shared array of sanitizer_selftest.cpp:\d+, byte 128"),
    ("write_after_read", "(read after write|write after read)", "dynamic shared memory"),
    ("warp_no_sync", "(read after write|write after read)", "dynamic shared memory, byte 4"),
    ("partial_syncwarp", "(read after write|write after read)", "dynamic shared memory, byte 64"),
])
def test_races_are_reported(emu, mode, hazard, memory):
    """Each message names the kernel, the block, the hazard, the byte, both threads and both source lines."""
    with emulator.scheduled(emu, "fifo"), pytest.raises(RuntimeError) as error:  # (the first hazard in thread order)
        emu.sanitizer.race(1, 64, RACE[mode])
    message = str(error.value)
    assert re.search(r"emu: emu_sanitizer::race_kernel\(int\*, int\), block \(0,0,0\)", message), message
    assert re.search(f"racecheck: {hazard} hazard on {memory}", message), message
    assert re.search(r"thread \(\d+,0,0\) \(warp \d+, lane \d+\) at sanitizer_selftest.cpp:\d+, while thread "
                     r"\(\d+,0,0\) \(warp \d+, lane \d+\) (wrote|read|read \(among others\)) it at "
                     r"sanitizer_selftest.cpp:\d+ in the same barrier interval", message), message
    emu.sanitizer.race(1, 64, RACE["barrier"])  # the emulator stays usable


def test_racecheck_can_be_switched_off(emu):
    emu.set_racecheck(False)
    try:
        emu.sanitizer.race(1, 64, RACE["no_barrier"])  # a race, not reported
    finally:
        emu.set_racecheck(True)
    assert emu.racecheck()


@pytest.mark.parametrize("schedule", ["fifo", "lifo", "random"])
def test_cluster_shared_memory_races(emu, schedule):
    """Distributed shared memory: reading a peer's slot needs a cluster barrier after its write, and
    a block may not exit before the reads of its shared memory are ordered by a cluster barrier."""
    with emulator.scheduled(emu, schedule, 5):
        assert emu.sanitizer.cluster_race(4, True, True).tolist() == [1, 2, 3, 0]
        with pytest.raises(RuntimeError, match=r"racecheck: (read after write|write after read) hazard on dynamic "
                                               r"shared memory, byte 0 of block \(\d,0,0\) \(rank \d\)"):
            emu.sanitizer.cluster_race(4, False, True)
        with pytest.raises(RuntimeError, match=r"racecheck: read before exit hazard|which has exited"):
            emu.sanitizer.cluster_race(4, True, False)


# ------------------------------------------------------------------------ memcheck of shared memory

def test_misaligned_shared_vector_store_is_reported(emu):
    emu.sanitizer.misaligned_shared(16)
    with pytest.raises(RuntimeError, match=r"misaligned shared-memory write of 16 bytes at 0x[0-9a-f]+ "
                                           r"\(sanitizer_selftest.cpp:\d+\): the address must be a multiple of 16"):
        emu.sanitizer.misaligned_shared(8)


def test_shared_access_outside_the_allocation_is_reported(emu):
    with pytest.raises(RuntimeError, match="outside the cluster's shared memory"):
        emu.sanitizer.misaligned_shared(64)  # 16 bytes past the 64-byte buffer


@pytest.mark.parametrize("workers", [1, 2])
def test_static_shared_memory_is_poisoned_in_every_block(emu, workers):
    """Every block reads its static word before writing it: the poison, never the previous block's 7."""
    previous = emu.workers()
    emu.set_workers(workers)
    try:
        out = emu.sanitizer.static_poison(6)
    finally:
        emu.set_workers(previous)
    assert out.tolist() == [-1] * 6  # 0xFFFFFFFF


# ------------------------------------------------------------------------ launch rules

def test_static_plus_dynamic_shared_memory_needs_the_opt_in(emu):
    """4 KiB static: 44 KiB dynamic fits the default 48 KiB, one word more is refused without the
    opt-in, and runs once the kernel's limit is raised; the device maximum still holds."""
    static = 4096
    assert emu.sanitizer.static_and_dynamic(DEFAULT_SMEM - static, 0).tolist() == [1]
    assert emu.sanitizer.static_and_dynamic_attributes()["static_smem"] == static
    with pytest.raises(RuntimeError, match=r"more dynamic shared memory than the kernel's limit of 45056 bytes "
                                           r"\(static: 4096; no opt-in"):
        emu.sanitizer.static_and_dynamic(DEFAULT_SMEM - static + 16, 0)
    assert emu.sanitizer.static_and_dynamic(DEFAULT_SMEM, 100 * 1024).tolist() == [1]
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute\(.*\): invalid argument"):
        emu.sanitizer.static_and_dynamic(16, emu.max_dynamic_smem() - static + 16)


def test_launch_bounds_are_enforced(emu):
    assert emu.sanitizer.bounded_attributes()["max_threads"] == 64
    assert emu.sanitizer.bounded(64).sum().item() == 64
    with pytest.raises(RuntimeError, match=r"128 threads per block, more than the kernel's __launch_bounds__\(64\)"):
        emu.sanitizer.bounded(128)


def test_real_kernels_carry_their_launch_bounds(emu):
    for variant, bound in (("rows", 512), ("strided", 256), ("cluster_rows", 512), ("split_finish", 512),
                           ("shard_stats", 512), ("shard_finish", 512)):
        assert emu.kernel_attributes(variant, "float32")["max_threads"] == bound


# ------------------------------------------------------------------------ schedules

def test_schedules_change_the_order_threads_resume(emu):
    orders = {}
    emu.set_racecheck(False)  # order_kernel logs its order through unsynchronised shared memory
    try:
        for name, seed in (("fifo", 0), ("lifo", 0), ("random", 1), ("random", 2)):
            with emulator.scheduled(emu, name, seed):
                assert emu.schedule() == (name, seed)
                orders[name, seed] = emu.sanitizer.order(64).tolist()
            assert sorted(orders[name, seed]) == list(range(64))
        with emulator.scheduled(emu, "random", 1):
            assert emu.sanitizer.order(64).tolist() == orders["random", 1]  # seeded: reproducible
    finally:
        emu.set_racecheck(True)
    assert len({tuple(order) for order in orders.values()}) == 4
    with pytest.raises(ValueError, match="expected 'fifo', 'lifo' or 'random'"):
        emu.set_schedule("backwards", 0)


# ------------------------------------------------------------------------ the plans a GPU would run

def _plan_window(emu, elem_size, soft, acc_bytes, classes):
    """Class counts whose rows plan has dynamic shared memory at most 48 KiB but, with the rows
    kernel's static reduction scratch (3 x 32 accumulators), more: a launch a GPU refuses unless the
    kernel opted in. Computed from make_plan (H100 limits), not hard-coded."""
    static = 3 * 32 * acc_bytes
    window = []
    for C in classes:
        plan = emu.plan(outer=2, classes=C, inner=1, class_contiguous=True, dense_rows=True, elem_size=elem_size,
                        soft=soft)
        if plan["variant"] == "rows" and DEFAULT_SMEM - static < plan["smem_bytes"] <= DEFAULT_SMEM:
            window.append(C)
    return window


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probabilities"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_plans_in_the_48k_window_launch(on_emu, dtype, soft):
    """A shape in every window where static + dynamic shared memory crosses 48 KiB: the kernel must have
    opted in (prepare_kernel), else the emulator refuses the launch as a GPU does."""
    on_emu.set_limits(**H100_LIMITS)
    elem = torch.empty((), dtype=dtype).element_size()
    window = _plan_window(on_emu, elem, soft, ACC_BYTES[dtype], range(2, 24 * 1024 + 1024))
    if not window:
        pytest.skip("no plan of this kind falls in the window")
    for C in (window[0], window[-1]):
        x = make_logits((2, C), dtype, seed=C)
        target = make_prob_target((2, C), dtype) if soft else make_index_target((2,), C)
        mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, label_smoothing=0.1)
        plan = on_emu.last_plan()
        static = on_emu.kernel_attributes("rows", DTYPE_NAME[dtype])["static_smem"]
        assert plan["variant"] == "rows" and static + plan["smem_bytes"] > DEFAULT_SMEM >= plan["smem_bytes"], plan
        check_all(mine, theirs, truth, dtype)


def _flat_offset(shape, offset):
    """A dense view of `shape` starting `offset` elements into its leaf: every row at another
    alignment than the gradient's (fresh, aligned), so that a thread stages other elements than it
    later reads for the gradient."""
    n = 1
    for size in shape:
        n *= size
    return lambda leaf: leaf.view(-1)[offset:offset + n].view(shape)


# Several work items per block (sm_count 1: a small grid) and per cluster, rows starting at every
# alignment (odd C, offset views): the barriers between items and the shared memory reused by them.
MANY_ITEMS = {
    "rows_warp": ((200, 301), None, dict(sm_count=1, max_smem=48 * 1024 - 1024, split_chunk=8192), "rows"),
    "rows_block": ((20, 2999), lambda leaf: leaf[:, 1:], dict(sm_count=1, max_smem=48 * 1024 - 1024,
                                                             split_chunk=8192), "rows"),
    "rows_misaligned": ((1, 600 * 45 + 3), _flat_offset((600, 45), 3),
                        dict(sm_count=1, max_smem=48 * 1024 - 1024, split_chunk=8192), "rows"),
    "rows_block_misaligned": ((1, 20 * 1501 + 1), _flat_offset((20, 1501), 1),
                              dict(sm_count=1, max_smem=48 * 1024 - 1024, split_chunk=8192), "rows"),
    "cluster_misaligned": ((1, 12 * 2101 + 1), _flat_offset((12, 2101), 1),
                           dict(sm_count=1, max_smem=None, split_chunk=8192, max_cluster_blocks=8), "cluster_rows"),
    "split": ((20, 1003), lambda leaf: leaf[:, 3:], dict(sm_count=1, max_smem=1024, split_chunk=128), "split_rows"),
    "split_wide": ((3, 20001), None, dict(sm_count=1, max_smem=1024, split_chunk=256), "split_rows"),
    # (max_smem None: just below what the rows plan needs, so that a cluster holds the row)
    "cluster": ((12, 2101), lambda leaf: leaf[:, 1:], dict(sm_count=1, max_smem=None, split_chunk=8192,
                                                           max_cluster_blocks=8), "cluster_rows"),
    "strided": ((3, 7, 2000), None, dict(sm_count=1, max_smem=48 * 1024 - 1024, split_chunk=8192), "strided"),
}


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probabilities"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", sorted(MANY_ITEMS))
def test_several_items_per_block_and_cluster(on_emu, case, dtype, soft):
    leaf_shape, view, limits, variant = MANY_ITEMS[case]
    x = make_logits(leaf_shape, dtype, seed=len(case))
    shape = tuple(view(x).shape) if view is not None else leaf_shape
    if limits["max_smem"] is None:
        on_emu.set_limits(**DEFAULT_LIMITS)
        dense = view is None or view(x).is_contiguous()
        rows = on_emu.plan(outer=shape[0], classes=shape[1], inner=1, class_contiguous=True, dense_rows=dense,
                           elem_size=x.element_size(), soft=soft)
        limits = {**limits, "max_smem": rows["smem_bytes"] - 1}
    on_emu.set_limits(**limits)
    C = shape[1]
    target = make_prob_target(shape, dtype) if soft else make_index_target((shape[0],) + shape[2:], C, ignore_every=4)
    if soft and view is not None:
        target = view(make_prob_target(leaf_shape, dtype))
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, view=view, label_smoothing=0.1,
                                  target_requires_grad=False)
    plan = on_emu.last_plan()
    assert plan["variant"] == variant, plan
    per_block = plan["chunks"] if variant == "cluster_rows" else 1
    assert plan["work"] > plan["blocks"] // per_block, f"one work item per block or cluster: {plan}"
    check_all(mine, theirs, truth, dtype)


# Forward only (no gradient): inputs read in place whatever their strides, a row per group.
INFERENCE_ITEMS = {
    "rows_warp": ((200, 302), lambda leaf: leaf[:, 1:], dict(sm_count=1, max_smem=48 * 1024 - 1024, split_chunk=8192)),
    "rows_block": ((20, 3002), lambda leaf: leaf[:, 1:], dict(sm_count=1, max_smem=48 * 1024 - 1024,
                                                              split_chunk=8192)),
    "cluster": ((12, 2102), lambda leaf: leaf[:, 1:], dict(sm_count=1, max_smem=4096, split_chunk=8192,
                                                           max_cluster_blocks=8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", sorted(INFERENCE_ITEMS))
def test_several_items_per_block_inference(on_emu, case, dtype):
    leaf_shape, view, limits = INFERENCE_ITEMS[case]
    on_emu.set_limits(**limits)
    x = view(make_logits(leaf_shape, dtype, seed=7))
    target = make_index_target((x.shape[0],), x.shape[1], ignore_every=5)
    with torch.no_grad():
        loss = smoothce.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    plan = on_emu.last_plan()
    per_block = plan["chunks"] if plan["variant"] == "cluster_rows" else 1
    assert plan["work"] > plan["blocks"] // per_block, f"one work item per block or cluster: {plan}"
    truth = ref.cross_entropy(x.double(), target, reduction="none", label_smoothing=0.1)
    theirs = torch.nn.functional.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    assert_close_to_truth(loss, truth, theirs, dtype, "loss",
                          magnitude=loss_magnitude(x, target, reduction="none", label_smoothing=0.1))


def _cluster_case(dtype=torch.float32):
    x = make_logits((5, 3001), dtype, seed=11)
    return x, make_index_target((5,), 3001)


@pytest.mark.parametrize("occupancy", ["zero", "error"])
def test_cluster_fallback(on_emu, occupancy):
    """When no cluster fits, or the occupancy query itself fails, the plan without clusters runs, and a
    failed query leaves no error behind (the fallback's launch check would raise it)."""
    on_emu.set_limits(sm_count=2, max_smem=4096, split_chunk=8192, max_cluster_blocks=8)
    x, target = _cluster_case()
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, label_smoothing=0.1)
    assert on_emu.last_plan()["variant"] == "cluster_rows"
    on_emu.set_cluster_occupancy(occupancy)
    fallback, _, _ = run_all(smoothce.cross_entropy, x, target, label_smoothing=0.1)
    assert on_emu.last_plan()["variant"] == "split_rows"
    assert on_emu.get_last_error() == 0
    check_all(fallback, theirs, truth, torch.float32)


def test_a_pending_error_fails_the_next_launch(emu):
    """What the fallback would meet without clearing the query's error: the emulator models the sticky
    report of C10_CUDA_KERNEL_LAUNCH_CHECK."""
    emu.set_cluster_occupancy("error")
    try:
        with pytest.raises(RuntimeError, match="pending from an earlier call"):
            emu.sanitizer.query_clusters_then_launch(False)
        assert emu.sanitizer.query_clusters_then_launch(True).tolist() == [1]
    finally:
        emu.set_cluster_occupancy("fits")
        emu.get_last_error()


def test_sm_80_code_on_an_sm_90_device_plans_no_clusters(on_emu):
    """A build for "8.0+PTX" run on an H100: the cluster kernel's code is sm_80's (it traps), so the
    plan must not use clusters even though the device has them."""
    on_emu.set_limits(sm_count=2, max_smem=4096, split_chunk=8192, max_cluster_blocks=8)
    x, target = _cluster_case(torch.bfloat16)
    run_all(smoothce.cross_entropy, x, target, label_smoothing=0.1)
    assert on_emu.last_plan()["variant"] == "cluster_rows"
    on_emu.set_ptx_arch(80)
    mine, theirs, truth = run_all(smoothce.cross_entropy, x, target, label_smoothing=0.1)
    assert on_emu.last_plan()["variant"] == "split_rows"
    check_all(mine, theirs, truth, torch.bfloat16)
