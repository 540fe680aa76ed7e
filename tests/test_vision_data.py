"""Tests of metadistill.data.vision on small fake files in the exact official binary formats.

Design: the splits are fixed (vision.SPLITS) and load_vision has no subsetting parameter. The official files are
large (CIFAR-10's training pickles alone are 150 MB), so the loader tests write official-format files with a few
images and shrink the split sizes by monkeypatching vision.SPLITS; the loader takes train and validation as
consecutive prefixes of the official training set, whatever the sizes, so small sizes exercise the same code as the
real ones. The documented real sizes are checked on their own (test_documented_splits) and, when Debian's
dataset-fashion-mnist is installed, on the real Fashion-MNIST files.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from metadistill.data import vision
from metadistill.data.vision import SPLITS, DataError, Split, load_vision, split

FASHION_MEAN, FASHION_STD = 0.286, 0.315
CIFAR_MEAN = np.array([125.3, 123.0, 113.9]) / 255
CIFAR_STD = np.array([63.0, 62.1, 66.7]) / 255
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")

# Fake sizes: Fashion-MNIST with 10 training and 4 test images; CIFAR-10 with 5 batches of 4 and a test batch of 6.
FAKE_SPLITS = {
    "fashion-mnist": Split(train=7, val=3, test=4),
    "cifar10": Split(train=15, val=5, test=6),
    "cifar10-reduced": Split(train=5, val=3, test=6),  # the first 8 official images: batches 1 and 2 only
}
CIFAR_BATCH, CIFAR_TEST = 4, 6


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No METADISTILL_DATA from the caller's shell, no downloads into the real home."""
    monkeypatch.delenv(vision.ENV_VAR, raising=False)
    monkeypatch.setattr(vision, "DEFAULT_DOWNLOAD_DIR", tmp_path / "default-download")


@pytest.fixture
def fake_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, sizes in FAKE_SPLITS.items():
        monkeypatch.setitem(vision.SPLITS, name, sizes)


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vision, "SYSTEM_FASHION_MNIST", tmp_path / "no-such-system-folder")


# ----------------------------------------------------------------------------- writers of official formats

def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: big-endian int32 magic (2051 for N x H x W uint8 images, 2049 for N uint8 labels), dims, then data."""
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def fashion_arrays(n_train: int = 10, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images; labels i % 10 (train) and (i + 3) % 10 (test), so their order is visible."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) + 3) % 10,
    }


def write_fashion(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, array in arrays.items():
        data = idx_bytes(array)
        paths[name] = folder / (f"{name}.gz" if gz else name)
        paths[name].write_bytes(gzip.compress(data) if gz else data)
    return paths


def cifar_arrays(seed: int = 0) -> tuple[list[tuple[np.ndarray, list[int]]], tuple[np.ndarray, list[int]]]:
    """Five training batches of CIFAR_BATCH and a test batch: (uint8 N x 3072, labels) with global labels
    i % 10 for training image i in the official order, so a label tells where an image came from."""
    rng = np.random.default_rng(seed)
    batches = [(rng.integers(0, 256, (CIFAR_BATCH, 3072), dtype=np.uint8),
                [(b * CIFAR_BATCH + i) % 10 for i in range(CIFAR_BATCH)]) for b in range(5)]
    test = (rng.integers(0, 256, (CIFAR_TEST, 3072), dtype=np.uint8), [(i + 3) % 10 for i in range(CIFAR_TEST)])
    return batches, test


def write_cifar(root: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """root/cifar-10-batches-py/ as in the official archive; returns (train images N x 3 x 32 x 32, labels, test...)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches, test = cifar_arrays(seed)
    named = [(f"data_batch_{i + 1}", batch) for i, batch in enumerate(batches)] + [("test_batch", test)]
    for name, (data, labels) in named:
        content = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                   b"filenames": [b"x.png"] * len(data)}
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    train = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    train_labels = np.concatenate([labels for _, labels in batches])
    return train, train_labels, test[0].reshape(-1, 3, 32, 32), np.array(test[1])


