"""Run directories: config.json, history.jsonl, result.json, written atomically; finished runs are skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import write_atomic
from .results import RunResult

RESULT = "result.json"
CONFIG = "config.json"
HISTORY = "history.jsonl"


class RecordError(RuntimeError):
    """A records directory cannot be used as asked (unwritable, or holds runs of other settings)."""


def run_dir(out: Path, dataset: str, method: str, seed: int) -> Path:
    return Path(out) / dataset / method / f"run_{seed:03d}"


def check_writable(out: Path) -> None:
    """Fail early, with the reason, when `out` cannot hold records."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out) / ".write-test", "ok")
        (Path(out) / ".write-test").unlink()
    except OSError as error:
        raise RecordError(f"cannot write records to {out}: {error.strerror or error}") from None


def load_finished(directory: Path, config: dict[str, Any]) -> dict | None:
    """The saved result of a finished run with the same config, None if the run is not finished.

    A finished run made with other settings is an error: mixing them would make a table lie.
    """
    result_path = directory / RESULT
    if not result_path.exists():
        return None
    try:
        saved_config = json.loads((directory / CONFIG).read_text())
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RecordError(f"unreadable record in {directory}: {error}; delete that run directory to redo it") from None
    if saved_config != config:
        changed = sorted(k for k in set(saved_config) | set(config) if saved_config.get(k) != config.get(k))
        raise RecordError(f"{directory} holds a run made with other settings ({', '.join(changed)} differ); "
                          "use another --out or the same settings")
    return result


def save_run(directory: Path, config: dict[str, Any], result: RunResult) -> dict:
    """config.json, then history.jsonl (one line per step), then result.json, which marks the run finished.

    Returns what result.json holds, as `load_finished` would read it back."""
    write_atomic(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    columns = result.history
    steps = len(columns.get("lambda1", []))
    lines = (json.dumps({"step": i, **{name: values[i] for name, values in columns.items()}}) for i in range(steps))
    write_atomic(directory / HISTORY, "".join(line + "\n" for line in lines))
    record = result.record()
    write_atomic(directory / RESULT, json.dumps(record, indent=2) + "\n")
    return record


def load_history(directory: Path) -> list[dict]:
    with open(directory / HISTORY) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def finished_runs(out: Path) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {method: [result, ...]}} for every finished run under `out`, ordered by seed."""
    found: dict[str, dict[str, list[dict]]] = {}
    for result_path in sorted(Path(out).glob(f"*/*/run_*/{RESULT}")):
        dataset, method = result_path.parts[-4], result_path.parts[-3]
        result = json.loads(result_path.read_text())
        result["dir"] = str(result_path.parent)
        found.setdefault(dataset, {}).setdefault(method, []).append(result)
    return found
