"""smoothce.integrations.transformers against transformers' own code: LabelSmoother against
``transformers.trainer_pt_utils.LabelSmoother``, ForCausalLMLoss / ForMaskedLMLoss against
``transformers.loss.loss_utils``'s, patch_model / patch_trainer on a tiny Llama trained by a real
``transformers.Trainer``, and the memory one training step saves.

Accuracy rules of this file:
- float32: smoothce's value and logits gradient equal transformers' to fp32 rounding (VALUE_TOL:
  rtol 1e-5, atol 1e-6; gradients: rtol GRAD_RTOL = 1e-5 and 1e-6 x the largest element);
- float64: LabelSmoother's value and gradient equal a float64 restatement of transformers' formula
  (label_smoother_truth) to 1e-12; transformers' own value and gradient equal it to fp32 tolerance
  (it sums the smoothing term, and so scales its gradient, in fp32);
- bfloat16: transformers' LabelSmoother computes -log_softmax and the nll in bf16, so both are judged
  against the float64 truth on the same bf16 logits: smoothce's error may be no larger than
  transformers' plus a floor (1e-5 x |truth| for the fp32 value, one bf16 ulp of the largest gradient
  element for the gradient). The model losses upcast the logits to fp32 before F.cross_entropy, so
  their values agree to fp32 rounding and their bf16 gradients to a bf16 ulp.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("CI"):
    import transformers  # in CI a missing library is a failure, not a skip
else:
    transformers = pytest.importorskip("transformers")

from transformers.loss import loss_utils  # noqa: E402
from transformers.trainer_pt_utils import LabelSmoother as TransformersLabelSmoother  # noqa: E402

import smoothce  # noqa: E402
from smoothce.integrations import transformers as st  # noqa: E402
from conftest import ERRORS, dtype_id, load_harness, make_logits  # noqa: E402

B, T, V = 3, 9, 37
VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-5
BF16_ULP = torch.finfo(torch.bfloat16).eps  # 2^-7: one ulp, relative, at the bottom of a binade


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------ helpers

def make_labels(shape=(B, T), C=V, ignore_index=-100, seed=1):
    """Random classes; row b has its first b + 1 labels ignored (so the rows count differently) and
    about one in five of the others."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.2] = ignore_index
    for b in range(shape[0]):
        labels[b, : b + 1] = ignore_index
    return labels


def loss_and_grad(fn, logits, *args, **kwargs):
    """(loss, d loss / d logits) of fn on a fresh leaf holding logits."""
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, *args, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def label_smoother_truth(logits, labels, epsilon, ignore_index, shift_labels, num_items_in_batch):
    """transformers' LabelSmoother formula in float64: (1 - ε) Σ nll / D + ε Σ_c(-log p) / (D C) over the
    labels that are not ignore_index, D = num_items_in_batch or their count."""
    x = logits
    if shift_labels:
        x, labels = x[..., :-1, :], labels[..., 1:]
    neg_log_p = -torch.log_softmax(x, dim=-1)
    keep = labels != ignore_index
    nll = neg_log_p.gather(-1, labels.where(keep, 0).unsqueeze(-1)).squeeze(-1)
    denominator = keep.sum() if num_items_in_batch is None else num_items_in_batch
    nll = nll.where(keep, 0).sum() / denominator
    smooth = neg_log_p.sum(-1).where(keep, 0).sum() / (denominator * x.shape[-1])
    return (1 - epsilon) * nll + epsilon * smooth


