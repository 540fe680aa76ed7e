"""Teacher architectures and train-or-load cache on a tiny synthetic VisionData (seconds, not minutes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from metadistill.data.vision import VisionData
from metadistill.identity import tensor_fingerprint
from metadistill.teacher import (
    CHECKPOINT_FILE,
    LOGITS_FILE,
    META_FILE,
    augment_batch,
    crop_padding,
    get_teacher,
    load_teacher_model,
    lr_at_epoch,
)
from metadistill.teacher_models import TEACHERS

SETTINGS = dict(epochs=2, lr=1e-3, batch_size=16, seed=0, progress=False)


def tiny_data(name: str = "tiny", seed: int = 0) -> VisionData:
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)

    return VisionData(name, *split(64), *split(16), *split(32))


def replaced(data: VisionData, **changes: Callable[[torch.Tensor], torch.Tensor]) -> VisionData:
    """A copy of data with the named tensors transformed (on clones, so `data` stays as it was)."""
    return dataclasses.replace(data, **{name: change(getattr(data, name).clone()) for name, change in changes.items()})


def set_element(t: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    t[index] = value
    return t


@pytest.fixture(scope="module")
def data() -> VisionData:
    return tiny_data()


@pytest.fixture(scope="module")
def first(data: VisionData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    cache = tmp_path_factory.mktemp("teachers")
    return cache, get_teacher(data, "cnn-small", cache, **SETTINGS)


def test_train_logits_are_the_eval_logits_of_the_checkpoint_in_sample_order(data, first):
    _, result = first
    assert result.trained and result.arch == "cnn-small" and result.seconds > 0
    assert result.train_logits.dtype == torch.float32 and result.train_logits.shape == (64, 10)
    assert 0.0 <= result.test_acc <= 1.0
    assert {CHECKPOINT_FILE, LOGITS_FILE, META_FILE} <= {p.name for p in result.path.iterdir()}
    model = TEACHERS["cnn-small"](1)
    model.load_state_dict(torch.load(result.path / CHECKPOINT_FILE, weights_only=True))
    with torch.no_grad():
        expected = model.eval()(data.x_train)
    torch.testing.assert_close(result.train_logits, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the loader gives the same network
        torch.testing.assert_close(load_teacher_model(result.path)(data.x_train), expected, atol=1e-5, rtol=1e-5)


def test_second_call_loads_the_cache(data, first):
    cache, result = first
    again = get_teacher(data, "cnn-small", cache, **SETTINGS)
    assert not again.trained
    assert again.path == result.path and again.test_acc == result.test_acc and again.seconds == result.seconds
    assert torch.equal(again.train_logits, result.train_logits)


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(TEACHERS, "linear", lambda channels: nn.Sequential(nn.Flatten(), nn.Linear(channels * 784, 10)))
    return "linear"


@pytest.mark.parametrize("change", [
    dict(epochs=3), dict(lr=2e-3), dict(batch_size=8), dict(seed=1), dict(augment=False), dict(arch="linear"),
    dict(data=lambda d: dataclasses.replace(d, name="other")),
    dict(data=lambda d: replaced(d, x_train=lambda x: set_element(x, (5, 0, 3, 7), 0.125))),
    dict(data=lambda d: replaced(d, x_train=lambda x: x[torch.tensor([1, 0, *range(2, 64)])])),  # reordered
    dict(data=lambda d: replaced(d, y_train=lambda y: set_element(y, (0,), (int(y[0]) + 1) % 10))),
    dict(data=lambda d: replaced(d, x_train=lambda x: x[:60], y_train=lambda y: y[:60])),
    dict(data=lambda d: replaced(d, x_test=lambda x: x * 2)),  # the recorded test accuracy would be stale
], ids=lambda change: "-".join(change))
def test_any_change_of_setup_gets_its_own_entry_and_retrains(data, first, tiny_arch, change):
    cache, result = first
    settings = {**SETTINGS, "arch": "cnn-small", "data": data}
    for name, value in change.items():
        settings[name] = value(data) if name == "data" else value
    changed = get_teacher(settings.pop("data"), settings.pop("arch"), cache, **settings)
    assert changed.trained and changed.path != result.path and changed.path.parent == cache


@pytest.mark.parametrize("damage", [
    lambda path: (path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint"),
    lambda path: (path / LOGITS_FILE).write_bytes((path / LOGITS_FILE).read_bytes()[:100]),
    lambda path: (path / META_FILE).write_text("{ half"),
    lambda path: torch.save(torch.zeros(3, 10), path / LOGITS_FILE),
], ids=["checkpoint", "truncated-logits", "meta", "wrong-logits-shape"])
def test_corrupt_cache_is_retrained(data, tmp_path, damage):
    result = get_teacher(data, "cnn-small", tmp_path, **SETTINGS)
    damage(result.path)
    with pytest.warns(UserWarning, match="unusable"):
        retrained = get_teacher(data, "cnn-small", tmp_path, **SETTINGS)
    assert retrained.trained and retrained.path == result.path
    torch.testing.assert_close(retrained.train_logits, result.train_logits)  # seeded: the same teacher again
    assert not get_teacher(data, "cnn-small", tmp_path, **SETTINGS).trained  # and the repaired entry is used


def test_entry_without_meta_is_incomplete_and_retrained_silently(data, tmp_path):
    result = get_teacher(data, "cnn-small", tmp_path, **SETTINGS)
    (result.path / META_FILE).unlink()
    assert get_teacher(data, "cnn-small", tmp_path, **SETTINGS).trained


def test_training_sees_only_the_training_split(data, tmp_path):
    """Other validation and test images change the entry (recorded accuracy) but not the teacher itself."""
    result = get_teacher(data, "cnn-small", tmp_path, **SETTINGS)
    other = replaced(data, x_val=torch.randn_like, x_test=torch.randn_like)
    again = get_teacher(other, "cnn-small", tmp_path, **SETTINGS)
    assert again.trained and again.path != result.path
    torch.testing.assert_close(again.train_logits, result.train_logits)


def test_training_leaves_the_global_rng_alone(data, tmp_path):
    state = torch.get_rng_state()
    get_teacher(data, "cnn-small", tmp_path, **SETTINGS)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments_are_rejected(data, tmp_path):
    with pytest.raises(ValueError, match="unknown teacher"):
        get_teacher(data, "resnet1000", tmp_path, **SETTINGS)
    with pytest.raises(ValueError, match="epochs"):
        get_teacher(data, "cnn-small", tmp_path, **{**SETTINGS, "epochs": 0})


@pytest.mark.parametrize("size", [28, 32])
def test_augmentation_crops_and_flips_each_sample_and_is_seeded(size):
    x = torch.randn(8, 3, size, size)
    pad, fill = crop_padding(size), torch.tensor([-1.0, -2.0, -3.0])
    assert pad == {28: 2, 32: 4}[size]

    def augmented(seed: int) -> torch.Tensor:
        return augment_batch(x, pad, fill, torch.Generator().manual_seed(seed))

    out = augmented(0)
    assert out.shape == x.shape
    assert torch.equal(out, augmented(0)) and not torch.equal(out, augmented(1))
    # Each output is one of the (2 pad + 1)^2 crops of its padded image, flipped or not.
    padded = fill.view(1, 3, 1, 1).repeat(8, 1, size + 2 * pad, size + 2 * pad)
    padded[:, :, pad:-pad, pad:-pad] = x
    for image, sample in zip(padded, out):
        crops = [crop.flip(-1) if flip else crop for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 for crop in [image[:, dy:dy + size, dx:dx + size]] for flip in (False, True)]
        assert any(torch.equal(sample, crop) for crop in crops)


def test_lr_schedule_is_the_papers_step():
    lrs = [lr_at_epoch(epoch, 100, 1e-3) for epoch in range(100)]
    assert lrs == [1e-3] * 50 + [pytest.approx(1e-4)] * 50
    assert [lr_at_epoch(epoch, 15, 1e-3) for epoch in range(15)].count(1e-3) == 8


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "cifar10-reduced"])
@pytest.mark.parametrize("quick", [False, True])
def test_every_image_preset_names_a_known_teacher(dataset, quick):
    from metadistill.config import build_config

    config = build_config(dataset, quick=quick)
    assert config.teacher_arch in TEACHERS and config.teacher_epochs >= 1


def preact_resnet18_parameters(in_channels: int) -> int:
    """Closed form: stem; per stage two blocks of BN, 3x3 conv, BN, 3x3 conv (+ a 1x1 projection where the width
    changes); final BN; fc. A BatchNorm has 2 parameters per channel; the convs have no bias."""
    total, width = in_channels * 64 * 9, 64
    for out in (64, 128, 256, 512):
        projection = width * out if out != width else 0
        total += 2 * width + width * out * 9 + 2 * out + out * out * 9 + projection  # first block
        total += 2 * (2 * out + out * out * 9)  # second block
        width = out
    return total + 2 * 512 + 512 * 10 + 10


@pytest.mark.parametrize("in_channels", [1, 3])
def test_preact_resnet18_builds_for_both_datasets(in_channels):
    model = TEACHERS["preact-resnet18"](in_channels).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == preact_resnet18_parameters(in_channels)
    assert 11.1e6 < count < 11.2e6  # the well-known "11.2M" (11,173,962 for the plain ResNet18 on CIFAR)
    for size in (28, 32):
        with torch.no_grad():
            assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_cnn_small_builds_for_both_image_sizes(in_channels):
    model = TEACHERS["cnn-small"](in_channels).eval()
    for size in (28, 32):
        with torch.no_grad():
            assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


def test_fingerprint_covers_large_tensors_exactly():
    """Past 2**24 elements a float32 index grid would round past the end; the checksum is exact there too."""
    x = torch.zeros(2**24 + 4097)
    before = tensor_fingerprint(x)
    x[-1] = 1.0
    assert tensor_fingerprint(x)["checksum"] != before["checksum"]
    assert before["shape"] == [2**24 + 4097]


def test_synthetic_teachers_descent_is_autograd_and_sgd_to_the_bit():
    """The synthetic task's teacher skips autograd for speed; its steps must stay those of backward() + SGD."""
    from metadistill.data.synthetic import SPLITS, TEACHER_FEATURES, _descend, sample

    generator = torch.Generator().manual_seed(3)
    x, y = sample(SPLITS["teacher"], generator)
    x = x[:, TEACHER_FEATURES]
    torch.manual_seed(3)
    reference = nn.Linear(len(TEACHER_FEATURES), 2)
    weight, bias = reference.weight.detach().clone(), reference.bias.detach().clone()
    start = weight.clone()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    _descend(x, y, weight, bias, 300, 0.05)
    assert not torch.equal(weight, start)  # it moved
    assert torch.equal(weight, reference.weight.detach()) and torch.equal(bias, reference.bias.detach())
