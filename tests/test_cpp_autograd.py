"""The C++ autograd node (csrc/autograd.cpp) that serves eager calls whose logits need a gradient,
against CrossEntropyFunction (smoothce/_function.py), the Python autograd.Function that serves
torch.compile, inplace_backward, the integrations' divisor and gradients of the target: the same loss
and gradient bit for bit, and the same behaviour in autograd's graph (a second backward, higher
orders, saved-tensor hooks, in-place modification, checkpointing, anomaly mode)."""
import contextlib

import pytest
import torch

import smoothce
from smoothce import _function
from conftest import BACKEND, make_index_target, make_logits, make_weight, positions_shape

NODE = "CppNode<smoothce::CrossEntropyFunction>"
PYTHON_NODE = "CrossEntropyFunctionBackward"


@contextlib.contextmanager
def through_python(on=True):
    """Calls inside go through the Python autograd.Function (CrossEntropyFunction) rather than the C++
    node, also the common calls that smoothce.cross_entropy otherwise hands to C++ whole."""
    with pytest.MonkeyPatch.context() as patch:
        if on:
            patch.setattr(_function, "_cpp_autograd", lambda: False)
            patch.setattr(smoothce, "_common", lambda *args: None)
        yield


def node_name(loss):
    return loss.grad_fn.name() if loss.grad_fn is not None else None


SHAPES = {"2d": (8, 11), "nchw": (3, 7, 2, 3), "unbatched": (11,)}
OPTIONS = {
    "plain": {},
    "eps_weight": {"label_smoothing": 0.2, "weight": True},
    "ignore": {"label_smoothing": 0.1, "ignore": True},
    "others": {"label_smoothing": 0.3, "smoothing": "others"},
    "target_values": {"target_values": (0.8, 0.05)},
    "z_loss": {"label_smoothing": 0.1, "z_loss": 1e-3, "weight": True},
    "mixup_float": {"label_smoothing": 0.1, "mixup": 0.3},
    "mixup_tensor": {"label_smoothing": 0.1, "mixup": "tensor"},
    "soft": {"soft": True},
    "autocast": {"label_smoothing": 0.1, "autocast": True},
}


def _loss_fn(shape, dtype, options, reduction):
    """(logits leaf, a function of the logits giving the loss) for one case."""
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype).requires_grad_(True)
    options = dict(options)
    positions = positions_shape(shape)
    target = make_index_target(positions, C)
    if options.pop("ignore", False) and target.dim():
        target.view(-1)[::3] = 5
        options["ignore_index"] = 5
    if options.pop("soft", False):
        target = torch.softmax(make_logits(shape, torch.float32, seed=7), dim=0 if len(shape) == 1 else 1).to(dtype)
    if options.pop("weight", False):
        options["weight"] = make_weight(C, dtype)
    if options.pop("autocast", False):  # an fp32 loss from half logits, with fp32 class weights
        options["weight"] = make_weight(C, torch.float32)
        with_autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        with_autocast = contextlib.nullcontext()
    mixup = options.pop("mixup", None)
    target_b = make_index_target(positions, C, seed=9)
    lam = torch.rand(positions, generator=torch.Generator().manual_seed(4)) if mixup == "tensor" else mixup

    def fn(logits):
        with with_autocast:
            if mixup is None:
                return smoothce.cross_entropy(logits, target, reduction=reduction, **options)
            return smoothce.mixup_cross_entropy(logits, target, target_b, lam, reduction=reduction, **options)
    return x, fn