def assert_grad_close(actual, expected, rtol=GRAD_RTOL, floor=1e-6, what="logits grad"):
    """|actual - expected| <= rtol |expected| + floor x max|expected| elementwise."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() or 1.0
    err = (a - e).abs()
    allowed = rtol * e.abs() + floor * scale
    assert (err <= allowed).all(), f"{what}: max error {err.max().item():.3e} (scale {scale:.3e})"


def max_error(value, truth):
    return (value.double() - truth.double()).abs().max().item()


# ------------------------------------------------------------------------------------ LabelSmoother

# How the model output and the ignored labels look: (model_output kind, ignore_index); 7 is a class index.
FORMS = [("dict", -100), ("tuple", -100), ("dict", -1), ("tuple", 7)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f[0]}-ignore{f[1]}")
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("num_items", [None, "int", "tensor"], ids=lambda n: f"items-{n}")
@pytest.mark.parametrize("shift_labels", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_label_smoother_matches_transformers(dtype, shift_labels, num_items, epsilon, form):
    output_kind, ignore_index = form
    logits = make_logits((B, T, V), dtype, seed=T + V)
    labels = make_labels(ignore_index=ignore_index)
    counted = (labels[..., 1:] if shift_labels else labels).ne(ignore_index).sum().item()
    # The Trainer's count over all gradient-accumulation micro-batches: more than this batch's.
    num_items_in_batch = {None: None, "int": counted + 5, "tensor": torch.tensor(counted + 5)}[num_items]

    def call(smoother):
        def fn(x):
            output = {"logits": x} if output_kind == "dict" else (x, "other outputs")
            return smoother(output, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        return fn

    mine = loss_and_grad(call(st.LabelSmoother(epsilon=epsilon, ignore_index=ignore_index)), logits)
    theirs = loss_and_grad(call(TransformersLabelSmoother(epsilon=epsilon, ignore_index=ignore_index)), logits)
    truth_num_items = torch.tensor(counted + 5, dtype=torch.float64) if num_items else None
    truth = loss_and_grad(lambda x: label_smoother_truth(x, labels, epsilon, ignore_index, shift_labels,
                                                         truth_num_items), logits.double())

    assert mine[0].dtype == theirs[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert mine[0].shape == ()
    assert mine[1].dtype == dtype
    if shift_labels:  # the last position predicts nothing
        assert (mine[1][:, -1] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(mine[0], theirs[0], **VALUE_TOL)
        assert_grad_close(mine[1], theirs[1])
    elif dtype == torch.float64:
        torch.testing.assert_close(mine[0], truth[0], rtol=1e-12, atol=1e-12)
        assert_grad_close(mine[1], truth[1], rtol=1e-12, floor=1e-12)
        # the truth is transformers' formula (to fp32 rounding: it sums the smoothing term in fp32)
        torch.testing.assert_close(theirs[0], truth[0], **VALUE_TOL)
        assert_grad_close(theirs[1], truth[1])
    else:
        value_floor = 1e-5 * truth[0].abs().item()
        assert max_error(mine[0], truth[0]) <= max_error(theirs[0], truth[0]) + value_floor, (
            mine[0].item(), theirs[0].item(), truth[0].item())
        grad_floor = BF16_ULP * truth[1].abs().max().item()
        assert max_error(mine[1], truth[1]) <= max_error(theirs[1], truth[1]) + grad_floor, (
            max_error(mine[1], truth[1]), max_error(theirs[1], truth[1]))


def test_label_smoother_labels_with_a_trailing_unit_dim():
    """transformers' LabelSmoother also takes labels (..., 1)."""
    logits = make_logits((B * T, V), torch.float32, seed=5)
    labels = make_labels().reshape(-1, 1)
    mine = loss_and_grad(lambda x: st.LabelSmoother(0.1)({"logits": x}, labels), logits)
    theirs = loss_and_grad(lambda x: TransformersLabelSmoother(0.1)({"logits": x}, labels), logits)
    torch.testing.assert_close(mine[0], theirs[0], **VALUE_TOL)
    assert_grad_close(mine[1], theirs[1])


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_label_smoother_all_labels_ignored(num_items_in_batch):
    """A micro-batch without a label: NaN (0 / 0) as transformers' without a count, 0 and a zero gradient
    with the count of the whole accumulated batch."""
    logits = make_logits((2, 5, V), torch.float32, seed=6)
    labels = torch.full((2, 5), -100)

    def call(smoother):
        return lambda x: smoother({"logits": x}, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)

    mine = loss_and_grad(call(st.LabelSmoother(0.1)), logits)
    theirs = loss_and_grad(call(TransformersLabelSmoother(0.1)), logits)
    torch.testing.assert_close(mine[0], theirs[0], equal_nan=True)
    if num_items_in_batch is not None:
        assert mine[0].item() == 0.0
        assert (mine[1] == 0).all() and (theirs[1] == 0).all()


