"""smoothce.integrations.timm against timm itself: the same losses, gradients, mixed images and
(dense) targets at the same seed, and a tiny timm model trained a few steps both ways."""
import copy
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import smoothce

if os.environ.get("CI"):
    import timm  # noqa: F401  (make test installs it: a missing timm fails in CI)
else:
    pytest.importorskip("timm")
import timm.data  # noqa: E402
import timm.loss  # noqa: E402

from smoothce.integrations import timm as st  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}

# (mixup_alpha, cutmix_alpha, extra keywords): mixup, cutmix, switching, cutmix_minmax, not always
# applied, cutmix without lam correction.
MIX_SETTINGS = {
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "switch": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    "minmax": dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.3, 0.8)),
    "prob": dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5),
    "no_correct_lam": dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False),
}
MODES = ["batch", "pair", "elem"]


def logits(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def labels(n, classes, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def loss_and_grad(loss_fn, x, target):
    leaf = x.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, target)
    loss.backward()
    return loss.detach(), leaf.grad


def assert_same(ours, theirs, dtype):
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_label_smoothing_cross_entropy_matches_timm(dtype, smoothing):
    x, t = logits((64, 37), dtype), labels(64, 37)
    ours = loss_and_grad(st.LabelSmoothingCrossEntropy(smoothing), x, t)
    theirs = loss_and_grad(timm.loss.LabelSmoothingCrossEntropy(smoothing), x, t)
    assert_same(ours, theirs, dtype)


def test_label_smoothing_cross_entropy_keeps_timms_constructor_and_type():
    loss_fn = st.LabelSmoothingCrossEntropy(smoothing=0.2)
    assert isinstance(loss_fn, timm.loss.LabelSmoothingCrossEntropy)
    assert (loss_fn.smoothing, loss_fn.confidence) == (0.2, 0.8)
    with pytest.raises(AssertionError):  # timm's own check
        st.LabelSmoothingCrossEntropy(smoothing=1.0)


def test_label_smoothing_cross_entropy_classes_last_for_more_dims():
    x, t = logits((4, 6, 11)), labels(24, 11).view(4, 6)
    ours = st.LabelSmoothingCrossEntropy(0.1)(x, t)
    expected = timm.loss.LabelSmoothingCrossEntropy(0.1)(x.reshape(-1, 11), t.reshape(-1))
    torch.testing.assert_close(ours, expected)


@pytest.mark.not_on_cuda  # an out-of-range label is a device-side assert on CUDA
def test_timm_losses_ignore_nothing():
    # timm has no ignore_index: a label of -100 is an error there and here, never a skipped row.
    x, t = logits((4, 5)), torch.tensor([0, 1, -100, 2])
    message = r"timm\.(LabelSmoothingCrossEntropy|SoftTargetCrossEntropy): target value -100 is out of bounds: " \
              r"expected class indices in \[0, 5\) \(timm's losses have no ignore_index\)$"
    with pytest.raises(IndexError, match=message):
        st.LabelSmoothingCrossEntropy(0.1)(x, t)
    mixed = smoothce.MixupTarget(t, t.flip(0), 0.7, 0.1, 5)
    with pytest.raises(IndexError, match=message):
        st.SoftTargetCrossEntropy()(x, mixed)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
def test_soft_target_cross_entropy_dense_matches_timm(dtypes):
    x_dtype, target_dtype = dtypes
    x = logits((32, 50), x_dtype)
    target = torch.softmax(logits((32, 50), seed=5), dim=-1).to(target_dtype)
    ours = loss_and_grad(st.SoftTargetCrossEntropy(), x, target)
    theirs = loss_and_grad(timm.loss.SoftTargetCrossEntropy(), x, target)
    assert_same(ours, theirs, torch.bfloat16 if torch.bfloat16 in dtypes else x_dtype)


def test_soft_target_cross_entropy_dense_more_dims_and_errors():
    x = logits((3, 4, 9))
    target = torch.softmax(logits((3, 4, 9), seed=3), dim=-1)
    torch.testing.assert_close(st.SoftTargetCrossEntropy()(x, target), timm.loss.SoftTargetCrossEntropy()(x, target))
    with pytest.raises(ValueError, match="logits' shape"):
        st.SoftTargetCrossEntropy()(x, target[:, :2])
    with pytest.raises(TypeError, match="dense floating target"):
        st.SoftTargetCrossEntropy()(x, labels(12, 9).view(3, 4))
    with pytest.raises(TypeError, match="MixupTarget"):
        st.LabelSmoothingCrossEntropy(0.1)(x[0], smoothce.MixupTarget(labels(4, 9), labels(4, 9), 0.5))
    with pytest.raises(ValueError, match=r"logits \(N, C\)"):
        st.SoftTargetCrossEntropy()(x, smoothce.MixupTarget(labels(3, 9), labels(3, 9), 0.5, 0.0, 9))
    with pytest.raises(ValueError, match="num_classes=10"):
        st.SoftTargetCrossEntropy()(x[0], smoothce.MixupTarget(labels(4, 9), labels(4, 9), 0.5, 0.0, 10))


def mix_both(mode, setting, label_smoothing=0.1, classes=10, n=8, seed=0, enabled=True):
    """timm's Mixup and ours on the same images and labels at the same numpy seed."""
    images = logits((n, 3, 12, 12), seed=seed + 7)
    target = labels(n, classes, seed=seed)
    results = []
    for cls in (timm.data.Mixup, st.Mixup):
        mixup = cls(mode=mode, label_smoothing=label_smoothing, num_classes=classes, **MIX_SETTINGS[setting])
        mixup.mixup_enabled = enabled
        np.random.seed(seed)
        results.append(mixup(images.clone(), target.clone()))
    return results


@pytest.mark.parametrize("setting", list(MIX_SETTINGS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mixup_matches_timm(mode, setting, label_smoothing):
    (timm_images, dense), (images, target) = mix_both(mode, setting, label_smoothing)
    assert torch.equal(images, timm_images)
    assert isinstance(target, smoothce.MixupTarget)
    assert (target.label_smoothing, target.num_classes, len(target)) == (label_smoothing, 10, 8)
    torch.testing.assert_close(target.dense(), dense, rtol=0, atol=0)
    x = logits((8, 10), seed=11)
    ours = loss_and_grad(st.SoftTargetCrossEntropy(), x, target)
    theirs = loss_and_grad(timm.loss.SoftTargetCrossEntropy(), x, dense)
    assert_same(ours, theirs, torch.float32)
    # smoothce.mixup_cross_entropy takes the same object.
    torch.testing.assert_close(smoothce.mixup_cross_entropy(x, target), theirs[0], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_mixup_loss_in_other_dtypes_matches_timm(mode, dtype):
    # timm's dense target is fp32: its loss on half logits is fp32, and so is ours. (On fp64 logits
    # its target's values are fp32 roundings of ε/C and lam, ours exact: they agree to fp32 rounding.)
    (_, dense), (_, target) = mix_both(mode, "switch")
    x = logits((8, 10), dtype, seed=12)
    ours = loss_and_grad(st.SoftTargetCrossEntropy(), x, target)
    theirs = loss_and_grad(timm.loss.SoftTargetCrossEntropy(), x, dense)
    assert_same(ours, theirs, torch.float32 if dtype == torch.float64 else torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
def test_mixup_disabled_is_the_smoothed_target(mode):
    # timm's train.py turns mixing off for the last epochs (mixup_fn.mixup_enabled = False).
    (timm_images, dense), (images, target) = mix_both(mode, "switch", enabled=False)
    assert torch.equal(images, timm_images)
    torch.testing.assert_close(target.dense(), dense, rtol=0, atol=0)
    x = logits((8, 10), seed=3)
    ours = loss_and_grad(st.SoftTargetCrossEntropy(), x, target)
    theirs = loss_and_grad(timm.loss.SoftTargetCrossEntropy(), x, dense)
    assert_same(ours, theirs, torch.float32)


def test_mixup_odd_batch_and_multi_label_are_timms():
    with pytest.raises(AssertionError, match="even"):
        st.Mixup(num_classes=10)(logits((3, 3, 4, 4)), labels(3, 10))
    # Multi-label mixup mixes dense targets: timm's own path, timm's dense result.
    images, dense_labels = logits((4, 3, 4, 4)), (logits((4, 10), seed=2) > 0).float()
    outputs = []
    for cls in (timm.data.Mixup, st.Mixup):
        np.random.seed(0)
        outputs.append(cls(num_classes=10, multi_label=True)(images.clone(), dense_labels))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


class TinyImages(torch.utils.data.Dataset):
    """uint8 images (numpy, as timm's transforms hand them to the fast collate) and int labels."""

    def __init__(self, n=8, classes=10):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
        self.labels = rng.integers(0, classes, size=n)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.mark.parametrize("mode", MODES + ["half"])
@pytest.mark.parametrize("setting", ["mixup", "cutmix", "switch"])
def test_fast_collate_mixup_matches_timm(mode, setting):
    dataset = TinyImages()
    batch = [dataset[i] for i in range(len(dataset))]
    outputs = []
    for cls in (timm.data.FastCollateMixup, st.FastCollateMixup):
        collate = cls(mode=mode, label_smoothing=0.1, num_classes=10, **MIX_SETTINGS[setting])
        np.random.seed(4)
        outputs.append(collate([(image.copy(), label) for image, label in batch]))
    (timm_images, dense), (images, target) = outputs
    assert torch.equal(images, timm_images)
    assert len(target) == len(images) == (4 if mode == "half" else 8)
    torch.testing.assert_close(target.dense(), dense, rtol=0, atol=0)
    x = logits((len(images), 10), seed=9)
    ours = loss_and_grad(st.SoftTargetCrossEntropy(), x, target)
    theirs = loss_and_grad(timm.loss.SoftTargetCrossEntropy(), x, dense)
    assert_same(ours, theirs, torch.float32)


def test_mixup_target_travels_through_a_data_loader_and_to():
    # timm's prefetching loader moves targets with .to(device=..., non_blocking=True).
    loader = DataLoader(TinyImages(), batch_size=4, collate_fn=st.FastCollateMixup(num_classes=10))
    images, target = next(iter(loader))
    moved = target.to(device="cpu", non_blocking=True)
    assert isinstance(moved, smoothce.MixupTarget) and moved.device == torch.device("cpu")
    assert moved.to(torch.float16).target_a.dtype == torch.int64  # a dtype does not turn labels into floats
    assert "MixupTarget(N=4" in repr(target)
    # DataLoader workers send batches pickled.
    copied = pickle.loads(pickle.dumps(target))
    assert torch.equal(copied.dense(), target.dense())
    with pytest.raises(ValueError, match="num_classes"):
        smoothce.MixupTarget(target.target_a, target.target_b, 0.5).dense()


def test_mixup_cross_entropy_with_a_mixup_target():
    x, a, b = logits((6, 7)), labels(6, 7), labels(6, 7, seed=2)
    lam = torch.rand(6, generator=torch.Generator().manual_seed(0))
    expected = smoothce.mixup_cross_entropy(x, a, b, lam, label_smoothing=0.2)
    target = smoothce.MixupTarget(a, b, lam, label_smoothing=0.2, num_classes=7)
    torch.testing.assert_close(smoothce.mixup_cross_entropy(x, target), expected)
    torch.testing.assert_close(smoothce.mixup_cross_entropy(x, target, label_smoothing=0.2), expected)
    with pytest.raises(ValueError, match="disagrees"):
        smoothce.mixup_cross_entropy(x, target, label_smoothing=0.1)
    with pytest.raises(TypeError, match="do not pass them too"):
        smoothce.mixup_cross_entropy(x, target, b, lam)
    with pytest.raises(TypeError, match="target_b and lam are required"):
        smoothce.mixup_cross_entropy(x, a)


def train(model, steps, mixup, loss_fn, seed, images, targets):
    """A few SGD steps of timm's recipe (mixup → model → loss → step); returns the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    np.random.seed(seed)
    losses = []
    for step in range(steps):
        x, y = mixup(images[step].clone(), targets[step].clone())
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_tiny_timm_model_trains_the_same(mode):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(1)
    images, targets = torch.randn(3, 8, 3, 32, 32, generator=g), torch.randint(0, 10, (3, 8), generator=g)
    settings = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1, num_classes=10)
    runs = []
    for mixup_cls, loss_cls in ((timm.data.Mixup, timm.loss.SoftTargetCrossEntropy),
                                (st.Mixup, st.SoftTargetCrossEntropy)):
        trained = copy.deepcopy(model)
        runs.append((train(trained, 3, mixup_cls(**settings), loss_cls(), 0, images, targets), trained))
    (timm_losses, timm_model), (losses, ours) = runs
    torch.testing.assert_close(losses, timm_losses, rtol=1e-5, atol=1e-6)
    for (name, p_timm), (_, p_ours) in zip(timm_model.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours, p_timm, rtol=1e-4, atol=1e-5, msg=name)


def test_binary_cross_entropy_gets_a_clear_error_or_the_dense_target():
    # timm's BinaryCrossEntropy needs the dense target: handed a MixupTarget it fails with a message
    # that names the way out; with target.dense() it gives timm's own result.
    (_, dense), (_, target) = mix_both("elem", "switch")
    x = logits((8, 10), seed=5)
    bce = timm.loss.BinaryCrossEntropy(smoothing=0.0)
    with pytest.raises(AttributeError, match=r"target\.dense\(\)"):
        bce(x, target)
    torch.testing.assert_close(bce(x, target.dense()), bce(x, dense))