def _fwd_bwd_twice(shape, dtype, options, reduction, scale=0.75):
    """The loss, the gradient of the first backward (retain_graph) and of a second one, for an upstream
    gradient that is not 1 (`scale`; 'none': random)."""
    x, fn = _loss_fn(shape, dtype, options, reduction)
    loss = fn(x)
    upstream = torch.full_like(loss, scale) if reduction != "none" else (
        torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)).to(loss.dtype))
    loss.backward(upstream, retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(upstream)
    return loss.detach(), first, x.grad, node_name(loss)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_node_matches_the_python_function(shape, options, dtype, reduction):
    """Bit for bit: the loss, the first (fused, rescaled) gradient and the second (recomputed) one. Then
    the node again, until it guesses the upstream gradient (bf16): the fused gradient is scaled inside
    the kernel, bit for bit the recomputed one; fp32 and fp64 give the same bits as the first time, and
    for a power of two (which they guess) the bits of the Python Function's rescale."""
    shape = SHAPES[shape]
    options = OPTIONS[options]
    loss, first, second, name = _fwd_bwd_twice(shape, dtype, options, reduction)
    with through_python():
        py_loss, py_first, py_second, py_name = _fwd_bwd_twice(shape, dtype, options, reduction)
    if BACKEND != "cuda":  # on a GPU the graph's last node is the copy back to the CPU
        assert NODE in name and py_name == PYTHON_NODE
    assert torch.equal(loss, py_loss)
    assert torch.equal(first, py_first)
    assert torch.equal(second, py_second)
    # (the fused gradient is rescaled after rounding, the recomputed one scaled inside the kernel)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(first, second, rtol=2 * eps, atol=4 * eps * first.abs().max().item())
    # The node again, twice (its guess is the upstream gradient the last two backwards received).
    for _ in range(2):
        _, guessed_first, guessed_second, _ = _fwd_bwd_twice(shape, dtype, options, reduction)
        assert torch.equal(guessed_second, second)
        # bf16 on CPU (on a GPU the guess stays 1), mean or sum: recomputed for 0.75, then (the second
        # time) the fused gradient scaled inside the kernel for 0.75, the same bits; else the same bits
        # as the first time
        guessed = reduction != "none" and BACKEND != "cuda" and dtype == torch.bfloat16
        assert torch.equal(guessed_first, second if guessed else first)
    if dtype == torch.bfloat16 or reduction == "none":
        return
    # fp32, fp64: a power of two is guessed (from the third call on: the guess is what the last two
    # backwards received), and the gradient scaled inside the kernel has the bits of the Python
    # Function's rescale
    with through_python():
        _, py_first, _, _ = _fwd_bwd_twice(shape, dtype, options, reduction, scale=0.5)
    for _ in range(3):
        _, guessed_first, _, _ = _fwd_bwd_twice(shape, dtype, options, reduction, scale=0.5)
        assert torch.equal(guessed_first, py_first)


@pytest.mark.skipif(BACKEND == "cuda", reason="on a GPU the loss's grad_fn is the copy back to the CPU")
def test_which_calls_the_node_serves():
    x = make_logits((6, 5)).requires_grad_(True)
    t = make_index_target((6,), 5)
    assert NODE in node_name(smoothce.cross_entropy(x, t, label_smoothing=0.1))
    assert NODE in node_name(smoothce.cross_entropy(x * 1, t, z_loss=1e-4, reduction="none"))
    # inplace_backward, a target that needs a gradient, the integrations' divisor: the Python Function
    assert node_name(smoothce.cross_entropy(x * 1, t, inplace_backward=True)) == PYTHON_NODE
    soft = torch.softmax(make_logits((6, 5), seed=3), 1).requires_grad_(True)
    assert node_name(smoothce.cross_entropy(x, soft)) == PYTHON_NODE
    assert node_name(_function.cross_entropy_impl(x, t, None, -100, "sum", 0.1, divisor=4)) == PYTHON_NODE
    # inference: no graph, whichever way
    with torch.no_grad():
        loss = smoothce.cross_entropy(x, t, label_smoothing=0.1)
    assert loss.grad_fn is None and not loss.requires_grad
    loss = smoothce.cross_entropy(x.detach(), t, label_smoothing=0.1)
    assert loss.grad_fn is None and not loss.requires_grad
    assert torch.equal(loss, smoothce.cross_entropy(x, t, label_smoothing=0.1).detach())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", ["eps_weight", "ignore", "target_values", "z_loss", "mixup_tensor"])
def test_node_gradcheck_and_gradgradcheck(options, reduction):
    """float64: the node's gradients (a fresh graph, a retained one) and, under create_graph=True, the
    differentiable gradient its backward asks Python for."""
    x, fn = _loss_fn((4, 5), torch.float64, OPTIONS[options], reduction)
    if BACKEND != "cuda":
        assert NODE in node_name(fn(x))
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_create_graph_gradient_penalty():
    """A gradient penalty (the gradient's norm, differentiated again) through the node equals the one
    through the Python Function and the reference."""
    results = []
    for use_node in (True, False):
        x = make_logits((5, 7), torch.float64).requires_grad_(True)
        t = make_index_target((5,), 7)
        with through_python(not use_node):
            loss = smoothce.cross_entropy(x, t, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        grad.square().sum().backward()
        results.append((grad.detach(), x.grad))
    y = make_logits((5, 7), torch.float64).requires_grad_(True)
    ref_loss = smoothce.reference.cross_entropy(y, make_index_target((5,), 7), label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref_loss, y, create_graph=True)
    ref_grad.square().sum().backward()
    for grad, penalty_grad in results:
        torch.testing.assert_close(grad, ref_grad.detach())
        torch.testing.assert_close(penalty_grad, y.grad)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_saved_tensor_hooks_pack_what_backward_reads(reduction):
    """torch.autograd.graph.saved_tensors_hooks (activation offloading) see the saved logits, and
    what their unpack hook returns is what the gradient is computed from."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    x, fn = _loss_fn((6, 9), torch.float32, OPTIONS["eps_weight"], reduction)
    expected_loss = fn(x)
    expected_loss.sum().backward()
    expected = x.grad
    x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = fn(x)
    assert (6, 9) in packed
    loss.sum().backward()
    assert torch.equal(x.grad, expected)
    # 'none' recomputes the gradient from the saved logits; 'mean' rescales the fused one
    assert ((6, 9) in unpacked) == (reduction == "none")


def test_logits_modified_in_place_before_backward():
    """The saved logits are checked against their version: a backward that needs them after an in-place
    change raises autograd's error, through either path."""
    for use_python in (False, True):
        x = make_logits((4, 6)).requires_grad_(True)
        h = x * 1
        with through_python(use_python):
            loss = smoothce.cross_entropy(h, make_index_target((4,), 6), reduction="none")
        with torch.no_grad():
            h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.sum().backward()


def test_second_backward_after_the_graph_is_freed():
    x = make_logits((4, 6)).requires_grad_(True)
    loss = smoothce.cross_entropy(x, make_index_target((4,), 6), reduction="none")
    loss.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.sum().backward()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_checkpoint_and_anomaly_mode():
    """torch.utils.checkpoint (the loss recomputed in backward) and detect_anomaly give the gradient of
    a plain call."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5).double()
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    t = make_index_target((6,), 5)

    def f(h):
        return smoothce.cross_entropy(layer(h), t, label_smoothing=0.1)

    f(h).backward()
    expected = h.grad
    h.grad = None
    torch.utils.checkpoint.checkpoint(f, h, use_reentrant=False).backward()
    torch.testing.assert_close(h.grad, expected, rtol=0, atol=0)
    h.grad = None
    with torch.autograd.detect_anomaly():
        f(h).backward()
    torch.testing.assert_close(h.grad, expected, rtol=0, atol=0)


def test_backward_on_another_thread():
    """The node's backward runs wherever autograd runs it; a loss made on one thread is differentiated
    on another."""
    import threading

    x = make_logits((16, 10)).requires_grad_(True)
    t = make_index_target((16,), 10)
    smoothce.cross_entropy(x, t, label_smoothing=0.1).backward()
    expected, x.grad = x.grad, None
    loss = smoothce.cross_entropy(x, t, label_smoothing=0.1)
    errors = []

    def work():
        try:
            loss.backward()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors
    assert torch.equal(x.grad, expected)


def test_errors_keep_their_types():
    """Errors raised by the kernels' checks under the C++ call are the same Python exceptions."""
    x = make_logits((4, 5)).requires_grad_(True)
    with pytest.raises(IndexError, match="out of bounds"):
        smoothce.cross_entropy(x, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="lam"):
        smoothce.mixup_cross_entropy(x, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 1, 1]),
                                     torch.tensor([0.5, 2.0, 0.5, 0.5]))