# ----------------------------------------------------------------- ForCausalLMLoss / ForMaskedLMLoss

LOSSES = ["ForCausalLMLoss", "ForMaskedLMLoss"]


def model_loss_args(which, ignore_index, give_shift_labels, num_items):
    """(labels, keyword arguments) as a model's forward passes them to its loss function."""
    labels = make_labels(ignore_index=ignore_index)
    kwargs = dict(vocab_size=V, ignore_index=ignore_index)
    targets = labels
    if which == "ForCausalLMLoss":
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if give_shift_labels:
            # a padding-free collator's shift_labels: not the labels shifted (so ignoring them shows)
            kwargs["shift_labels"] = make_labels(ignore_index=ignore_index, seed=9).flip(1)
            targets = kwargs["shift_labels"]
    counted = targets.ne(ignore_index).sum().item()
    kwargs["num_items_in_batch"] = {None: None, "int": counted + 3, "tensor": torch.tensor(counted + 3)}[num_items]
    return labels, kwargs


@pytest.mark.parametrize("num_items", [None, "int", "tensor"], ids=lambda n: f"items-{n}")
@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("which, give_shift_labels", [("ForCausalLMLoss", False), ("ForCausalLMLoss", True),
                                                      ("ForMaskedLMLoss", False)],
                         ids=["causal", "causal-shift_labels", "masked"])
def test_model_loss_matches_transformers(which, dtype, give_shift_labels, ignore_index, num_items):
    logits = make_logits((B, T, V), dtype, seed=B + V)
    labels, kwargs = model_loss_args(which, ignore_index, give_shift_labels, num_items)
    mine = loss_and_grad(lambda x: getattr(st, which)(x, labels, label_smoothing=0.0, **kwargs), logits)
    theirs = loss_and_grad(lambda x: getattr(loss_utils, which)(x, labels, **kwargs), logits)
    assert mine[0].dtype == theirs[0].dtype == torch.float32
    torch.testing.assert_close(mine[0], theirs[0], **VALUE_TOL)
    if dtype == torch.float32:
        assert_grad_close(mine[1], theirs[1])
    else:  # transformers' gradient: fp32, rounded to bf16 once
        assert_grad_close(mine[1], theirs[1], rtol=BF16_ULP, floor=1e-3 * BF16_ULP)


