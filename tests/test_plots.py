"""Figure helpers: mean ± sd bands stay within the plotted quantity's range."""

import json
import subprocess
import sys

import numpy as np
import pytest

from metadistill import plots
from metadistill.meta import LAMBDA1_BOUNDS, TEMPERATURE_BOUNDS
from metadistill.plots import _band


@pytest.mark.parametrize(("values", "log", "bounds"), [
    ([[0.0, 0.0, 0.02], [0.9, 0.05, 0.01], [0.02, 0.0, 0.0]], False, LAMBDA1_BOUNDS),  # mean - sd < 0
    ([[1.0, 0.9], [1.0, 0.9], [0.4, 0.9]], False, (0.0, 1.0)),  # an accuracy whose mean + sd > 1
    ([[0.1, 10.0], [10.0, 10.0], [0.1, 0.1]], True, TEMPERATURE_BOUNDS),
])
def test_band_is_clipped_to_the_bounds(values, log, bounds):
    ax = plots._figure().subplots()
    values = np.array(values)
    unclipped = values.mean(0) - values.std(0), values.mean(0) + values.std(0)
    if log:
        logs = np.log10(values)
        unclipped = 10 ** (logs.mean(0) - logs.std(0)), 10 ** (logs.mean(0) + logs.std(0))
    assert unclipped[0].min() < bounds[0] or unclipped[1].max() > bounds[1]  # the data do leave the range
    _band(ax, np.arange(values.shape[1]), values, "k", "x", log, bounds)
    (band,) = ax.collections
    y = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    assert y.min() >= bounds[0] and y.max() <= bounds[1]


def test_trajectory_bands_stay_within_the_metaparameter_bounds(tmp_path, monkeypatch):
    # Three gradient runs whose lambda1 mean - sd is below 0 and whose T mean + sd is above 10.
    runs = []
    for seed, (lam, temp) in enumerate([(0.0, 10.0), (0.9, 10.0), (0.0, 0.1)]):
        directory = tmp_path / f"run_{seed}"
        directory.mkdir()
        lines = [json.dumps({"lambda1": lam, "temperature": temp}) for _ in range(5)]
        (directory / "history.jsonl").write_text("\n".join(lines) + "\n")
        runs.append({"dir": str(directory), "seed": seed})
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.trajectories("synthetic", {"gradient": runs}, tmp_path / "t.png")
    (fig,) = figures
    for ax, (low, high) in zip(fig.axes[::2], (LAMBDA1_BOUNDS, TEMPERATURE_BOUNDS)):
        (band,) = [c for c in ax.collections if c.get_paths()]
        y = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
        assert y.min() >= low and y.max() <= high


def test_metadistill_loads_matplotlib_and_hyperopt_only_to_use_them(tmp_path):
    """They take seconds to import (hyperopt with scipy.stats): the CLI and every worker process start without
    them; a figure is drawn without pyplot, so a user's backend and pyplot figures are left alone."""
    run = {"method": "naive", "dir": str(tmp_path), "seed": 0, "steps": 10, "hypergrad_evals": 0,
           "final_test_acc": 0.5}
    code = ("import sys; import metadistill, metadistill.cli; from metadistill import plots; "
            "loaded = [m for m in ('matplotlib', 'hyperopt', 'scipy') if m in sys.modules]; "
            "assert not loaded, loaded; "
            f"plots.accuracy_vs_cost('synthetic', {{'naive': [{run!r}]}}, plots.Path({str(tmp_path / 'c.png')!r})); "
            "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
