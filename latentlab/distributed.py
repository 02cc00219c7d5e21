"""Several processes, one job: which share of the work is this process's, and the few collectives the renderers need.

One responsibility, and the only module that imports accelerate (lazily, and only when a launcher started more
than one process). Under ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun --nproc-per-node N``)
every process runs the same command; :func:`ranks` tells each one its ``rank`` and the ``world_size``, the renderers
split their work by it, exchange results through the shared filesystem (the content-addressed frame cache) and the
small collectives here, and rank 0 writes the final files.

- On a machine without CUDA the processes talk over gloo (``PartialState(cpu=True)``: without it, each process of a
  GPU-less launch believes it is rank 0 of 1 and renders everything).
- With CUDA, each process is pinned to ``cuda:LOCAL_RANK`` before any model is loaded, so ``device="cuda"`` means
  that process's own GPU.
- A single process (no launcher) never imports accelerate: :func:`ranks` returns rank 0 of 1, and the collectives are
  the identity.

Examples
--------
>>> r = ranks()
>>> (r.rank, r.world_size, r.is_main)
(0, 1, True)
>>> r.share(10, block=4)   # the items of blocks 0, 1, 2 (rank 0 of 1 owns every block)
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

__all__ = ["Ranks", "available_cores", "launched", "ranks", "shutdown"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launched() -> bool:
    """True when a launcher (accelerate, torchrun) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` in ``[0, world_size)``."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the final files."""
        return self.rank == 0

    def share(self, n: int, *, block: int = 1) -> list[int]:
        """The indices of ``range(n)`` this rank works on: blocks of ``block`` consecutive items, dealt round-robin
        (block ``j`` goes to rank ``j % world_size``), so every rank's calls are full compute batches and the ranks'
        shares partition ``range(n)`` exactly.

        >>> Ranks(1, 2).share(10, block=3)
        [3, 4, 5, 9]
        """
        if block < 1:
            raise ValueError(f"`block` must be >= 1, got {block}")
        return [i for i in range(n) if (i // block) % self.world_size == self.rank]

    def block(self, n: int, batch: int) -> int:
        """The block size for sharing ``n`` items by :meth:`share`: ``batch``, but no more than an equal share, so
        that a short job still gives every rank work.

        >>> Ranks(0, 2).block(12, 16), Ranks(0, 2).block(64, 16), Ranks().block(5, 16)
        (6, 16, 5)
        """
        return max(1, min(batch, -(-n // self.world_size)))

    def map_blocks(self, fn, n: int, *, block: int):
        """Run ``fn(indices)`` (returning a tensor, or a tuple of tensors, with one row per index) on this rank's
        blocks of ``range(n)`` (:meth:`share`), and return every rank's rows in index order, on every rank: one
        tensor (or a tuple of them, like ``fn``'s).

        >>> Ranks().map_blocks(lambda idx: torch.tensor(idx) * 10, 5, block=2)
        tensor([ 0, 10, 20, 30, 40])
        """
        mine = self.share(n, block=block)
        parts = []
        for k in range(0, len(mine), block):  # whole blocks (only the last block of range(n) may be shorter)
            idx = mine[k : k + block]
            parts.append((idx[0], fn(idx)))
        if self.world_size > 1:
            parts = [part for rank_parts in self.gather(parts) for part in rank_parts]
        ordered = [t for _, t in sorted(parts, key=lambda p: p[0])]
        if isinstance(ordered[0], tuple):
            return tuple(torch.cat(column) for column in zip(*ordered))
        return torch.cat(ordered)

    def barrier(self) -> None:
        """Wait until every rank reaches this point (no-op for one process)."""
        if self.world_size > 1:
            _state().wait_for_everyone()

    def gather(self, obj):
        """Every rank's ``obj`` (picklable), as a list indexed by rank, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_checked(self, value, error: str | None, *, failed: str, kept: str) -> list:
        """Every rank's ``value``, on every rank -- unless some rank reports an ``error`` (this rank's failure, or
        None): then every rank raises one RuntimeError naming each failure, so no process waits for one that is gone.
        ``failed`` says what failed and ``kept`` what was kept for the resume.

        >>> Ranks().gather_checked(3, None, failed="the job failed", kept="nothing")
        [3]
        """
        results = self.gather((value, None if error is None else f"rank {self.rank}: {error}"))
        errors = [err for _, err in results if err]
        if errors:
            raise RuntimeError(f"{failed} ({'; '.join(errors)}); {kept}: run the same command again to resume")
        return [v for v, _ in results]

    def finish(self, error: BaseException | None = None, *, failed: str) -> None:
        """The job's last collective: every rank calls it once when its part is done -- rank 0 after writing the
        final files, with the exception that writing raised (or None) -- so that the ranks leave the process group
        together (a rank that exits while another still works can abort in gloo's teardown) and every rank learns
        whether rank 0 succeeded. On another rank that has no ``error`` of its own, rank 0's failure raises a RuntimeError
        naming it (``failed`` says what failed); a rank with an ``error`` returns and re-raises its own.

        >>> Ranks().finish(failed="writing the video failed")  # one process: nothing to wait for
        """
        if self.world_size == 1:
            return
        mine = None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}"
        errors = [err for err in self.gather(mine) if err]
        if errors and error is None and not self.is_main:
            raise RuntimeError(f"{failed} ({'; '.join(errors)})")

    @contextmanager
    def together(self, *, failed: str):
        """A block every rank runs to its end and leaves together: on the way out, each rank calls :meth:`finish`
        with the exception the block raised (or None), so a rank whose part ends early (it returns while rank 0
        still writes the files) waits for rank 0, and learns whether it succeeded.

        >>> with Ranks().together(failed="the job failed"):
        ...     pass
        """
        try:
            yield self
        except BaseException as e:
            self.finish(e, failed=failed)
            raise
        self.finish(failed=failed)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


@cache
def _state():
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    # Leave the group while the interpreter is still whole: a process that exits with it alive (a rank that finished
    # its share while rank 0 still writes the video) can abort in gloo's teardown ("terminate called without an
    # active exception", SIGABRT), which fails the whole launch although every frame was written.
    atexit.register(shutdown)
    if not cpu:
        torch.cuda.set_device(state.local_process_index)
    else:
        # N processes on one machine share its cores: never oversubscribe them (torchrun sets OMP_NUM_THREADS=1,
        # forked launchers do not). Setting it before any torch op also keeps a forked process clear of the OpenMP
        # thread pool its parent may have started (GNU OpenMP hangs in a forked child that uses the parent's pool).
        # processes on this machine: LOCAL_WORLD_SIZE (torchrun), else all of them (a forked launcher sets it to 1)
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", "1")) or 1)
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), state.num_processes // max(1, nodes))
        torch.set_num_threads(max(1, available_cores() // max(1, local)))
    return state


def ranks() -> Ranks:
    """This process's :class:`Ranks`; sets up the process group on first call when launched (idempotent)."""
    if not launched():
        return Ranks()
    s = _state()
    return Ranks(s.process_index, s.num_processes)


def shutdown() -> None:
    """Leave the process group, if this process joined one (no-op otherwise; safe to call twice).

    Registered to run at exit by the first :func:`ranks` call of a launched process; call it yourself to leave
    earlier. Local to this process: it waits for no other rank.

    >>> shutdown()  # one process: nothing to leave
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _state.cache_clear()
