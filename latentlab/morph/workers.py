"""Local worker processes for CPU renders: N single-thread processes instead of one N-thread process.

One responsibility: run "render chunk ``start`` into the frame cache" in forked worker processes that each take the
next chunk when they are free, and tell the renderer when each chunk is done.

Why: on a small CPU model, torch's threads scale poorly (measured on this project's 2-core machine: 2 threads are
1.6x one thread, not 2x), and on a shared machine a multi-threaded process can collapse (5-10x slower) when another
job takes a core, because every op waits for its slowest thread. Single-thread workers with a shared queue degrade
gracefully instead: a worker on a busy core just takes fewer chunks. Frames are identical (each frame's bits depend
on its compute batch, not on the thread count or the process: tested), and the workers write the same cache the
one-process render and the distributed render use.

Workers are forked after the model is loaded (no second start-up, weights shared copy-on-write), so this is for
POSIX CPU renders; CUDA contexts do not survive a fork, and :func:`auto_workers` never picks workers there.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
from collections.abc import Callable
from typing import Self

import torch

from latentlab.distributed import available_cores

__all__ = ["LocalWorkers", "WorkerFailed", "auto_workers"]


class WorkerFailed(RuntimeError):
    """A worker process raised or died; finished frames are in the cache."""


def auto_workers(*, device: str, n_chunks: int, world_size: int = 1) -> int:
    """How many worker processes a render should use: one per available core (at most one per chunk) for a
    CPU render with at least two chunks on a POSIX system in a single-process job; otherwise 1 (in-process)."""
    if (not device.startswith("cpu") or world_size > 1 or n_chunks < 2
            or "fork" not in mp.get_all_start_methods()):
        return 1
    return max(1, min(available_cores(), n_chunks))


def _die_with_parent(parent: int) -> None:
    """Linux: ask the kernel to send SIGTERM when the parent process dies (even by kill -9), so a worker never
    outlives its render; then check the parent did not die before that was in place."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's SIGTERM handler and daemon flag still apply
        pass
    if os.getppid() != parent:
        raise SystemExit(1)


def _loop(render_chunk: Callable[[int], tuple[int, int]], tasks, done, threads: int, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited through fork)
    while (start := tasks.get()) is not None:
        try:
            rendered, damaged = render_chunk(start)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
            done.put((start, 0, 0, f"{type(e).__name__}: {e}", os.getpid()))
            return
        done.put((start, rendered, damaged, None, os.getpid()))


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


class LocalWorkers:
    """``n`` forked processes of ``threads`` torch threads each, running ``render_chunk(start) -> (rendered,
    damaged)`` for every ``start`` given to :meth:`run`, in any order; :meth:`wait` blocks until one is done.

    Use as a context manager: leaving it (normally, on an error, or on Ctrl-C) stops every worker. While it is
    open, SIGTERM (``kill``, ``timeout``, a job scheduler) is turned into :class:`KeyboardInterrupt` in the parent so
    the workers are stopped too; a parent killed outright (SIGKILL) takes its workers with it (Linux).
    """

    def __init__(self, n: int, render_chunk: Callable[[int], tuple[int, int]], *, threads: int = 1):
        if n < 1:
            raise ValueError(f"`n` must be >= 1, got {n}")
        self.n, self.threads, self.render_chunk = n, threads, render_chunk
        self._ctx = mp.get_context("fork")
        self._procs: list = []
        self._results: dict[int, tuple[int, int]] = {}
        self.rendered_by_pid: dict[int, int] = {}  # frames each worker rendered, as chunks finish

    def __enter__(self) -> Self:
        self._tasks, self._done = self._ctx.Queue(), self._ctx.Queue()
        self._old_term = None
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _terminated)
        for _ in range(self.n):
            p = self._ctx.Process(target=_loop, args=(self.render_chunk, self._tasks, self._done, self.threads,
                                                      os.getpid()), daemon=True)
            p.start()
            self._procs.append(p)
        return self

    def run(self, starts: list[int]) -> None:
        """Queue every chunk (workers take them in this order, each as soon as it is free)."""
        for s in starts:
            self._tasks.put(s)
        for _ in self._procs:
            self._tasks.put(None)

    def wait(self, start: int) -> tuple[int, int]:
        """``(rendered, damaged)`` of chunk ``start`` once a worker finished it; raises :class:`WorkerFailed` if a
        worker failed or died first."""
        while start not in self._results:
            try:
                got, rendered, damaged, error, pid = self._done.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerFailed(f"a render worker (process {dead[0].pid}) died with exit code "
                                       f"{dead[0].exitcode}") from None
                continue
            if error:
                raise WorkerFailed(f"a render worker failed on the frames from {got}: {error}")
            self._results[got] = (rendered, damaged)
            self.rendered_by_pid[pid] = self.rendered_by_pid.get(pid, 0) + rendered
        return self._results[start]

    def __exit__(self, *exc) -> None:
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
        for p in self._procs:
            if p.is_alive() and exc[0] is not None:
                p.terminate()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        for q in (self._tasks, self._done):
            q.close()
            q.cancel_join_thread()
