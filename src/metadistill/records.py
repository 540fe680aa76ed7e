"""Run directories: config.json, history.jsonl, result.json (or diverged.json), written atomically; recorded runs
are skipped."""

from __future__ import annotations

import errno
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .files import write_atomic
from .results import RunResult

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not claimed
    fcntl = None  # type: ignore[assignment]

RESULT = "result.json"
CONFIG = "config.json"
HISTORY = "history.jsonl"
DIVERGED = "diverged.json"
CLAIMS = ".claims"


class RecordError(RuntimeError):
    """A records directory cannot be used as asked (unwritable, or holds runs of other settings)."""


def run_dir(out: Path, dataset: str, method: str, seed: int) -> Path:
    return Path(out) / dataset / method / f"run_{seed:03d}"


def check_writable(out: Path) -> None:
    """Fail early, with the reason, when `out` cannot hold records. The probe file's name is unique to this call,
    so runs started at the same moment into one folder do not delete each other's probe."""
    probe = Path(out) / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_atomic(probe, "ok")
        probe.unlink()
    except OSError as error:
        raise RecordError(f"cannot write records to {out}: {error.strerror or error}") from None


def _check_identity(directory: Path, identity: dict[str, Any]) -> None:
    """A record made with other settings (or other code, or another teacher) is an error: mixing would make a
    table lie."""
    try:
        saved = json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RecordError(f"unreadable record in {directory}: {error}; delete that run directory to redo it") from None
    if saved != identity:
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise RecordError(f"{directory} holds a run made with other settings ({', '.join(changed)} differ); "
                          "use another --out or the same settings")


class Claims:
    """The runs this process is about to train or is training, claimed so that another metadistill process
    writing into the same records directory does not train them too: byte `seed` of `<out>/<dataset>/<method>/
    .claims` holds a POSIX record lock (fcntl) of the claiming process. The system drops a process's locks when
    it ends, however it ends (SIGKILL included), so no claim outlives its process and nothing is left to clean
    up. Claims exclude processes on one machine, or sharing a filesystem that supports POSIX locks (local disks,
    NFS with its lock service); they are not taken where fcntl does not exist or the filesystem refuses locks.

    A process's POSIX locks on a file are released when it closes any descriptor of that file, so each file
    is opened once, here, and kept open until `close`."""

    def __init__(self, out: Path, dataset: str) -> None:
        self._folder = Path(out) / dataset
        self._files: dict[str, int] = {}
        self._locking = fcntl is not None

    def _file(self, method: str) -> int:
        if method not in self._files:
            folder = self._folder / method
            folder.mkdir(parents=True, exist_ok=True)
            self._files[method] = os.open(folder / CLAIMS, os.O_RDWR | os.O_CREAT, 0o644)
        return self._files[method]

    def take(self, method: str, seeds: list[int]) -> list[int]:
        """Claim `seeds` of `method`; returns those another process holds (left unclaimed here)."""
        held = []
        for seed in seeds if self._locking else []:
            try:
                fcntl.lockf(self._file(method), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, seed)
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EAGAIN):
                    held.append(seed)
                elif error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no locks on this filesystem
                    self._locking = False
                    return []
                else:
                    raise
        return held

    def release(self, method: str, seeds: list[int]) -> None:
        if self._locking and method in self._files:
            for seed in seeds:
                fcntl.lockf(self._files[method], fcntl.LOCK_UN, 1, seed)

    def close(self) -> None:
        """Release every claim of this object's process."""
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()


def load_record(directory: Path, identity: dict[str, Any]) -> tuple[str, dict] | None:
    """("finished", what result.json holds) or ("diverged", what diverged.json holds) for a run of this
    identity recorded in `directory`; None when nothing is recorded there yet."""
    for status, name in (("finished", RESULT), ("diverged", DIVERGED)):
        path = directory / name
        if path.exists():
            _check_identity(directory, identity)
            try:
                return status, json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise RecordError(f"unreadable record {path}: {error}; delete that run directory to redo it") from None
    return None


def load_finished(directory: Path, identity: dict[str, Any]) -> dict | None:
    """The saved result of a finished run with the same identity, None if the run is not finished."""
    record = load_record(directory, identity)
    return record[1] if record is not None and record[0] == "finished" else None


def save_run(directory: Path, identity: dict[str, Any], result: RunResult) -> dict:
    """config.json, then history.jsonl (one line per step), then result.json, which marks the run finished
    (a diverged.json left by an earlier attempt is removed). Returns what result.json holds."""
    write_atomic(directory / CONFIG, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    columns = result.history
    steps = len(columns.get("lambda1", []))
    lines = (json.dumps({"step": i, **{name: values[i] for name, values in columns.items()}}) for i in range(steps))
    write_atomic(directory / HISTORY, "".join(line + "\n" for line in lines))
    record = result.record()
    write_atomic(directory / RESULT, json.dumps(record, indent=2) + "\n")
    (directory / DIVERGED).unlink(missing_ok=True)
    return record


def save_diverged(directory: Path, identity: dict[str, Any], info: dict[str, Any]) -> dict:
    """config.json, then diverged.json: the run stopped (its message, step, metaparameters, wall time)."""
    write_atomic(directory / CONFIG, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    write_atomic(directory / DIVERGED, json.dumps(info, indent=2) + "\n")
    return info


def load_history(directory: Path) -> list[dict]:
    with open(directory / HISTORY) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _warn(message: str) -> None:
    print(f"metadistill: warning: {message}", file=sys.stderr)


REQUIRED = ("method", "seed", "final_test_acc", "wall_s", "steps", "hypergrad_evals", "full_trainings")


def _read_records(out: Path, name: str, required: tuple[str, ...], warn: Callable[[str], None]
                  ) -> dict[str, dict[str, list[dict]]]:
    found: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(Path(out).glob(f"*/*/run_*/{name}")):
        dataset, method = path.parts[-4], path.parts[-3]
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            warn(f"skipping {path}: unreadable ({type(error).__name__}: {error})")
            continue
        missing = [key for key in required if not (isinstance(record, dict) and key in record)]
        if missing:
            warn(f"skipping {path}: not a metadistill record (no {', '.join(missing)})")
            continue
        record["dir"] = str(path.parent)
        found.setdefault(dataset, {}).setdefault(method, []).append(record)
    return found


def finished_runs(out: Path, warn: Callable[[str], None] = _warn) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {method: [result, ...]}} for every finished run under `out`, ordered by seed; a torn or
    foreign result.json is skipped with a warning that names the file."""
    return _read_records(out, RESULT, REQUIRED, warn)


def diverged_runs(out: Path, warn: Callable[[str], None] = _warn) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {method: [diverged.json, ...]}} for every run recorded as diverged under `out`."""
    return _read_records(out, DIVERGED, ("message", "seed"), warn)
