"""memcheck of global memory in the CPU emulator (tests/emu/memcheck.h): misaligned accesses,
accesses outside every live tensor and cross-block races are reported by the launch (a RuntimeError
naming the kernel, block, thread and source line), with known-bad tiny kernels
(tests/emu/memcheck_selftest.cpp) and correct controls; the emulated ops run with it on."""
import gc
import pathlib
import re

import pytest
import torch

import emulator

pytestmark = pytest.mark.cpu_only

SELFTEST_SOURCE = pathlib.Path(__file__).resolve().parent / "emu" / "memcheck_selftest.cpp"


def site(snippet):
    """'memcheck_selftest.cpp:<line>' of the (unique) source line holding `snippet`."""
    lines = [i for i, text in enumerate(SELFTEST_SOURCE.read_text().splitlines(), 1) if snippet in text]
    assert len(lines) == 1, (snippet, lines)
    return f"memcheck_selftest.cpp:{lines[0]}"


@pytest.fixture(scope="module")
def emu():
    # (the expected messages name the thread that fails first in thread order: the fifo schedule)
    with emulator.scheduled(emulator.load(), "fifo") as module:
        yield module


@pytest.fixture
def mc(emu):
    """The self-test kernels on one worker (blocks run in order: messages are deterministic)."""
    previous = emu.workers()
    assert emu.memcheck()
    emu.set_workers(1)
    yield emu.memcheck_selftest
    emu.set_workers(previous)
    emu.set_memcheck(True)


def selftest_ranges(emu):
    gc.collect()
    return [r for r in emu.memcheck_ranges() if "memcheck_selftest" in r[2]]


def assert_usable(emu, mc):
    """After a failure: a correct launch runs and nothing of the failed call stays registered."""
    x = torch.arange(70, dtype=torch.float32)
    assert torch.equal(mc.slices(x), 2 * x + x[0])
    assert selftest_ranges(emu) == []
    assert emu.memcheck_info()["active_scopes"] == 0


def test_memcheck_is_on_and_tracks_allocations(emu):
    info = emu.memcheck_info()
    assert info["enabled"] and info["allocator_installed"]


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("n, threads", [(1, 32), (100, 32), (1000, 64)])
def test_a_correct_kernel_passes(emu, mc, workers, n, threads):
    """Each block its own slice, every block reading one shared input element."""
    emu.set_workers(workers)
    x = torch.randn(n)
    assert torch.equal(mc.slices(x, threads), 2 * x + x[0])


def test_aligned_vectors_pass(mc):
    x = torch.arange(16, dtype=torch.float32)
    out = mc.pack(x, 4, 8)
    assert torch.equal(out[8:12], x[4:8]) and not out[:8].any() and not out[12:].any()


def test_a_misaligned_vector_store_is_reported(emu, mc):
    x = torch.arange(16, dtype=torch.float32)
    with pytest.raises(RuntimeError) as error:
        mc.pack(x, 0, 1)
    message = str(error.value)
    assert "pack_kernel" in message and "block (0,0,0)" in message and "thread (0,0,0)" in message
    assert re.search(r"misaligned global write of 16 bytes at 0x[0-9a-f]*4 \(" + site("store_pack(out + out_offset")
                     + r"\): the address must be a multiple of 16", message), message
    assert "byte offset 4 of a 36-byte allocation made during memcheck_selftest.pack" in message
    assert_usable(emu, mc)


def test_a_misaligned_vector_load_is_reported(emu, mc):
    x = torch.arange(16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"misaligned global read of 16 bytes at 0x[0-9a-f]*8 \("
                       + site("load_pack(in + in_offset)") + r"\): the address must be a multiple of 16 "
                       r"\(it is at byte offset 8 of `in` \(argument of memcheck_selftest.pack\)"):
        mc.pack(x, 2, 0)
    assert_usable(emu, mc)


