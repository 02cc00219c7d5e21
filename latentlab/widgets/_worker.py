"""One background worker per widget that keeps only the latest request of each kind (widgets layer, private).

A slider dragged across twenty positions queues twenty renders in a naive widget; here a new request replaces the
one of its kind still waiting, so the image always catches up with the last position. Requests of different kinds
(``tag``: "live" frames that follow a control, a strip, ...) do not drop each other: they wait their turn, in the
order their kind first asked. An untagged request is never dropped (a kind of its own): dropping is what a caller
asks for by naming the kind, never a side effect of two unrelated requests both leaving the tag out. Work runs on a daemon thread, never blocking the kernel; ``on_busy(True/False)`` drives
a busy indicator and exceptions go to ``on_error`` (shown in the widget: a traceback in a thread would be lost).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable


class LatestWorker:
    def __init__(self, on_busy: Callable[[bool], None], on_error: Callable[[BaseException], None]):
        self._on_busy, self._on_error = on_busy, on_error
        self._cond = threading.Condition()
        self._pending: dict[object, Callable[[], None]] = {}  # one waiting request per tag, oldest kind first
        self._untagged = itertools.count()
        self._running = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="latentlab-widget")
        self._thread.start()

    def submit(self, fn: Callable[[], None], *, tag: str | None = None) -> None:
        """Run ``fn`` soon; a request of the same ``tag`` still waiting is dropped in its favour (e.g. "live" for a
        frame that follows a moving control). Without a tag, ``fn`` waits its turn and always runs."""
        with self._cond:
            self._pending[tag if tag is not None else _Untagged(next(self._untagged))] = fn
            self._cond.notify_all()

    @property
    def pending_tags(self) -> frozenset:
        """The tags of the requests waiting to run (untagged ones not included)."""
        with self._cond:
            return frozenset(k for k in self._pending if not isinstance(k, _Untagged))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                fn = self._pending.pop(next(iter(self._pending)))
                self._running = True
            self._on_busy(True)
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every error is shown in the widget
                self._on_error(e)
            finally:
                with self._cond:
                    self._running = False
                    idle = not self._pending
                    self._cond.notify_all()
                if idle:
                    self._on_busy(False)

    def quiet(self, seconds: float) -> bool:
        """From inside a job: wait up to ``seconds`` for a new request; True if none came (the user has stopped
        moving the control), False as soon as one does (or one already waits)."""
        with self._cond:
            return not self._cond.wait_for(lambda: bool(self._pending), seconds)

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until nothing is pending or running (tests and scripts); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._running, timeout)


class _Untagged(int):
    """The key of an untagged request: unique, so it never replaces another."""