def expected_normalised(images: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float) -> torch.Tensor:
    """Reference ((pixels / 255) - mean) / std in float64, per channel, for N x C x H x W images."""
    mean, std = np.reshape(mean, (1, -1, 1, 1)), np.reshape(std, (1, -1, 1, 1))
    return torch.from_numpy(((images / 255.0 - mean) / std).astype(np.float32))


def assert_message_explains(error: DataError, dataset: str) -> None:
    text = str(error)
    assert text.startswith(f"{dataset}:") and "\n" not in text  # one line, printed as is by the CLI
    for way in ("--data-dir", "METADISTILL_DATA", "--download"):
        assert way in text
    assert ("apt-get install dataset-fashion-mnist" in text) == (dataset == "fashion-mnist")


# ----------------------------------------------------------------------------- splits

def test_documented_splits() -> None:
    """The paper's splits; train + validation never exceed the official training set (60000 / 50000)."""
    assert SPLITS == {
        "fashion-mnist": (54000, 6000, 10000),
        "cifar10": (45000, 5000, 10000),
        "cifar10-reduced": (11520, 1280, 10000),
    }
    assert SPLITS["fashion-mnist"].train + SPLITS["fashion-mnist"].val == 60000
    assert SPLITS["cifar10"].train + SPLITS["cifar10"].val == 50000
    assert SPLITS["cifar10-reduced"].train + SPLITS["cifar10-reduced"].val == 12800
    assert set(SPLITS) == set(vision.VISION_DATASETS) == set(vision.NORMALISATION)


def test_split_takes_consecutive_prefixes() -> None:
    """Pure split logic: train = official[0:a], validation = official[a:a+b], test = official_test[0:c]."""
    train, test = torch.arange(12), torch.arange(100, 105)
    x_tr, y_tr, x_va, y_va, x_te, y_te = split(train, train * 10, test, test * 10, Split(6, 4, 5))
    assert x_tr.tolist() == list(range(6)) and x_va.tolist() == list(range(6, 10))
    assert x_te.tolist() == list(range(100, 105))
    assert torch.equal(y_tr, x_tr * 10) and torch.equal(y_va, x_va * 10) and torch.equal(y_te, x_te * 10)
    with pytest.raises(ValueError, match="need 13 training"):
        split(train, train, test, test, Split(9, 4, 5))


# ----------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("subdir", ["", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_layouts(tmp_path: Path, fake_splits: None, subdir: str, gz: bool) -> None:
    """Gzipped or plain IDX files, directly in DIR or in torchvision's DIR/FashionMNIST/raw/: same result."""
    arrays = fashion_arrays()
    write_fashion(tmp_path / subdir, arrays, gz=gz)
    data = load_vision("fashion-mnist", data_dir=tmp_path)

    images = arrays["train-images-idx3-ubyte"][:, None]
    labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    expected = expected_normalised(images, FASHION_MEAN, FASHION_STD)
    assert data.name == "fashion-mnist" and data.classes == 10
    assert data.x_train.shape == (7, 1, 28, 28) and data.x_val.shape == (3, 1, 28, 28)
    assert data.x_test.shape == (4, 1, 28, 28)
    for x in (data.x_train, data.x_val, data.x_test):
        assert x.dtype == torch.float32
    for y in (data.y_train, data.y_val, data.y_test):
        assert y.dtype == torch.int64
    torch.testing.assert_close(data.x_train, expected[:7])
    torch.testing.assert_close(data.x_val, expected[7:10])
    torch.testing.assert_close(data.x_test, expected_normalised(arrays["t10k-images-idx3-ubyte"][:, None],
                                                                FASHION_MEAN, FASHION_STD))
    assert torch.equal(data.y_train, labels[:7]) and torch.equal(data.y_val, labels[7:10])
    assert data.y_test.tolist() == [3, 4, 5, 6]


