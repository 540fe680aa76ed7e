"""Atomic file writes: a reader sees a file absent, old or complete, never torn."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: Path, payload: str | bytes) -> None:
    """Write via a temporary file in the same directory and os.replace, so `path` is absent, old or complete.

    The temporary name is unique per writer (two processes may write the same file), and it is created
    with the umask's permissions (tempfile's 0600 would hide shared caches and records from others).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "wb") as handle:
            handle.write(payload.encode() if isinstance(payload, str) else payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
