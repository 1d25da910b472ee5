"""Where per-pair tasks run: in this process, a local process pool, or a Dask cluster.

Every executor has the same shape: a context manager whose :meth:`map_unordered` takes a
top-level function and a list of tasks and yields ``(task, result_or_exception)`` as tasks
finish. One task is one pair, so a worker's memory is bounded by the largest pair, and a task
that crashes its worker (out of memory, killed) is reported for that pair only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from astrid.config import PipelineSettings
from astrid.errors import AstridError


class SerialExecutor:
    """Run tasks one after the other in this process (the reference for the others)."""

    name = "serial"

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map_unordered(self, fn: Callable, tasks: Sequence) -> Iterator[tuple[Any, Any]]:
        for task in tasks:
            try:
                yield task, fn(task)
            except Exception as exc:  # noqa: BLE001  (the task function reports its own errors)
                yield task, exc


def _worker_init(parent_pid: int) -> None:
    """Make a pool worker die with the run that started it (SIGKILL included)."""
    # Without this, workers orphaned by a killed run keep writing into the run directory
    # while the rerun starts. The death signal only covers a parent alive when it is set, so
    # a worker whose run died while it was still starting up leaves at once.
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(1)


class ProcessExecutor:
    """A local process pool (``concurrent.futures``, spawn start: no inherited threads or locks).

    Spawned workers are children of the run itself, so they die with it when it is killed
    (a forkserver would keep them alive, orphaned, writing into the run directory while the
    rerun starts).
    """

    name = "processes"

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def __enter__(self) -> ProcessExecutor:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                         mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(os.getpid(),))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def map_unordered(self, fn: Callable, tasks: Sequence) -> Iterator[tuple[Any, Any]]:
        from concurrent.futures import as_completed

        futures = {self._pool.submit(fn, task): task for task in tasks}
        for future in as_completed(futures):
            exc = future.exception()
            yield futures[future], (exc if exc is not None else future.result())


class DaskExecutor:
    """Dask distributed: the scheduler at ``address``, or a LocalCluster on 127.0.0.1.

    The workers must see the run directory at the same path (a shared file system on a real
    cluster); only the orchestrating process writes the state store.
    """

    name = "dask"

    def __init__(self, workers: int, address: str | None = None, connect_timeout_s: float = 5.0):
        self.workers = workers
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._cluster = None
        self._client = None

    def __enter__(self) -> DaskExecutor:
        import logging

        from distributed import Client, LocalCluster

        # Dask logs connection retries as warnings; the one-line error below says it better.
        logging.getLogger("distributed").setLevel(logging.ERROR)
        if self.address:
            try:
                self._client = Client(self.address, timeout=f"{self.connect_timeout_s}s")
            except (OSError, TimeoutError, ValueError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise AstridError(f"pipeline.scheduler: cannot reach the Dask scheduler at "
                                  f"{self.address} ({reason})") from None
        else:
            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                         processes=True, host="127.0.0.1",
                                         dashboard_address=None, silence_logs=logging.ERROR)
            self._client = Client(self._cluster)
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close()

    def map_unordered(self, fn: Callable, tasks: Sequence) -> Iterator[tuple[Any, Any]]:
        from distributed import as_completed

        futures = {}
        for task in tasks:
            # pure=False: a task's result depends on the files, not only on its arguments.
            futures[self._client.submit(fn, task, pure=False)] = task
        for future in as_completed(list(futures)):
            task = futures.pop(future)
            try:
                yield task, future.result()
            except Exception as exc:  # noqa: BLE001  (a lost or crashed worker)
                yield task, exc
            future.release()


def preflight(settings: PipelineSettings, timeout_s: float = 5.0) -> None:
    """Check what can be checked before a run starts (a Dask scheduler that answers)."""
    if settings.executor == "dask" and settings.scheduler:
        _check_reachable(settings.scheduler, timeout_s)


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast with one line when nothing listens at a tcp:// scheduler address.

    Dask's own client keeps retrying a refused connection until its timeout; a plain socket
    answers at once and says why.
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        raise AstridError(f"pipeline.scheduler: '{address}' is not an address like "
                          "tcp://host:port")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AstridError(f"pipeline.scheduler: cannot reach the Dask scheduler at {address} "
                          f"({reason})") from None


def make_executor(settings: PipelineSettings) -> SerialExecutor | ProcessExecutor | DaskExecutor:
    """The executor named by ``pipeline.executor``."""
    if settings.executor == "serial":
        return SerialExecutor()
    if settings.executor == "processes":
        return ProcessExecutor(settings.workers)
    return DaskExecutor(settings.workers, settings.scheduler)
