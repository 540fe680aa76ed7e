"""Teacher train-or-load: train a teacher on VisionData.x_train once, cache checkpoint, train logits and accuracy."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data.vision import VisionData
from .files import write_atomic
from .identity import tensor_fingerprint
from .teacher_models import TEACHERS

# Bump whenever a change to the training code (loop, schedule, augmentation, architectures) changes the teacher
# it produces: the version is part of the cache key, so old cache entries are then no longer reused.
TEACHER_CACHE_VERSION = 1

LR_DECAY_FACTOR = 0.1  # the paper's step: lr for the first half of the epochs, lr / 10 for the second half
EVAL_BATCH_SIZE = 1000

CHECKPOINT_FILE = "checkpoint.pt"
LOGITS_FILE = "train_logits.pt"
META_FILE = "meta.json"


@dataclass
class TeacherResult:
    """A trained teacher: logits on data.x_train (row i = sample i, eval mode, no augmentation) and test accuracy."""

    train_logits: Tensor
    test_acc: float
    arch: str
    path: Path  # this teacher's cache directory
    trained: bool  # True: trained by this call; False: loaded from the cache
    seconds: float  # training time (of the original training when loaded)


def lr_at_epoch(epoch: int, epochs: int, lr: float) -> float:
    """The step schedule: `lr` for the first ceil(epochs / 2) epochs, then lr * LR_DECAY_FACTOR."""
    return lr if epoch < math.ceil(epochs / 2) else lr * LR_DECAY_FACTOR


def crop_padding(image_size: int) -> int:
    """Random-crop padding: the usual 2 pixels for 28x28 images and 4 for 32x32; otherwise 1/8 of the side."""
    return {28: 2, 32: 4}.get(image_size, max(1, image_size // 8))


def augment_batch(x: Tensor, pad: int, fill: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random crop (zero-shift to +-pad pixels, padded with `fill`) and random horizontal flip, per sample.

    x: B x C x H x W; fill: C values (the per-channel minimum of the training images, i.e. normalised black, which
    is what padding the raw images with zeros before normalising gives). One gather for the whole batch: each
    sample's row and column indices into the padded batch carry its offset, and a flip reverses its columns.
    The result is B x C x H x W in channels-last memory layout. Random draws come from `generator` (on x's device).
    """
    batch, channels, height, width = x.shape
    padded = fill.view(1, channels, 1, 1).expand(batch, channels, height + 2 * pad, width + 2 * pad).clone()
    padded[:, :, pad:pad + height, pad:pad + width] = x
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=x.device)
    flip = torch.rand(batch, generator=generator, device=x.device) < 0.5
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device).expand(batch, width)
    cols = offsets[1, :, None] + torch.where(flip[:, None], cols.flip(1), cols)
    # Advanced indices on dims 0, 2, 3 of the channels-last view give B x H x W x C.
    picked = padded.permute(0, 2, 3, 1)[torch.arange(batch, device=x.device)[:, None, None], rows[:, :, None],
                                        cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)


def cache_key(data: VisionData, arch: str, epochs: int, lr: float, batch_size: int, seed: int,
              augment: bool) -> dict[str, Any]:
    """Everything that determines the teacher (and its recorded test accuracy); its hash names the cache entry."""
    return {
        "version": TEACHER_CACHE_VERSION, "dataset": data.name, "classes": data.classes, "arch": arch,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "augment": augment,
        "val_shape": list(data.x_val.shape),
        "data": {name: tensor_fingerprint(getattr(data, name)) for name in ("x_train", "y_train", "x_test", "y_test")},
    }


def entry_name(data: VisionData, arch: str, epochs: int, lr: float, batch_size: int, seed: int = 0,
               augment: bool = True) -> str:
    """The name of this teacher's cache entry, <dataset>-<arch>-<hash of cache_key(...)>: it names the teacher
    exactly, without training or loading it."""
    return f"{data.name}-{arch}-{_key_hash(cache_key(data, arch, epochs, lr, batch_size, seed, augment))}"


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Eval-mode logits of `model` on x, batched, in x's order (float32, on x's device)."""
    model.eval()
    return torch.cat([model(xb.contiguous(memory_format=torch.channels_last)).float() for xb in x.split(batch_size)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def load_teacher_model(path: Path | str, device: str = "cpu") -> nn.Module:
    """The teacher network of a cache entry (architecture from meta.json, weights from checkpoint.pt), in eval mode."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    model = TEACHERS[meta["key"]["arch"]](meta["in_channels"])
    model.load_state_dict(torch.load(path / CHECKPOINT_FILE, map_location=device, weights_only=True))
    return model.to(device).eval()


