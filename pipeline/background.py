"""A background writer: one thread that runs write jobs in order, behind a bounded queue.

Stage one hands each finished shard to this thread, so HDF5 writes, fsyncs and hashing overlap
with the next forward passes. The queue is bounded, so a slow disk makes the producer wait instead
of holding an unbounded number of shards in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from types import TracebackType
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Jobs that may wait in the queue. With one job running, at most this many plus one shards are
# held by the writer besides the one the extraction loop is filling.
DEFAULT_MAX_PENDING = 2
_STOP = object()


class BackgroundWriter:
    """Run ``submit``-ted jobs one at a time on a worker thread, in submission order.

    Use it as a context manager. Leaving the block waits until every submitted job has run, so no
    finished shard is lost when the extraction loop raises. The first error of a job is raised
    again in the caller on the next ``submit`` or on leaving the block. The jobs after it are
    dropped, because a failed write (a full disk, say) would most likely fail again.
    """

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} is invalid: use 1 or more.")
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None  # raised once in the caller, then cleared
        self._failed = False  # stays True after the first error, so later jobs are dropped
        self._thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)``, waiting while the queue is full."""
        self._raise_error()
        self._queue.put((function, args))

    def close(self) -> None:
        """Wait for every queued job, stop the thread, and raise the first job error, if any."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        if error is None:
            self.close()
            return
        # The block already failed: finish the queued writes, log a write error, and let the
        # block's own error propagate.
        try:
            self.close()
        except Exception as write_error:  # noqa: BLE001 - the original error takes precedence
            logger.error("A background write also failed: %s: %s", type(write_error).__name__, write_error)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            function, args = job
            if self._failed:
                continue
            try:
                function(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                self._failed = True
                self._error = error
