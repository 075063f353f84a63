"""Turn a hang into an error: a guarded stage that runs past its deadline ends the process.

Why: a wedged XLA call (docs/XLA_CPU_HANG.md) waits at 0% CPU for ever, and Python cannot
interrupt it: the main thread is inside C++ (``BlockUntilReady``). A watchdog thread still runs;
when a stage passes its deadline it names the stage, dumps every thread's Python stack
(faulthandler) and exits with ``EXIT_HANG`` = 124, the code of coreutils ``timeout``. The
launchers write each finished stage to disk (checkpoints, per-member rows, run summaries), so
re-running the same command resumes at the stage that hung.

The library marks its long blocking calls with ``stage(name)``; they are unguarded until a
launcher calls ``configure(seconds)`` (``--watchdog_s``), so a notebook is never killed.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
from collections.abc import Iterator

EXIT_HANG = 124
DEFAULT_TIMEOUT_S = 1800.0  # far above any single stage of the launchers at paper scale on a 2-core CPU

_timeout_s = 0.0  # 0: stages are not guarded


def configure(timeout_s: float) -> None:
    """Guard every later ``stage`` with ``timeout_s`` seconds (0 turns the watchdog off)."""
    global _timeout_s
    if timeout_s < 0:
        raise ValueError(f"watchdog timeout must be >= 0 seconds, got {timeout_s}")
    _timeout_s = float(timeout_s)


def _expire(name: str, seconds: float) -> None:
    sys.stderr.write(
        f"\nerror: stage '{name}' did not finish within {seconds:g}s (--watchdog_s): the process is hung, "
        "not slow (see docs/XLA_CPU_HANG.md). Everything finished before this stage is saved; re-run the "
        "same command to resume here. Python stacks of every thread:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_HANG)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run the body under the watchdog: past the configured timeout the process exits with EXIT_HANG."""
    seconds = _timeout_s
    if seconds <= 0:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            _expire(name, seconds)

    thread = threading.Thread(target=watch, name=f"watchdog: {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