def test_fashion_known_pixels(tmp_path: Path, fake_splits: None) -> None:
    """Pixel v maps to (v / 255 - 0.286) / 0.315; pixel (row 3, col 5) stays at (3, 5)."""
    arrays = fashion_arrays()
    image = np.zeros((28, 28), dtype=np.uint8)
    image[0, 0], image[0, 1], image[3, 5] = 255, 0, 128
    arrays["train-images-idx3-ubyte"][8] = image  # lands in validation, at index 1
    write_fashion(tmp_path, arrays)
    x = load_vision("fashion-mnist", data_dir=tmp_path).x_val[1, 0]
    assert x[0, 0].item() == pytest.approx((1 - 0.286) / 0.315, rel=1e-6)
    assert x[0, 1].item() == pytest.approx(-0.286 / 0.315, rel=1e-6)
    assert x[3, 5].item() == pytest.approx((128 / 255 - 0.286) / 0.315, rel=1e-6)
    assert x[5, 3].item() == pytest.approx(-0.286 / 0.315, rel=1e-6)


@pytest.mark.skipif(not all((REAL_FASHION / f"{name}.gz").is_file() or (REAL_FASHION / name).is_file()
                            for name in vision.FASHION_FILES.values()),
                    reason="needs Debian's dataset-fashion-mnist in /usr/share/datasets/fashion-mnist")
def test_real_fashion_mnist() -> None:
    """The real files, found with no arguments. Normalised mean is near 0; the std is near 0.3530 / 0.315 = 1.12,
    not 1, because the prescribed std 0.315 is below the real pixel std of Fashion-MNIST (0.3530)."""
    data = load_vision("fashion-mnist")
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (54000, 6000, 10000)
    assert data.x_train.shape[1:] == (1, 28, 28)
    assert abs(data.x_train.mean().item()) < 0.05
    assert data.x_train.std().item() == pytest.approx(0.3530 / 0.315, abs=0.05)
    assert data.y_train[:4].tolist() == [9, 0, 0, 3]  # the official first labels: ankle boot, T-shirt, T-shirt, dress
    assert torch.bincount(data.y_test).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- CIFAR-10

def test_cifar10_and_reduced(tmp_path: Path, fake_splits: None) -> None:
    """cifar10 uses batches 1..5 in order; cifar10-reduced the FIRST official images; per-channel normalisation
    with the 3072 bytes of a row read as 1024 red, 1024 green, 1024 blue, each row-major 32 x 32."""
    train, train_labels, test, test_labels = write_cifar(tmp_path)
    full = load_vision("cifar10", data_dir=tmp_path)
    reduced = load_vision("cifar10-reduced", data_dir=tmp_path)

    expected_train = expected_normalised(train, CIFAR_MEAN, CIFAR_STD)
    expected_test = expected_normalised(test, CIFAR_MEAN, CIFAR_STD)
    assert (len(full.x_train), len(full.x_val), len(full.x_test)) == FAKE_SPLITS["cifar10"]
    assert (len(reduced.x_train), len(reduced.x_val), len(reduced.x_test)) == FAKE_SPLITS["cifar10-reduced"]
    assert full.x_train.shape[1:] == (3, 32, 32) and full.x_train.dtype == torch.float32
    torch.testing.assert_close(full.x_train, expected_train[:15])
    torch.testing.assert_close(full.x_val, expected_train[15:20])
    torch.testing.assert_close(full.x_test, expected_test)
    assert full.y_train.tolist() == train_labels[:15].tolist() and full.y_val.tolist() == train_labels[15:].tolist()
    assert full.y_test.dtype == torch.int64 and full.y_test.tolist() == test_labels.tolist()

    torch.testing.assert_close(reduced.x_train, full.x_train[:5])
    torch.testing.assert_close(reduced.x_val, full.x_train[5:8])
    assert reduced.y_train.tolist() == [0, 1, 2, 3, 4] and reduced.y_val.tolist() == [5, 6, 7]
    torch.testing.assert_close(reduced.x_test, full.x_test)

    pixel = train[0, :, 2, 7].astype(np.float64)  # channel values of pixel (2, 7) of the first image
    assert full.x_train[0, :, 2, 7].tolist() == pytest.approx(((pixel / 255 - CIFAR_MEAN) / CIFAR_STD).tolist(),
                                                               rel=1e-5)
    stored = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")
    assert train[0, 1, 2, 7] == stored[b"data"][0][1024 + 2 * 32 + 7]  # green, row 2, column 7


