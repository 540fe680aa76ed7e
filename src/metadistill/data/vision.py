"""Fashion-MNIST and CIFAR-10 (full and reduced) from the official files, as normalised in-memory tensors.

Splits (fixed, see SPLITS): train and validation are consecutive prefixes of the official training set in its
official order, the test split is the official test set.

    fashion-mnist    official 60000 train -> train 54000 + validation 6000; official test 10000
    cifar10          official 50000 train -> train 45000 + validation 5000; official test 10000
    cifar10-reduced  first 12800 official train images -> train 11520 + validation 1280; official test 10000

Images are scaled to [0, 1], then normalised per channel with NORMALISATION; shapes N x 1 x 28 x 28
(Fashion-MNIST) and N x 3 x 32 x 32 (CIFAR-10), float32; labels int64.

Where the files are looked for, in order: the `data_dir` argument, the environment variable METADISTILL_DATA,
for Fashion-MNIST /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), and, only with
`download=True`, a torchvision download into `data_dir` (or METADISTILL_DATA, or ~/.cache/metadistill/data).
Layouts: `DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}` (the official archive, extracted) and the four
official Fashion-MNIST IDX files, gzipped or not, in `DIR/` or `DIR/FashionMNIST/raw/` (torchvision's layout).

The IDX files are parsed here with numpy rather than with `torchvision.datasets.mnist.read_image_file`: those
readers take only paths to uncompressed files and check the format with `assert`s, while this module reads
gzipped files too and turns every format problem into a DataError. The CIFAR-10 pickles are read directly
because torchvision's CIFAR10 class insists on the official md5 checksums; they are unpickled by an unpickler
that builds only what those files hold (dicts, lists, bytes, numbers, numpy arrays), so a crafted file cannot
run code.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

VISION_DATASETS = ("fashion-mnist", "cifar10", "cifar10-reduced")


class Split(NamedTuple):
    """Sizes of the splits: train and validation are taken, in this order, from the start of the official
    training set; test from the start of the official test set (which is all of it for these datasets)."""

    train: int
    val: int
    test: int


SPLITS: dict[str, Split] = {
    "fashion-mnist": Split(train=54000, val=6000, test=10000),
    "cifar10": Split(train=45000, val=5000, test=10000),
    "cifar10-reduced": Split(train=11520, val=1280, test=10000),
}

_CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
_CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
# (per-channel means, per-channel stds) applied to pixels / 255.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.286,), (0.315,)),
    "cifar10": (_CIFAR_MEAN, _CIFAR_STD),
    "cifar10-reduced": (_CIFAR_MEAN, _CIFAR_STD),
}

ENV_VAR = "METADISTILL_DATA"
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_DIR = Path("~/.cache/metadistill/data")

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_SUBDIRS = (".", "FashionMNIST/raw")
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x0000 08 (uint8) 03 (dims) and 0x0000 08 01
_NUM_CLASSES = 10

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train images, train labels, test images, labels


class DataError(RuntimeError):
    """Dataset files are missing or corrupt; the message says where they were looked for and how to get them."""


@dataclass
class VisionData:
    """Normalised float32 images N x C x H x W and int64 labels, split into train / validation / test."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int = 10


class _FormatError(Exception):
    """A file exists but is not what the official layout holds; turned into a DataError by load_vision."""


def split(train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
          sizes: Split) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val, x_test, y_test): train = the first `sizes.train` official training
    images, validation = the next `sizes.val`, test = the first `sizes.test` official test images."""
    n_train, n_val, n_test = sizes
    if len(train_images) < n_train + n_val or len(test_images) < n_test:
        raise ValueError(f"need {n_train + n_val} training and {n_test} test images, "
                         f"got {len(train_images)} and {len(test_images)}")
    return (train_images[:n_train], train_labels[:n_train],
            train_images[n_train:n_train + n_val], train_labels[n_train:n_train + n_val],
            test_images[:n_test], test_labels[:n_test])


def normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 N x C x H x W -> float32 ((pixels / 255) - mean) / std, per channel."""
    shape = (1, len(mean), 1, 1)
    x = torch.from_numpy(images.astype(np.float32))
    return x.div_(255).sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX files)