def test_functorch_transforms_are_not_served_by_the_node():
    """torch.func's transforms see CrossEntropyFunction (and its error), never a node they cannot look into."""
    x = make_logits((4, 5))
    t = make_index_target((4,), 5)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: smoothce.cross_entropy(x, t))(x)


@pytest.mark.skipif(BACKEND == "cuda", reason="CPU tensors: the backend's wrapper would leave the fake mode")
def test_fake_tensor_mode():
    """Under FakeTensorMode (shape and memory planning) the node runs the ops' fake kernels."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(8, 10, requires_grad=True)
        loss = smoothce.cross_entropy(x, torch.randint(0, 10, (8,)), label_smoothing=0.1, reduction="none")
        loss.sum().backward()
    assert isinstance(loss, FakeTensor) and NODE in node_name(loss)
    assert loss.shape == (8,) and x.grad.shape == (8, 10)


def test_compiled_autograd():
    """torch.compile's compiled autograd traces the node's backward."""
    import torch._dynamo.compiled_autograd as compiled_autograd

    torch.manual_seed(0)
    layer = torch.nn.Linear(10, 10)
    h = torch.randn(8, 10, requires_grad=True)
    t = make_index_target((8,), 10)

    def step():
        smoothce.cross_entropy(layer(h), t, label_smoothing=0.1).backward()
        grad, h.grad = h.grad, None
        return grad

    expected = step()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        got = step()
    torch.testing.assert_close(got, expected)


@pytest.mark.cpu_only  # the CPU kernels' own allocations
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("use_node", [True, False], ids=["node", "python"])
def test_the_gradient_becomes_grad_without_a_copy(use_node, reduction, monkeypatch):
    """One N×C allocation per fwd+bwd: the gradient the kernel writes is the one autograd stores in
    .grad (a copy on the way would double the peak). bench/harness.py's profiler-based peak."""
    from conftest import load_harness

    harness = load_harness()
    if not use_node:
        monkeypatch.setattr(_function, "_cpp_autograd", lambda: False)
        monkeypatch.setattr(smoothce, "_common", lambda *args: None)
    x = make_logits((512, 1000)).requires_grad_(True)
    t = make_index_target((512,), 1000)

    def step():
        loss = smoothce.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()

    smoothce.empty_cache()
    x.grad = None
    peak = harness.cpu_peak_extra_bytes(step)
    if peak is None:
        pytest.skip("the profiler's memory events cannot be read in this torch")
    assert x.grad is not None
    gradient = x.numel() * x.element_size()
    assert gradient <= peak < 1.25 * gradient


