"""reproduce --quick on Fashion-MNIST end to end: teacher, six methods, report.md and the three figures."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from metadistill.cli import main
from metadistill.config import PAPER_METHODS

REAL = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
         "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}


def write_idx(path: Path, array: np.ndarray) -> None:
    """The official IDX format: magic (0x0800 | ndim for uint8), big-endian int32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Fake Fashion-MNIST files of the official sizes, with a learnable class signal in the pixels."""
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for name, shape in FILES.items():
        if "labels" in name:
            continue
        labels = rng.integers(0, 10, size=shape[0])
        images = rng.integers(0, 60, size=shape, dtype=np.uint8)
        for c in range(10):  # class c lights up row band c
            images[labels == c, 2 * c + 4: 2 * c + 6, 4:24] = 220
        write_idx(folder / f"{name}.gz", images)
        write_idx(folder / f"{name.replace('images-idx3', 'labels-idx1')}.gz", labels)
    return folder


def test_quick_reproduce_writes_report_and_figures(tmp_path, fashion_dir, capsys, monkeypatch):
    monkeypatch.setenv("METADISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "records"
    code = main(["reproduce", "--dataset", "fashion-mnist", "--quick", "--data-dir", str(fashion_dir),
                 "--methods", ",".join(PAPER_METHODS), "--out", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    for method in PAPER_METHODS:
        assert method in table
    report = (out / "report.md").read_text()
    assert "Teacher test accuracy" in report
    for figure in ["trajectories", "accuracy", "cost"]:
        png = out / "figures" / f"fashion-mnist_{figure}.png"
        assert png.exists() and png.stat().st_size > 10_000
        assert f"figures/fashion-mnist_{figure}.png" in report
    # the teacher is cached: a second quick run with more runs loads it instead of training
    assert main(["teacher", "--dataset", "fashion-mnist", "--quick", "--data-dir", str(fashion_dir), "--quiet"]) == 0
    assert "loaded from the cache" in capsys.readouterr().out


def test_missing_data_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METADISTILL_DATA", str(tmp_path / "nothing"))
    code = main(["teacher", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-dir" in err[0] and "--download" in err[0]