def _load_cached(path: Path, key: dict[str, Any], rows: int, device: str) -> TeacherResult | None:
    """The cache entry at `path` if it is complete, matches `key` and reads back; None (with a warning) otherwise."""
    if not (path / META_FILE).exists():
        return None
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta["key"] != key:
            raise ValueError("meta.json belongs to another setup")
        load_teacher_model(path, device)  # reads and checks the checkpoint against the architecture
        logits = torch.load(path / LOGITS_FILE, map_location=device, weights_only=True)
        if not isinstance(logits, Tensor) or logits.shape != (rows, key["classes"]):
            raise ValueError(f"train logits have the wrong shape {getattr(logits, 'shape', None)}")
        return TeacherResult(logits.float(), float(meta["test_acc"]), key["arch"], path, False, float(meta["seconds"]))
    except Exception as error:  # any unreadable entry (truncated file, foreign pickle, ...) is retrained, not trusted
        warnings.warn(f"teacher cache {path} is unusable ({error!r}); retraining", stacklevel=3)
        return None


def _train(model: nn.Module, data: VisionData, epochs: int, lr: float, batch_size: int, seed: int, device: str,
           augment: bool, bar_title: str | None) -> None:
    """Adam with the step schedule of lr_at_epoch on data.x_train, shuffled full batches (the tail that does not fill
    a batch is left out of that epoch, so BatchNorm never sees a tiny batch), flip + crop when `augment`.
    A progress bar titled `bar_title` unless that is None."""
    x, y = data.x_train.to(device), data.y_train.to(device)
    generator = torch.Generator(device).manual_seed(seed)  # shuffling and augmentation; init and dropout: global RNG
    batch_size = min(batch_size, len(x))
    steps = len(x) // batch_size
    pad = crop_padding(x.shape[-1])
    fill = x.amin(dim=(0, 2, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with tqdm(total=epochs * steps, desc=bar_title, unit="batch", disable=bar_title is None,
              dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = lr_at_epoch(epoch, epochs, lr)
            order = torch.randperm(len(x), generator=generator, device=device)
            for step, index in enumerate(order[:steps * batch_size].split(batch_size)):
                xb = augment_batch(x[index], pad, fill, generator) if augment else x[index]
                loss = nn.functional.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                if step % 20 == 0:  # reading the loss syncs the device, so only now and then
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.0e}")


def get_teacher(data: VisionData, arch: str, cache_dir: Path | str, *, epochs: int, lr: float, batch_size: int,
                seed: int = 0, device: str = "cpu", progress: bool = True, augment: bool = True) -> TeacherResult:
    """Load the teacher for this exact setup from `cache_dir`, or train it (on data.x_train only) and cache it.

    The entry is `cache_dir/<dataset>-<arch>-<hash>`, the hash being over cache_key(...): dataset name, arch,
    epochs, lr, batch size, seed, augment, shapes and content fingerprints of the data, TEACHER_CACHE_VERSION.
    It holds checkpoint.pt (state_dict), train_logits.pt and meta.json (written last: an entry without it is
    incomplete and ignored). An entry that does not read back is retrained. Training is seeded by `seed`
    (RNG state outside this call is left as it was); `device` is not part of the key.
    """
    if arch not in TEACHERS:
        raise ValueError(f"unknown teacher architecture {arch!r}; choose one of {', '.join(TEACHERS)}")
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError("teacher epochs and batch_size must be >= 1 and lr a positive number")
    key = cache_key(data, arch, epochs, lr, batch_size, seed, augment)
    path = Path(cache_dir) / f"{data.name}-{arch}-{_key_hash(key)}"
    cached = _load_cached(path, key, len(data.x_train), device)
    if cached is not None:
        return cached

    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)  # the entry is incomplete until the new meta.json lands
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # Channels-last (NHWC) weights and batches: the CPU (oneDNN) convolutions train cnn-small about 1.7x
        # faster than in NCHW on 2 cores (measured), and it is a supported fast layout on GPUs as well.
        model = TEACHERS[arch](data.x_train.shape[1]).to(device).to(memory_format=torch.channels_last)
        start = time.perf_counter()
        _train(model, data, epochs, lr, batch_size, seed, device, augment,
               f"teacher {arch} on {data.name}" if progress else None)
        seconds = time.perf_counter() - start
    train_logits = predict_logits(model, data.x_train.to(device))
    test_acc = accuracy(predict_logits(model, data.x_test.to(device)), data.y_test.to(device))
    val_acc = accuracy(predict_logits(model, data.x_val.to(device)), data.y_val.to(device))

    state = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    write_atomic(path / CHECKPOINT_FILE, _torch_bytes(state))
    write_atomic(path / LOGITS_FILE, _torch_bytes(train_logits.cpu()))
    meta = {"key": key, "in_channels": data.x_train.shape[1], "test_acc": test_acc, "val_acc": val_acc,
            "seconds": seconds, "seconds_per_epoch": seconds / epochs, "device": device,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(path / META_FILE, json.dumps(meta, indent=2).encode())
    if progress:
        tqdm.write(f"teacher {arch} on {data.name}: test accuracy {test_acc:.4f}, {seconds:.0f} s "
                   f"({seconds / epochs:.1f} s/epoch); cached in {path}")
    return TeacherResult(train_logits, test_acc, arch, path, True, seconds)