def test_cifar_reduced_reads_only_the_batches_it_needs(tmp_path: Path, fake_splits: None) -> None:
    """cifar10-reduced's 8 fake images lie in batches 1-2: a corrupt batch 5 does not matter to it, but to cifar10."""
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(b"not a pickle")
    assert len(load_vision("cifar10-reduced", data_dir=tmp_path).x_train) == 5
    with pytest.raises(DataError, match="data_batch_5"):
        load_vision("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("dataset", vision.VISION_DATASETS)
def test_missing_data(tmp_path: Path, no_system_data: None, dataset: str) -> None:
    with pytest.raises(DataError) as info:
        load_vision(dataset, data_dir=tmp_path)
    assert_message_explains(info.value, dataset)
    assert str(tmp_path) in str(info.value) and "METADISTILL_DATA: not set" in str(info.value)


def test_incomplete_fashion_folder_names_missing_files(tmp_path: Path, no_system_data: None) -> None:
    paths = write_fashion(tmp_path, fashion_arrays())
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]") as info:
        load_vision("fashion-mnist", data_dir=tmp_path)
    assert_message_explains(info.value, "fashion-mnist")


def _bad_magic(paths: dict[str, Path]) -> None:
    path = paths["train-images-idx3-ubyte"]
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[2:4] = (2049).to_bytes(2, "big")
    path.write_bytes(gzip.compress(bytes(data)))


def _truncated(paths: dict[str, Path]) -> None:
    path = paths["t10k-images-idx3-ubyte"]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))


def _truncated_gzip(paths: dict[str, Path]) -> None:
    path = paths["train-labels-idx1-ubyte"]
    path.write_bytes(path.read_bytes()[:20])


def _not_gzip(paths: dict[str, Path]) -> None:
    paths["train-images-idx3-ubyte"].write_bytes(b"plain text, not gzip")


def _label_count(paths: dict[str, Path]) -> None:
    paths["train-labels-idx1-ubyte"].write_bytes(gzip.compress(idx_bytes(np.zeros(9, dtype=np.uint8))))


def _bad_label(paths: dict[str, Path]) -> None:
    paths["t10k-labels-idx1-ubyte"].write_bytes(gzip.compress(idx_bytes(np.full(4, 10, dtype=np.uint8))))


@pytest.mark.parametrize("corrupt, message", [
    (_bad_magic, "magic number 2049, expected 2051"),
    (_truncated, "truncated"),
    (_truncated_gzip, "cannot read"),
    (_not_gzip, "cannot read"),
    (_label_count, "10 images but .* 9 labels"),
    (_bad_label, "labels outside 0..9"),
])
def test_corrupt_fashion(tmp_path: Path, fake_splits: None, corrupt: Callable[[dict[str, Path]], None],
                         message: str) -> None:
    corrupt(write_fashion(tmp_path, fashion_arrays()))
    with pytest.raises(DataError, match=message) as info:
        load_vision("fashion-mnist", data_dir=tmp_path)
    assert_message_explains(info.value, "fashion-mnist")


def test_too_few_images_for_the_real_split(tmp_path: Path) -> None:
    """Official-format files with fewer images than SPLITS needs are refused, never silently subset."""
    write_fashion(tmp_path, fashion_arrays())
    with pytest.raises(DataError, match="hold 10 training and 4 test images; the splits need 60000 and 10000"):
        load_vision("fashion-mnist", data_dir=tmp_path)
    write_cifar(tmp_path)
    with pytest.raises(DataError, match="hold 20 training .* need 12800") as info:
        load_vision("cifar10-reduced", data_dir=tmp_path)
    assert_message_explains(info.value, "cifar10-reduced")


@pytest.mark.parametrize("content, message", [
    (b"\x80\x02garbage", "cannot unpickle"),
    (pickle.dumps([1, 2, 3]), "not a CIFAR-10 batch"),
    (pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}), "expected uint8 N x 3072"),
    (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}), "4 images but b'labels'"),
])
def test_corrupt_cifar(tmp_path: Path, fake_splits: None, content: bytes, message: str) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_vision("cifar10", data_dir=tmp_path)
    assert_message_explains(info.value, "cifar10")