# smoothce.cross_entropy's (and CrossEntropyLoss's) common call goes to C++ whole
# (_C.common_cross_entropy), skipping cross_entropy_impl's Python checks; every other call returns
# None there and goes the Python way.
COMMON_CALLS = {
    "defaults": {},
    "mean_eps": {"label_smoothing": 0.1},
    "sum_int_eps": {"reduction": "sum", "label_smoothing": 1},
    "none_weight_ignore": {"reduction": "none", "weight": True, "ignore_index": 2, "label_smoothing": 0.25},
    "explicit_defaults": {"smoothing": "uniform", "target_values": None, "z_loss": 0, "inplace_backward": False},
    "negative_zeros": {"reduction": "sum", "label_smoothing": -0.0, "z_loss": -0.0},
}


def _common_args(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, smoothing="uniform",
                 target_values=None, z_loss=0.0, inplace_backward=False):
    return (_function._ops.name, x, t, weight, ignore_index, reduction, label_smoothing, smoothing, target_values,
            z_loss, inplace_backward)


@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("case", sorted(COMMON_CALLS))
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)], ids=["2d", "map"])
def test_common_call_skips_the_python_checks(shape, case, grad, module, monkeypatch):
    """The common call never reaches cross_entropy_impl, and gives the loss and gradient bits the
    Python way gives (the same kernels and node after the checks)."""
    kwargs = dict(COMMON_CALLS[case])
    if kwargs.pop("weight", False):
        kwargs["weight"] = make_weight(shape[1])
    t = make_index_target(shape[:1] + shape[2:], shape[1], ignore_every=3, ignore_index=kwargs.get("ignore_index", -100))

    def run():
        x = make_logits(shape).requires_grad_(grad)
        if module:
            weight = kwargs.get("weight")
            loss_fn = smoothce.CrossEntropyLoss(**{k: v for k, v in kwargs.items() if k != "weight"}, weight=weight)
            loss = loss_fn(x, t)
        else:
            loss = smoothce.cross_entropy(x, t, **kwargs)
        if grad:
            loss.sum().backward()
        return loss.detach(), x.grad, node_name(loss)

    with monkeypatch.context() as patch:
        patch.setattr(smoothce, "_common", lambda *args: None)
        want_loss, want_grad, want_node = run()
    with monkeypatch.context() as patch:
        def refuse(*args, **kwargs):
            raise AssertionError("the common call went the Python way")

        patch.setattr(smoothce, "cross_entropy_impl", refuse)
        loss, grad_, node = run()
    assert torch.equal(loss, want_loss)
    assert node == want_node and (node is not None) == grad
    if grad:
        assert torch.equal(grad_, want_grad)


class _Logits(torch.Tensor):
    pass


