"""Run a function over a stream of work items on several cores, results in input order.

Local processes by default (`spawn`, not `fork`: the caller — Prefect, MLflow — may have threads
running); a Dask cluster when an address is configured (`"local"` starts a LocalCluster on this
machine). A bounded window of in-flight items keeps memory flat however long the stream is.
Results come back in input order, so outputs are identical whatever the worker count or engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _exit_with_parent() -> None:
    """Worker initializer: on Linux, have the kernel stop this worker if the stage process is killed,
    so a `kill -9` of a stage never leaves orphaned workers holding memory."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux/glibc: workers exit when they find their task queue closed
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def _executor(workers: int, dask_address: str | None) -> Iterator[tuple[Executor, int]]:
    """(executor, how many tasks it runs at once): local processes, a LocalCluster, or a Dask cluster."""
    if dask_address:
        from distributed import Client, LocalCluster

        if dask_address == "local":
            with (
                LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
                Client(cluster) as client,
            ):
                yield client.get_executor(), workers
        else:
            with Client(dask_address) as client:
                yield client.get_executor(), max(1, sum(client.nthreads().values()))  # the cluster's size
        return
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_exit_with_parent
    ) as pool:
        yield pool, workers


def ordered_map(
    function: Callable[..., R],
    items: Iterable[tuple[Any, ...]],
    workers: int = 0,
    dask_address: str | None = None,
) -> Iterator[R]:
    """Yield `function(*item)` for each item, in order. workers=0 means all CPUs; 1 runs in-process."""
    workers = workers or available_cpus()
    if workers == 1 and not dask_address:
        for item in items:
            yield function(*item)
        return
    with _executor(workers, dask_address) as (executor, slots):
        window: deque[Future[R]] = deque()
        for item in items:
            window.append(executor.submit(function, *item))
            if len(window) >= 2 * slots:  # keep every slot busy, memory bounded
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