class _Crafted:
    """What a crafted pickle does when loaded by a plain unpickler: run a command (here, create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_cifar_pickle_runs_no_code(tmp_path: Path, fake_splits: None, protocol: int) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "marker"
    payload = pickle.dumps({b"data": _Crafted(marker), b"labels": [0]}, protocol=protocol)
    pickle.loads(payload)  # the file really is harmful to a plain unpickler
    assert marker.exists()
    marker.unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match="refused global .*system") as info:
        load_vision("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    assert_message_explains(info.value, "cifar10")


def test_cifar_missing_batch(tmp_path: Path, fake_splits: None) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        load_vision("cifar10-reduced", data_dir=tmp_path)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="choose from fashion-mnist, cifar10, cifar10-reduced"):
        load_vision("mnist")


# ----------------------------------------------------------------------------- search order and download

def test_search_order(tmp_path: Path, fake_splits: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """data_dir, then METADISTILL_DATA, then the system folder: each found in turn as the earlier ones go away.
    The three folders hold different images (seeds 1, 2, 3), so the first test image tells which was read."""
    folders = {seed: tmp_path / f"d{seed}" for seed in (1, 2, 3)}
    first_test = {}
    for seed, folder in folders.items():
        arrays = fashion_arrays(seed=seed)
        write_fashion(folder, arrays)
        first_test[seed] = expected_normalised(arrays["t10k-images-idx3-ubyte"][:1, None], FASHION_MEAN, FASHION_STD)
    monkeypatch.setattr(vision, "SYSTEM_FASHION_MNIST", folders[3])

    def source() -> int:
        x = load_vision("fashion-mnist", data_dir=explicit).x_test[:1]
        return next(seed for seed, expected in first_test.items() if torch.allclose(x, expected))

    explicit: Path | None = folders[1]
    monkeypatch.setenv("METADISTILL_DATA", str(folders[2]))
    assert source() == 1
    explicit = tmp_path / "empty"
    assert source() == 2  # an explicit folder without the files falls through to the environment variable
    explicit = None
    assert source() == 2
    monkeypatch.setenv("METADISTILL_DATA", "")
    assert source() == 3


def test_download_only_when_asked(tmp_path: Path, fake_splits: None, no_system_data: None,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The download step (torchvision, needs the network) is replaced by a writer of fake files in torchvision's
    layouts; checked: it runs only with download=True and nothing found, into data_dir, else METADISTILL_DATA,
    else the default folder, and the files it wrote are then loaded."""
    calls: list[tuple[str, Path]] = []

    def fake_download(dataset: str, root: Path) -> None:
        calls.append((dataset, root))
        if dataset == "fashion-mnist":
            write_fashion(root / "FashionMNIST" / "raw", fashion_arrays(), gz=False)
        else:
            write_cifar(root)

    monkeypatch.setattr(vision, "_download", fake_download)
    with pytest.raises(DataError):
        load_vision("cifar10", data_dir=tmp_path / "a")
    assert calls == []

    assert len(load_vision("cifar10", data_dir=tmp_path / "a", download=True).x_train) == 15
    assert len(load_vision("cifar10", data_dir=tmp_path / "a", download=True).x_train) == 15  # found, no new call
    monkeypatch.setenv("METADISTILL_DATA", str(tmp_path / "b"))
    assert len(load_vision("fashion-mnist", download=True).x_val) == 3
    monkeypatch.delenv("METADISTILL_DATA")
    assert len(load_vision("cifar10-reduced", download=True).x_val) == 3
    assert calls == [("cifar10", tmp_path / "a"), ("fashion-mnist", tmp_path / "b"),
                     ("cifar10-reduced", tmp_path / "default-download")]


def test_failed_download(tmp_path: Path, no_system_data: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(dataset: str, root: Path) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(vision, "_download", offline)
    with pytest.raises(DataError, match="download into .* failed: RuntimeError: Error downloading") as info:
        load_vision("fashion-mnist", data_dir=tmp_path, download=True)
    assert_message_explains(info.value, "fashion-mnist")