def _other_calls():
    """(name, the arguments of _C.common_cross_entropy) of calls that must go the Python way."""
    x, t = make_logits((4, 5)), make_index_target((4,), 5)
    np = pytest.importorskip("numpy")
    return {
        "z_loss": _common_args(x, t, z_loss=1e-4),
        "z_loss_bool": _common_args(x, t, z_loss=False),
        "z_loss_nan": _common_args(x, t, z_loss=float("nan")),
        "others": _common_args(x, t, label_smoothing=0.1, smoothing="others"),
        "target_values": _common_args(x, t, target_values=(0.9, 0.02)),
        "inplace": _common_args(x * 1, t, inplace_backward=True),
        "inplace_int": _common_args(x, t, inplace_backward=0),
        "eps_numpy": _common_args(x, t, label_smoothing=np.float64(0.1)),
        "eps_bool": _common_args(x, t, label_smoothing=True),
        "eps_above_1": _common_args(x, t, label_smoothing=1.5),
        "eps_negative": _common_args(x, t, label_smoothing=-0.0 - 1e-9),
        "eps_nan": _common_args(x, t, label_smoothing=float("nan")),
        "eps_huge_int": _common_args(x, t, label_smoothing=2 ** 80),
        "ignore_bool": _common_args(x, t, ignore_index=True),
        "ignore_float": _common_args(x, t, ignore_index=-100.0),
        "ignore_huge": _common_args(x, t, ignore_index=2 ** 70),
        "ignore_numpy": _common_args(x, t, ignore_index=np.int64(-100)),
        "reduction_case": _common_args(x, t, reduction="MEAN"),
        "reduction_none_object": _common_args(x, t, reduction=None),
        "smoothing_case": _common_args(x, t, smoothing="Uniform"),
        "subclass": _common_args(x.as_subclass(_Logits), t),
        "list_input": _common_args(x.tolist(), t),
        "no_target": _common_args(x, None),
        "meta": _common_args(x.to("meta"), t.to("meta")),
        "mixed_devices": _common_args(x, t.to("meta")),
        "soft_target_grad": _common_args(x, torch.softmax(x, 1).requires_grad_(True)),
    }


@pytest.mark.parametrize("case", sorted(_other_calls()))
def test_other_calls_go_the_python_way(case):
    """_C.common_cross_entropy returns None for every call it does not take whole (the Python way then
    converts, checks and raises): other numbers' types, values out of range, the variants, tensor
    subclasses, devices without kernels or apart, a target that needs a gradient."""
    assert smoothce._common(*_other_calls()[case]) is None


def test_common_call_boundaries():
    """Parameters are plain tensors to it (as to the Python way, which hands them to C++ too);
    torch.func transforms go the Python way; a wrong number of arguments raises."""
    x, t = make_logits((4, 5)), make_index_target((4,), 5)
    want = smoothce.cross_entropy(x, t, make_weight(5))
    assert torch.equal(smoothce._common(*_common_args(x, t, weight=make_weight(5))), want)
    weight = torch.nn.Parameter(make_weight(5))
    assert torch.equal(smoothce._common(*_common_args(torch.nn.Parameter(x.clone()), t, weight=weight)).detach(), want)
    seen = []

    def loss(row, target):
        seen.append(smoothce._common(*_common_args(row[None], target[None])))
        return smoothce.cross_entropy(row[None], target[None])

    torch.func.vmap(loss)(x, t)
    assert seen == [None]
    with pytest.raises(TypeError, match="11 arguments"):
        smoothce._common(*_common_args(x, t)[:10])


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_common_call_under_autocast(dtype, grad, monkeypatch):
    """Under autocast the common call gives the fp32 loss, the same bits as the Python way; a
    probability target of another dtype than the logits (which the Python way casts) goes there."""
    def run(common):
        x = make_logits((6, 5), dtype).requires_grad_(grad)
        t = make_index_target((6,), 5)
        with monkeypatch.context() as patch:
            if not common:
                patch.setattr(smoothce, "_common", lambda *args: None)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if common:
                    assert smoothce._common(*_common_args(x, t, label_smoothing=0.1)) is not None
                loss = smoothce.cross_entropy(x, t, label_smoothing=0.1)
        if grad:
            loss.backward()
        return loss.detach(), x.grad

    loss, grad_ = run(True)
    want_loss, want_grad = run(False)
    assert loss.dtype == torch.float32 and torch.equal(loss, want_loss)
    assert (grad_ is None and want_grad is None) or torch.equal(grad_, want_grad)
    x = make_logits((6, 5), dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        assert smoothce._common(*_common_args(x, torch.softmax(make_logits((6, 5)), 1).to(other))) is None
        assert smoothce._common(*_common_args(x, torch.softmax(make_logits((6, 5)), 1).to(dtype))) is not None
