"""Process-wide settings that make training faster without changing any result, and the Ray runtime."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed blocks of up to 32 MB instead of returning them to the system.

    Batched runs allocate activations of tens of MB every step; by default each is a fresh mmap whose
    pages are faulted in and zeroed again, which measured 15-20% of a batched step of ten Fashion-MNIST
    students here (bench/throughput.py, MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ side by side).
    The heap may keep up to 1 GB of freed memory. A no-op (returning False) off glibc.
    """
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def libc() -> ctypes.CDLL | None:
    """The C library the process runs on, on Linux (None elsewhere): the process's own symbols, so no library
    search (ctypes.util.find_library runs `ldconfig -p` in a child process, which a worker pool's driver then
    has among its children)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def require_ray(needs: str) -> Any:
    """The ray module, or ImportError saying that `needs` needs it and how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"{needs} needs ray: pip install 'metadistill[ray]'") from None
    return ray


def worker_error(error: BaseException) -> BaseException:
    """The exception a Ray worker raised, for `error` as the driver received it (a RayTaskError, from ray.get
    or a Tune trial's result): the original (a DataError, a full disk's OSError, ...), so that the command
    line reports it as it would have in process, in one line, and not as Ray's wrapper whose message is the
    worker's whole traceback. That traceback stays in the chain (`__cause__`), printed with any error the
    command line does not report in one line. Any other exception is returned as it is."""
    cause = getattr(error, "cause", None)
    if not isinstance(cause, BaseException) or cause is error:
        return error
    cause.__cause__, cause.__suppress_context__ = error, True
    return cause


@contextlib.contextmanager
def ray_runtime(address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
                needs: str = "--executor ray") -> Iterator[Any]:
    """The ray module, connected: to the cluster at `address`, to the runtime already started in this process,
    or to a local runtime of `num_cpus` CPUs (all by default) started here and shut down on leaving."""
    ray = require_ray(needs)
    started_here = not ray.is_initialized()
    if started_here:
        options = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        with _without_token_notice(), _workers_at_normal_priority(local=not address):
            ray.init(**options, log_to_driver=not quiet, configure_logging=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def _workers_at_normal_priority(local: bool) -> Iterator[None]:
    """A local runtime started here runs its workers at the caller's priority (Ray's worker niceness 0, an
    increment over the caller's: a caller at niceness 5 gets workers at 5), not at Ray's default of 15. Its
    workers do the training (pbt's members, the Ray executor's runs), and at niceness 15 they got a small share
    of any core they shared with another process, so their wall times were not comparable with the in-process
    methods'. The raylet reads RAY_worker_niceness when ray.init starts it; a value the user set is kept, and a
    cluster's (`--ray-address`) is its own."""
    if not local or _NICENESS in os.environ:
        yield
        return
    os.environ[_NICENESS] = "0"
    try:
        yield
    finally:
        os.environ.pop(_NICENESS, None)


_NICENESS = "RAY_worker_niceness"
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_NOTICE)


@contextlib.contextmanager
def _without_token_notice() -> Iterator[None]:
    """Ray's notice, at every start of a local runtime, that it turned on token authentication (its secure
    default, which stays on) is not printed. Every other line of that logger still is: the warning that a
    cluster runs without authentication, say."""
    logger, notice = logging.getLogger(_TOKEN_LOGGER), _DropTokenNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