@pytest.mark.parametrize("num_items_in_batch", [None, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("which", LOSSES)
def test_model_loss_label_smoothing_is_torchs(which, dtype, num_items_in_batch):
    """label_smoothing=ε: F.cross_entropy(label_smoothing=ε) on the (shifted) flattened fp32 logits, summed
    and divided by num_items_in_batch when given."""
    eps, ignore_index = 0.1, -100
    logits = make_logits((B, T, V), dtype, seed=7)
    labels = make_labels(ignore_index=ignore_index)
    targets = labels[..., 1:] if which == "ForCausalLMLoss" else labels

    def expected(x):
        rows = (x[:, :-1] if which == "ForCausalLMLoss" else x).float().reshape(-1, V)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(rows, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps)
        return loss if num_items_in_batch is None else loss / num_items_in_batch

    mine = loss_and_grad(lambda x: getattr(st, which)(x, labels, vocab_size=V, ignore_index=ignore_index,
                                                      num_items_in_batch=num_items_in_batch,
                                                      label_smoothing=eps), logits)
    theirs = loss_and_grad(expected, logits)
    torch.testing.assert_close(mine[0], theirs[0], **VALUE_TOL)
    if dtype == torch.float32:
        assert_grad_close(mine[1], theirs[1])
    else:
        assert_grad_close(mine[1], theirs[1], rtol=BF16_ULP, floor=1e-3 * BF16_ULP)
    # and it does smooth: transformers' own takes label_smoothing in **kwargs and ignores it
    plain = getattr(loss_utils, which)(logits, labels, vocab_size=V, num_items_in_batch=num_items_in_batch)
    assert (mine[0] - plain).abs() > 1e-3


@pytest.mark.parametrize("which", LOSSES)
def test_model_loss_vocab_size_mismatch(which):
    logits = make_logits((B, T, V), torch.float32)
    with pytest.raises(ValueError, match="vocab_size"):
        getattr(st, which)(logits, make_labels(), vocab_size=V + 1)


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.not_on_cuda  # an out-of-range label is a device-side assert on CUDA
@pytest.mark.parametrize("bad", [V, V + 1000, -5], ids=["V", "far", "negative"])
@pytest.mark.parametrize("which", ["LabelSmoother", "LabelSmoother-shift", *LOSSES])
def test_label_out_of_range_raises(which, bad):
    """Not a number: transformers' LabelSmoother would take a negative label as class 0 (it clamps)."""
    logits = make_logits((B, T, V), torch.float32).requires_grad_(True)
    labels = make_labels()
    labels[1, 4] = bad
    with pytest.raises(ERRORS):
        if which.startswith("LabelSmoother"):
            loss = st.LabelSmoother(0.1)({"logits": logits}, labels, shift_labels=which.endswith("shift"))
        else:
            loss = getattr(st, which)(logits, labels, vocab_size=V, label_smoothing=0.1)
        loss.backward()
        pytest.fail(f"returned {loss.item()} for label {bad}")


# ------------------------------------------------------------------------------ patch_model / Trainer

def tiny_llama(vocab_size=512, hidden_size=32, seed=0):
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def token_rows(n=24, length=16, vocab_size=512, seed=0):
    """{"input_ids", "labels"} rows; row i has its first (3 i) mod 11 labels ignored."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, vocab_size, (length,), generator=g)
        labels = ids.clone()
        labels[: (3 * i) % 11] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def make_trainer(tmp_path, model, *, epsilon=0.0, ga=1, bf16=False, **trainer_kwargs):
    # SGD rather than the default AdamW: its update is linear in the gradient, so the final parameters
    # tell a wrong gradient scale apart (AdamW's is scale-free), and fp32 rounding in a near-zero
    # gradient does not become an O(learning rate) difference (g / (sqrt(v) + 1e-8)).
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=ga, max_steps=3,
        label_smoothing_factor=epsilon, report_to=[], logging_steps=1, use_cpu=True, seed=0,
        save_strategy="no", learning_rate=0.5, optim="sgd", disable_tqdm=True, dataloader_num_workers=0, bf16=bf16)
    return transformers.Trainer(model=model, args=args, train_dataset=token_rows(), **trainer_kwargs)


def train(tmp_path, epsilon, ga, patch, **args):
    """Three steps, then an evaluation; the logged (loss, grad_norm) per step include the eval loss."""
    model = tiny_llama()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, model, epsilon=epsilon, ga=ga, **args)
    changed = st.patch_trainer(trainer) if patch else None
    trainer.train()
    steps = [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    steps.append((trainer.evaluate(eval_dataset=token_rows(8, seed=3))["eval_loss"], 0.0))
    return trainer, changed, steps, initial, [p.detach() for p in model.parameters()]


def test_patch_model():
    model = tiny_llama()
    assert model.loss_function is loss_utils.ForCausalLMLoss
    ids = torch.tensor([row["input_ids"].tolist() for row in token_rows(4)])
    labels = torch.stack([row["labels"] for row in token_rows(4)])
    expected = model(input_ids=ids, labels=labels).loss
    assert st.patch_model(model) == {"loss_function": (loss_utils.ForCausalLMLoss, st.ForCausalLMLoss)}
    assert model.loss_function is st.ForCausalLMLoss
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, expected, **VALUE_TOL)
    assert st.patch_model(model) == {}  # already patched
    classifier = transformers.LlamaForSequenceClassification(model.config)
    before = classifier.loss_function
    assert st.patch_model(classifier) == {}  # not a loss this module serves
    assert classifier.loss_function is before
    # BertForMaskedLM's forward builds its own CrossEntropyLoss: patching its loss_function would
    # change nothing, so it is not reported as changed.
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    assert st.patch_model(bert) == {}
    assert bert.loss_function is loss_utils.ForMaskedLMLoss


@pytest.mark.parametrize("ga", [1, 2], ids=lambda g: f"ga{g}")
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_patch_trainer_trains_as_transformers(tmp_path, epsilon, ga):
    """Same logged losses and gradient norms per step, same final parameters, patched or not."""
    _, _, steps, initial, expected = train(tmp_path / "plain", epsilon, ga, patch=False)
    trainer, changed, patched_steps, _, actual = train(tmp_path / "patched", epsilon, ga, patch=True)

    assert set(changed) == ({"label_smoother", "model.loss_function"} if epsilon else {"model.loss_function"})
    if epsilon:
        assert isinstance(trainer.label_smoother, st.LabelSmoother)
        assert (trainer.label_smoother.epsilon, trainer.label_smoother.ignore_index) == (epsilon, -100)
        assert changed["label_smoother"][1] is trainer.label_smoother
        assert type(changed["label_smoother"][0]) is TransformersLabelSmoother
    else:
        assert trainer.label_smoother is None
    assert trainer.model.loss_function is st.ForCausalLMLoss
    assert changed["model.loss_function"] == (loss_utils.ForCausalLMLoss, st.ForCausalLMLoss)

    torch.testing.assert_close(torch.tensor(patched_steps), torch.tensor(steps), **VALUE_TOL)
    # the parameters did move (the comparison below is not vacuous), and to the same place
    assert max((p - p0).abs().max().item() for p, p0 in zip(expected, initial)) > 1e-2
    for p, q in zip(actual, expected):
        torch.testing.assert_close(p, q)


def test_patch_trainer_twice_and_with_compute_loss_func(tmp_path):
    trainer = make_trainer(tmp_path / "twice", tiny_llama(), epsilon=0.1)
    first = st.patch_trainer(trainer)
    smoother, loss_function = trainer.label_smoother, trainer.model.loss_function
    assert set(first) == {"label_smoother", "model.loss_function"}
    assert st.patch_trainer(trainer) == {}
    assert trainer.label_smoother is smoother and trainer.model.loss_function is loss_function

    calls = []

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        return loss_utils.ForCausalLMLoss(outputs.logits, labels, vocab_size=512,
                                          num_items_in_batch=num_items_in_batch)

    trainer = make_trainer(tmp_path / "custom", tiny_llama(), epsilon=0.1, compute_loss_func=compute_loss_func)
    st.patch_trainer(trainer)
    assert trainer.compute_loss_func is compute_loss_func
    batch = trainer.data_collator(token_rows(4))
    expected = loss_utils.ForCausalLMLoss(trainer.model(input_ids=batch["input_ids"]).logits, batch["labels"],
                                          vocab_size=512, num_items_in_batch=17)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=17)
    assert calls == [17]
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------------------------- memory

@pytest.mark.cpu_only  # the CPU kernels' own allocations
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_patched_training_step_peak_memory(tmp_path, epsilon):
    """One Trainer.training_step (forward, loss, backward) where the logits dominate (V = 8192, 4 × 64
    tokens, hidden 32): the patched Trainer's peak of CPU allocations is below the unpatched one's."""
    harness = load_harness()
    if harness.cpu_peak_extra_bytes(lambda: torch.empty(1 << 18).fill_(1)) is None:
        pytest.skip(f"torch {torch.__version__}: the profiler's private event API moved")
    vocab_size = 8192
    rows = token_rows(4, length=64, vocab_size=vocab_size)
    peaks = {}
    for patched in (False, True):
        model = tiny_llama(vocab_size=vocab_size)
        trainer = make_trainer(tmp_path / str(patched), model, epsilon=epsilon)
        if patched:
            assert st.patch_trainer(trainer)
        batch = trainer.data_collator(rows)
        num_items = batch["labels"][..., 1:].ne(-100).sum()
        model.train()

        def step():
            trainer.training_step(model, dict(batch), num_items_in_batch=num_items)

        step()  # warm-up: lazy initialisations, the parameters' gradients
        model.zero_grad(set_to_none=True)  # both measured steps allocate the gradients
        smoothce.empty_cache()
        peaks[patched] = harness.cpu_peak_extra_bytes(step)
    logits_bytes = 4 * 64 * vocab_size * 4
    print(f"\ntraining step peak, ε={epsilon}: unpatched {peaks[False]} B, patched {peaks[True]} B "
          f"(fp32 logits {logits_bytes} B; saved {(peaks[False] - peaks[True]) / logits_bytes:.2f} logits)")
    assert peaks[False] >= 2 * logits_bytes  # it did hold the logits and more (the measurement sees them)
    assert peaks[True] < peaks[False], peaks
    # by a whole copy of the logits at least (not a few bytes: sliced shifted logits cost as much as
    # transformers' copies, a peak 2 KB below the unpatched one)
    assert peaks[False] - peaks[True] >= 0.9 * logits_bytes, peaks


@pytest.mark.slow  # torch.compile
def test_compiled_losses_match_transformers():
    """torch.compile(fullgraph=True) traces the patched losses in one graph (a model compiled by the
    Trainer's torch_compile=True calls them inside it), with num_items_in_batch a tensor."""
    logits = make_logits((B, T, V), torch.float32)
    labels, n = make_labels(), torch.tensor(17)
    cases = [
        (lambda x: st.ForCausalLMLoss(x, labels, V, num_items_in_batch=n),
         lambda x: loss_utils.ForCausalLMLoss(x, labels, V, num_items_in_batch=n)),
        (lambda x: st.LabelSmoother(0.1)({"logits": x}, labels, shift_labels=True, num_items_in_batch=n),
         lambda x: TransformersLabelSmoother(0.1)({"logits": x}, labels, shift_labels=True, num_items_in_batch=n)),
    ]
    for ours, theirs in cases:
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True)
        got, expected = loss_and_grad(compiled, logits), loss_and_grad(theirs, logits)
        torch.testing.assert_close(got[0], expected[0], **VALUE_TOL)
        torch.testing.assert_close(got[1], expected[1], rtol=GRAD_RTOL, atol=GRAD_RTOL * expected[1].abs().max())


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_patch_trainer_under_bf16_autocast(tmp_path, epsilon):
    """TrainingArguments(bf16=True): the model runs under CPU autocast and its logits are bf16; the patched
    Trainer's losses (fp32, read from the bf16 logits) agree with the unpatched one's to bf16 rounding."""
    _, _, steps, _, expected = train(tmp_path / "plain", epsilon, 2, patch=False, bf16=True)
    _, _, patched_steps, _, actual = train(tmp_path / "patched", epsilon, 2, patch=True, bf16=True)
    torch.testing.assert_close(torch.tensor(patched_steps), torch.tensor(steps), rtol=1e-3, atol=1e-3)
    for p, q in zip(actual, expected):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
