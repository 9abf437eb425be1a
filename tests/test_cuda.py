"""The CUDA kernels on a real GPU: parity on every launch plan's shapes, no host synchronisation,
CUDA-graph capture and a > 2^31-element input. (The whole suite runs on CUDA with `make test-gpu`;
without a GPU the same kernels are checked on CPU by tests/test_cuda_emulated.py.)
"""
import pytest
import torch

import smoothce
from conftest import (DTYPES, check_all, dtype_id, make_index_target, make_logits, make_prob_target,
                      make_weight, positions_shape, run_all)

# (these tests choose their kernels themselves)
pytestmark = pytest.mark.cpu_only

if not torch.cuda.is_available():
    pytest.skip("no CUDA device is visible (the CUDA kernels' source is tested on CPU by "
                "tests/test_cuda_emulated.py)", allow_module_level=True)
if smoothce.build_info()["cuda"] != "yes":
    pytest.skip("smoothce was built without its CUDA kernels (rebuild on this GPU machine)",
                allow_module_level=True)


def _on_cuda(input, target, weight=None, **kwargs):
    """smoothce on CUDA copies; the loss comes back through autograd (so backward runs on CUDA too)."""
    loss = smoothce.cross_entropy(input.cuda(), target.cuda(), weight.cuda() if weight is not None else None,
                                  **kwargs)
    return loss.cpu()


# input shapes that reach each plan on a real device (see csrc/cuda/plan.h)
SHAPES = {
    "rows_tiny_c": (4099, 3),
    "rows_sub_warp": (1000, 50),
    "rows_warp": (300, 1000),
    "rows_block": (64, 32000),
    "rows_block_bf16_fits": (16, 50257),
    "split": (8, 128256),
    "strided": (4, 21, 64, 64),
    "strided_wide": (2, 1000, 8, 8),
    "unbatched": (5000,),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_cuda_parity(case, reduction, dtype):
    shape = SHAPES[case]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype)
    target = make_index_target(positions_shape(shape), C, ignore_every=7 if len(shape) > 1 else 0)
    upstream = torch.rand(positions_shape(shape)) + 0.5 if reduction == "none" else None
    mine, theirs, truth = run_all(_on_cuda, x, target, weight=make_weight(C, dtype), upstream=upstream,
                                  reduction=reduction, label_smoothing=0.1)
    check_all(mine, theirs, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", ["rows_sub_warp", "rows_block", "split", "strided"])
def test_cuda_probability_targets(case, dtype):
    shape = SHAPES[case]
    mine, theirs, truth = run_all(_on_cuda, make_logits(shape, dtype), make_prob_target(shape, dtype),
                                  label_smoothing=0.1, target_requires_grad=True)
    check_all(mine, theirs, truth, dtype, check_target_grad=True)


@pytest.mark.parametrize("shape", [(512, 32000), (16, 128256), (4, 21, 64, 64)], ids=str)
def test_no_host_synchronisation(shape):
    """Forward with the gradient and both backward paths (upstream 1 and a scaled one) never sync
    (rows, cluster or split rows, strided)."""
    C = shape[1]
    x = make_logits(shape, torch.bfloat16).cuda().requires_grad_(True)
    target = make_index_target(positions_shape(shape), C).cuda()
    weight = make_weight(C, torch.bfloat16).cuda()
    smoothce.cross_entropy(x, target, weight, label_smoothing=0.1).backward()  # warm-up (caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        smoothce.cross_entropy(x, target, weight, label_smoothing=0.1).backward()
        (smoothce.cross_entropy(x, target, weight, label_smoothing=0.1) * 0.5).backward()
        smoothce.cross_entropy(x, target, weight, reduction="none").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture():
    """forward + backward captured in a CUDA graph and replayed on new data give eager's results."""
    x = make_logits((256, 5000)).cuda().requires_grad_(True)
    target = make_index_target((256,), 5000, ignore_every=5).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
            x.grad = None
            smoothce.cross_entropy(x, target, label_smoothing=0.1).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = smoothce.cross_entropy(x, target, label_smoothing=0.1)
        loss.backward()
    with torch.no_grad():
        x.copy_(make_logits((256, 5000), seed=7).cuda())
    graph.replay()
    torch.cuda.synchronize()
    leaf = x.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(leaf, target, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, leaf.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """64-bit offsets: 2^31 + C bf16 logits (8 GiB with the gradient); rows at both ends checked."""
    C = 32768
    N = 2 ** 31 // C + 1
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * N * C * 2 + (1 << 30):
        pytest.skip(f"needs {3 * N * C * 2 >> 30} GiB of free GPU memory, {free >> 30} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((N, C), generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, C, (N,), generator=g, device="cuda")
    loss = smoothce.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    loss.backward(torch.ones_like(loss))
    for rows in (slice(0, 4), slice(N - 4, N)):
        leaf = x.detach()[rows].float().requires_grad_(True)
        expected = torch.nn.functional.cross_entropy(leaf, target[rows], reduction="none", label_smoothing=0.1)
        expected.sum().backward()
        torch.testing.assert_close(loss[rows].float(), expected, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(x.grad[rows].float(), leaf.grad, rtol=2e-2, atol=1e-4)


def test_opcheck_on_cuda():
    x = make_logits((6, 11)).cuda()
    target = make_index_target((6,), 11, ignore_every=3).cuda()
    weight = make_weight(11).cuda()
    for reduction in (0, 1, 2):
        torch.library.opcheck(torch.ops.smoothce.forward.default, (x, target, weight, -100, reduction, 0.1, True, False))
    upstream = torch.rand(6, device="cuda")
    torch.library.opcheck(torch.ops.smoothce.forward.default,
                          (x, target, weight, -100, 0, 0.1, True, False, upstream))
    for scale in (1.0, 2.5):
        torch.library.opcheck(torch.ops.smoothce.scale_grad_.default, (x.clone(), torch.tensor(scale, device="cuda")))
