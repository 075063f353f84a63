"""Run claims across real processes: exclusive while held, free again when the holder dies."""

import os
import signal
import subprocess
import sys
import time

from icl_gd.sweep.locks import RunLock

HOLD = """
import sys, time
from icl_gd.sweep.locks import RunLock
lock = RunLock(sys.argv[1])
print("got" if lock.acquire() else "busy", flush=True)
time.sleep(60)
"""


def test_claim_is_exclusive_across_processes_and_freed_by_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "got"
        mine = RunLock(str(tmp_path))
        assert not mine.acquire()
        assert mine.holder()["pid"] == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        deadline = time.time() + 10
        while not mine.acquire() and time.time() < deadline:
            time.sleep(0.05)
        assert mine.held and mine.holder()["pid"] == os.getpid()
        mine.release()
        assert not mine.held
    finally:
        holder.kill()


def test_claim_is_exclusive_within_a_process_too(tmp_path):
    a, b = RunLock(str(tmp_path)), RunLock(str(tmp_path))
    assert a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()
    b.release()
