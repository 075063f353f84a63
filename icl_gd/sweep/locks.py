"""Per-run claim locks, so concurrent sweep processes never train the same member twice.

A claim is an exclusive ``fcntl.flock`` on ``WORKDIR/.lock``. The kernel drops the lock when
its process exits for any reason (SIGKILL included), so a stale claim needs no recovery step:
the next process simply gets it. The file itself records who holds it (host, pid, time) for
people; its presence alone means nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time


class RunLock:
    """A non-blocking exclusive claim on one run folder. ``acquire()`` is False when another
    live process holds it; ``release()`` (or process exit) frees it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        self._fd = fd
        return True

    def holder(self) -> dict | None:
        """Who last claimed the run (informational)."""
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