@pytest.mark.parametrize("blocks, threads", [(4, 32), (1, 128)])
def test_a_read_past_the_end_is_reported(emu, mc, blocks, threads):
    x = torch.arange(100, dtype=torch.float32)
    with pytest.raises(RuntimeError) as error:
        mc.index(x, blocks, threads, 100, False, thread=3)
    message = str(error.value)
    assert "index_kernel" in message and f"block ({blocks - 1},0,0)" in message and "thread (3,0,0)" in message
    lo = x.data_ptr()
    assert (f"out-of-bounds global read of 4 bytes at {hex(lo + 400)} ({site('load_global(in + index)')}): "
            f"not inside any live tensor; the nearest is `in` (argument of memcheck_selftest.index) "
            f"[{hex(lo)}, {hex(lo + 400)}) of 400 bytes: the access is at byte offset 400, 4 bytes beyond its end"
            in message), message
    assert_usable(emu, mc)


def test_a_read_before_the_start_is_reported(emu, mc):
    x = torch.arange(100, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=re.escape(
            f"out-of-bounds global read of 4 bytes at {hex(x.data_ptr() - 4)} ({site('load_global(in + index)')}): "
            "not inside any live tensor; the nearest is `in`") + r".*: the access starts 4 bytes before it"):
        mc.index(x, 4, 32, -1, False)
    assert_usable(emu, mc)


@pytest.mark.parametrize("index, beyond", [(100, 4), (101, 8), (120, 84)])
def test_a_write_past_the_end_of_an_output_is_reported(emu, mc, index, beyond):
    """The output is allocated inside the op (a tracked allocation, with gaps around it)."""
    x = torch.arange(100, dtype=torch.float32)
    with pytest.raises(RuntimeError) as error:
        mc.index(x, 4, 32, index, True)
    message = str(error.value)
    assert f"out-of-bounds global write of 4 bytes at 0x" in message and site("store_global(out + index") in message
    assert (f"the nearest is a 400-byte allocation made during memcheck_selftest.index" in message
            and f"the access is at byte offset {4 * index}, {beyond} bytes beyond its end" in message), message
    assert "block (3,0,0)" in message
    assert_usable(emu, mc)


def test_memory_no_op_was_given_is_out_of_bounds(emu, mc):
    x = torch.arange(100, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=re.escape(f"out-of-bounds global read of 4 bytes at {hex(x.data_ptr())} (")
                       + r".*not inside any live tensor"):
        mc.index(x, 4, 32, 0, False, register_input=False)
    assert_usable(emu, mc)


def test_a_straddling_access_is_out_of_bounds(emu, mc):
    """A vector whose first bytes are inside the tensor and the rest beyond its end."""
    x = torch.arange(18, dtype=torch.float32)[:14]  # (the storage has 18 floats: 72 bytes)
    with pytest.raises(RuntimeError, match=r"out-of-bounds global read of 16 bytes .* the access is at byte offset "
                                           r"64, 8 bytes beyond its end"):
        mc.pack(torch.arange(18, dtype=torch.float32), 16, 0)
    assert torch.equal(mc.pack(x, 12, 0)[:4], torch.arange(12, 16, dtype=torch.float32))  # the storage counts
    assert_usable(emu, mc)


RACES = {
    # mode: (the second block's access, its site's marker, the first block and what it did)
    1: ("block (1,0,0) writes", "// 1: every block writes S", "block (0,0,0) wrote"),
    2: ("block (1,0,0) reads", "// 2: the others read S", "block (0,0,0) wrote"),
    3: ("block (1,0,0) writes", "// 3: the others write S", "block (0,0,0) read"),
    4: ("block (2,0,0) writes", "// 4: the others write S", "block (0,0,0) (among others) read"),
}


