"""What results depend on beyond their settings: the code version, and fingerprints of data tensors."""

from __future__ import annotations

import ast
import functools
import hashlib
from importlib import resources
from typing import Any

import torch
from torch import Tensor

PACKAGE_VERSION = "0.1.0"
# Modules that only present, store or schedule results; a change to them never changes a number.
PRESENTATION = {"__init__.py", "cli.py", "report.py", "plots.py", "records.py", "ray_executor.py", "runtime.py",
                "identity.py", "files.py"}
FINGERPRINT_SAMPLES = 65536  # evenly spaced elements of each tensor hashed byte for byte


def _normalised(source: str) -> str:
    """The module's syntax tree without docstrings: comments, docstrings and layout do not count."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """"<package version>+<12 hex digits>": a hash of the code of every module that computes results (all but
    the presentation and storage modules), taken over syntax trees, so that comments and docstrings do not
    change it. Records and checkpoints made by different code are never mixed."""
    root = resources.files("metadistill")
    digest = hashlib.sha256()
    files = sorted([("", entry) for entry in root.iterdir()] + [("data/", entry) for entry in root.joinpath(
        "data").iterdir()], key=lambda pair: pair[0] + pair[1].name)
    for prefix, entry in files:
        if entry.name.endswith(".py") and not (prefix == "" and entry.name in PRESENTATION):
            digest.update(f"{prefix}{entry.name}\n{_normalised(entry.read_text())}\n".encode())
    return f"{PACKAGE_VERSION}+{digest.hexdigest()[:12]}"


def tensor_fingerprint(t: Tensor) -> dict[str, Any]:
    """Shape, dtype, an exact checksum and a strided sample hash of `t`, equal on every device and thread count.

    The checksum sums the raw bit patterns as int64 (exact and order-free, unlike a float sum), so any changed
    element changes it; the hash of evenly spaced elements also catches reordering.
    """
    flat = t.detach().reshape(-1)
    bits = flat.view(torch.int32) if flat.dtype == torch.float32 else flat
    checksum = sum(int(chunk.to(torch.int64).sum()) for chunk in bits.split(1 << 22))
    count = min(FINGERPRINT_SAMPLES, flat.numel())
    # Integer arithmetic: a float linspace rounds past the last index on tensors of tens of millions of elements.
    index = torch.arange(count, device=flat.device) * max(flat.numel() - 1, 0) // max(count - 1, 1)
    sample = flat[index].cpu().contiguous().numpy().tobytes()
    return {"shape": list(t.shape), "dtype": str(t.dtype), "checksum": checksum,
            "sample_sha256": hashlib.sha256(sample).hexdigest()}