def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzipped if the name ends in .gz) of uint8: images (magic 2051) N x 28 x 28, labels (2049) N."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise _FormatError(f"cannot read {path}: {error}") from None
    ndim = 3 if magic == _IDX_IMAGES else 1
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise _FormatError(f"{path} is truncated: {len(data)} bytes, shorter than the IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if ndim == 3 else "labels"
        raise _FormatError(f"{path} has magic number {found}, expected {magic} (IDX {kind}): not an IDX {kind} file")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if ndim == 3 and dims[1:] != (28, 28):
        raise _FormatError(f"{path} holds {dims[1]} x {dims[2]} images, expected 28 x 28")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise _FormatError(f"{path} has {len(data)} bytes, expected {expected} for {' x '.join(map(str, dims))} "
                           f"({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_fashion_file(root: Path, name: str) -> Path | None:
    candidates = (root / sub / f"{name}{ext}" for sub in FASHION_SUBDIRS for ext in ("", ".gz"))
    return next((path for path in candidates if path.is_file()), None)


def _locate_fashion(root: Path) -> tuple[dict[str, Path] | None, str]:
    paths = {key: _find_fashion_file(root, name) for key, name in FASHION_FILES.items()}
    missing = [FASHION_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        return None, f"missing {', '.join(f'{name}[.gz]' for name in missing)}"
    return paths, ""


def _read_fashion(paths: dict[str, Path]) -> Arrays:
    arrays = {key: _read_idx(path, _IDX_IMAGES if key.endswith("images") else _IDX_LABELS)
              for key, path in paths.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            raise _FormatError(f"{paths[f'{part}_images']} holds {len(images)} images but "
                               f"{paths[f'{part}_labels']} {len(labels)} labels")
    return (arrays["train_images"][:, None], arrays["train_labels"],
            arrays["test_images"][:, None], arrays["test_labels"])


# ----------------------------------------------------------------------------- CIFAR-10 (python pickles)

class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the official CIFAR-10 batches hold: dicts, lists, bytes, str, numbers
    and numpy arrays. Any other global (a function a crafted file would call) is refused, so a file in a data
    folder cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not part of a CIFAR-10 batch)")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch: a pickled dict with b"data" uint8 N x 3072 and b"labels" (N ints)."""
    try:
        with path.open("rb") as file:
            batch = _BatchUnpickler(file, encoding="bytes").load()
    except Exception as error:  # a corrupt pickle can raise nearly anything; all of it means "not the file"
        raise _FormatError(f"cannot unpickle {path}: {type(error).__name__}: {error}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _FormatError(f"{path} is not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise _FormatError(f"{path}: b'data' is {images.dtype} {images.shape}, expected uint8 N x 3072")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise _FormatError(f"{path}: {len(images)} images but b'labels' is {labels.dtype} {labels.shape}")
    return images.reshape(-1, 3, 32, 32), labels


def _locate_cifar(root: Path) -> tuple[dict[str, Path] | None, str]:
    folder = root / CIFAR_FOLDER
    if not folder.is_dir():
        return None, f"no {CIFAR_FOLDER}/"
    missing = [name for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH) if not (folder / name).is_file()]
    if missing:
        return None, f"{CIFAR_FOLDER}/ lacks {', '.join(missing)}"
    return {name: folder / name for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)}, ""


def _read_cifar(paths: dict[str, Path], n_train_needed: int) -> Arrays:
    """Training batches in official order, read only as far as `n_train_needed` images, and the test batch."""
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    for name in CIFAR_TRAIN_BATCHES:
        if sum(len(images) for images, _ in batches) >= n_train_needed:
            break
        batches.append(_read_cifar_batch(paths[name]))
    test_images, test_labels = _read_cifar_batch(paths[CIFAR_TEST_BATCH])
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
            test_images, test_labels)


# ----------------------------------------------------------------------------- search, download, messages

def _how_to(dataset: str) -> str:
    if dataset == "fashion-mnist":
        layout = (f"the four official files {', '.join(FASHION_FILES.values())} (each optionally .gz) "
                  "directly in DIR or in DIR/FashionMNIST/raw/")
    else:
        layout = f"{CIFAR_FOLDER}/ with {', '.join(CIFAR_TRAIN_BATCHES)}, {CIFAR_TEST_BATCH} (the official archive)"
    ways = [f"--data-dir DIR (data_dir=DIR in Python) where DIR holds {layout}",
            f"{ENV_VAR}=DIR with the same layout",
            f"--download (download=True) to fetch it with torchvision into DIR, ${ENV_VAR} or {DEFAULT_DOWNLOAD_DIR}"]
    if dataset == "fashion-mnist":
        ways.append(f"apt-get install dataset-fashion-mnist (Debian/Ubuntu), which puts it in {SYSTEM_FASHION_MNIST}")
    return "Provide it with " + "; or ".join(ways)


def _error(dataset: str, problem: str, searched: list[str]) -> DataError:
    """One line: CLIs print it as the whole error."""
    text = f"{dataset}: {problem} (searched: {'; '.join(searched) or 'nowhere'}). {_how_to(dataset)}."
    return DataError(" ".join(text.splitlines()))


def _env_dir() -> Path | None:
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else None


def _candidates(dataset: str, data_dir: Path | None) -> list[tuple[str, Path | None]]:
    places: list[tuple[str, Path | None]] = [("--data-dir", data_dir), (ENV_VAR, _env_dir())]
    if dataset == "fashion-mnist":
        places.append(("system package", SYSTEM_FASHION_MNIST))
    return places


def _download(dataset: str, root: Path) -> None:
    """Fetch the official files into `root` with torchvision (FashionMNIST/raw/ or cifar-10-batches-py/)."""
    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    if dataset == "fashion-mnist":
        datasets.FashionMNIST(root=str(root), train=True, download=True)
    else:
        datasets.CIFAR10(root=str(root), train=False, download=True)


def load_vision(dataset: str, data_dir: Path | str | None = None, download: bool = False) -> VisionData:
    """Load `dataset` (one of VISION_DATASETS) with the paper's splits and normalisation.

    The files are looked for in `data_dir`, then $METADISTILL_DATA, then (Fashion-MNIST) the Debian package's
    folder; with `download=True` and none found, torchvision downloads them into `data_dir` (or
    $METADISTILL_DATA, or ~/.cache/metadistill/data). Missing or corrupt files raise DataError.
    """
    if dataset not in VISION_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(VISION_DATASETS)}")
    sizes = SPLITS[dataset]
    locate: Callable[[Path], tuple[dict[str, Path] | None, str]] = (
        _locate_fashion if dataset == "fashion-mnist" else _locate_cifar)
    explicit = Path(data_dir).expanduser() if data_dir is not None else None

    searched: list[str] = []
    found: dict[str, Path] | None = None
    for label, root in _candidates(dataset, explicit):
        if root is None:
            searched.append(f"{label}: not given" if label == "--data-dir" else f"{label}: not set")
            continue
        found, why = locate(root)
        searched.append(f"{root} ({label}): {'found' if found else why}")
        if found:
            break
    if found is None and download:
        target = explicit or _env_dir() or DEFAULT_DOWNLOAD_DIR.expanduser()
        try:
            _download(dataset, target)
        except Exception as error:  # network, checksum, disk: all end in "could not download"
            raise _error(dataset, f"download into {target} failed: {type(error).__name__}: {error}",
                         searched) from None
        found, why = locate(target)
        searched.append(f"{target} (--download): {'downloaded' if found else why}")
    if found is None:
        raise _error(dataset, "data files not found", searched)

    try:
        if dataset == "fashion-mnist":
            arrays = _read_fashion(found)
        else:
            arrays = _read_cifar(found, sizes.train + sizes.val)
        train_images, train_labels, test_images, test_labels = arrays
        for labels, part in ((train_labels, "training"), (test_labels, "test")):
            if len(labels) and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
                raise _FormatError(f"{part} labels outside 0..{_NUM_CLASSES - 1}")
        if len(train_images) < sizes.train + sizes.val or len(test_images) < sizes.test:
            raise _FormatError(f"the files hold {len(train_images)} training and {len(test_images)} test images; "
                               f"the splits need {sizes.train + sizes.val} and {sizes.test}")
    except _FormatError as error:
        raise _error(dataset, f"corrupt or incomplete data files: {error}", searched) from None

    mean, std = NORMALISATION[dataset]
    n_official = sizes.train + sizes.val
    x_train_all = normalise(train_images[:n_official], mean, std)
    x_test_all = normalise(test_images[:sizes.test], mean, std)
    y_train_all = torch.from_numpy(train_labels[:n_official].astype(np.int64))
    y_test_all = torch.from_numpy(test_labels[:sizes.test].astype(np.int64))
    parts = split(x_train_all, y_train_all, x_test_all, y_test_all, sizes)
    return VisionData(dataset, *parts, classes=_NUM_CLASSES)