@pytest.mark.parametrize("mode", sorted(RACES))
def test_cross_block_races_are_reported(emu, mc, mode):
    second, snippet, first = RACES[mode]
    data = torch.zeros(5, dtype=torch.int16)
    with pytest.raises(RuntimeError) as error:
        mc.race(data, mode)
    message = str(error.value)
    assert "race_kernel" in message, message
    expected = (f"cross-block race on global memory: {second} 2 bytes at {hex(data.data_ptr() + 8)} "
                f"({site(snippet)}), byte offset 8 of `data` (argument of memcheck_selftest.race) "
                f"[{hex(data.data_ptr())}, {hex(data.data_ptr() + 10)}) of 10 bytes; {first} it earlier in the "
                "same launch")
    assert expected in message, message
    assert_usable(emu, mc)


@pytest.mark.parametrize("mode", [0, 5])
@pytest.mark.parametrize("workers", [1, 4])
def test_blocks_on_neighbouring_2_byte_elements_do_not_race(emu, mc, mode, workers):
    emu.set_workers(workers)
    for blocks in (1, 2, 7, 33):
        data = torch.arange(blocks + 1, dtype=torch.int16)
        expected = data.clone()
        expected[:blocks] += data[blocks] if mode == 0 else 1
        mc.race(data, mode)
        assert torch.equal(data, expected)


def test_a_race_is_found_on_several_workers(emu, mc):
    emu.set_workers(4)
    for _ in range(5):
        with pytest.raises(RuntimeError, match=r"cross-block race on global memory: block \(\d,0,0\) writes 2 bytes "
                                               r".* block \(\d,0,0\) wrote it earlier"):
            mc.race(torch.zeros(9, dtype=torch.int16), 1)
    assert_usable(emu, mc)


def test_another_blocks_writes_of_an_earlier_launch_may_be_read(mc):
    data = torch.zeros(5, dtype=torch.int16)
    for _ in range(3):
        mc.race(data, 5)  # every block writes its own element
        mc.race(data, 6)  # ... and reads its neighbour's in the next launch
        mc.race(data, 0)  # every block reads S (which no block of the launch writes)
    assert data.tolist() == [3, 3, 3, 3, 0]


def test_blocks_of_one_cluster_may_share_memory(emu, mc):
    data = torch.zeros(9, dtype=torch.int16)
    mc.race(data, 1, cluster_blocks=8)  # one cluster: its blocks can order their accesses (cluster_sync)
    with pytest.raises(RuntimeError) as error:
        mc.race(data, 1, cluster_blocks=4)
    message = str(error.value)
    assert ("cross-block race on global memory: cluster 1 (blocks (4,0,0)-(7,0,0)) writes 2 bytes" in message
            and "; cluster 0 (blocks (0,0,0)-(3,0,0)) wrote it earlier in the same launch" in message), message
    assert "block (4,0,0) (rank 0 of a cluster of 4)" in message
    assert_usable(emu, mc)


def test_memcheck_can_be_turned_off(emu, mc):
    emu.set_memcheck(False)
    assert not emu.memcheck()
    data = torch.zeros(5, dtype=torch.int16)
    mc.race(data, 1)  # not reported
    assert data[4] == 3
    x = torch.arange(100, dtype=torch.float32)
    mc.index(x, 4, 32, 0, False, register_input=False)
    emu.set_memcheck(True)
    with pytest.raises(RuntimeError, match="cross-block race"):
        mc.race(data, 1)


def test_emulated_ops_are_checked_and_release_their_ranges(emu):
    """An emulated op runs its launches with bounds and race checks; its outputs stay registered as
    long as they live."""
    gc.collect()
    before = emu.memcheck_info()["checked_launches"]
    ranges_before = len(emu.memcheck_ranges())
    x = torch.randn(5, 300)
    target = torch.randint(0, 300, (5,))
    loss, lse, grad = torch.ops.smoothce_emu.forward(x, target, None, -100, 1, 0.1, True, False, None)
    assert emu.memcheck_info()["checked_launches"] > before
    labels = [r[2] for r in emu.memcheck_ranges()]
    assert any("allocation made during smoothce_emu::forward" in label for label in labels)
    assert not any("argument of smoothce_emu::forward" in label for label in labels)  # (only while it runs)
    del loss, lse, grad
    gc.collect()
    assert len(emu.memcheck_ranges()) == ranges_before
