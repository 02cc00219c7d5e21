"""One background worker per widget that keeps only the latest request (widgets layer, private).

A slider dragged across twenty positions queues twenty renders in a naive widget; here a new request replaces the
one still waiting, so the image always catches up with the last position. Work runs on a daemon thread, never
blocking the kernel; ``on_busy(True/False)`` drives a busy indicator and exceptions go to ``on_error`` (shown in the
widget: a traceback in a thread would be lost).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class LatestWorker:
    def __init__(self, on_busy: Callable[[bool], None], on_error: Callable[[BaseException], None]):
        self._on_busy, self._on_error = on_busy, on_error
        self._cond = threading.Condition()
        self._pending: Callable[[], None] | None = None
        self._running = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="latentlab-widget")
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` soon; a request still waiting is dropped in its favour."""
        with self._cond:
            self._pending = fn
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                fn, self._pending = self._pending, None
                self._running = True
            self._on_busy(True)
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every error is shown in the widget
                self._on_error(e)
            finally:
                with self._cond:
                    self._running = False
                    idle = self._pending is None
                    self._cond.notify_all()
                if idle:
                    self._on_busy(False)

    def quiet(self, seconds: float) -> bool:
        """From inside a job: wait up to ``seconds`` for a new request; True if none came (the user has stopped
        moving the control), False as soon as one does."""
        with self._cond:
            return not self._cond.wait_for(lambda: self._pending is not None, seconds)

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until nothing is pending or running (tests and scripts); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._running, timeout)
