"""Benchmark: re-running a finished sweep (every member trained and aggregated).

    python -m benchmarks.sweep_rerun [--out=benchmarks/sweep_rerun.json]

Trains an 8-member sweep (2 covariances x 2 noises x depths 1, 2; d=5, n=20, batch 1024, 1000
steps) with ``launch.sweep`` once, then times the identical command ``--repeats`` times as a
subprocess (wall time of the whole command: interpreter start, flag parsing, the up-to-date
check). The goal is under 2 s; the training time of the first invocation is recorded beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("out", "benchmarks/sweep_rerun.json", "Where to write the JSON results.")
flags.DEFINE_integer("repeats", 5, "Timed re-runs; the median is reported.")
FLAGS = flags.FLAGS

GRID = ["--covariances=isotropic,cond10", "--noises=0,0.5", "--depths=1,2", "--steps=1000", "--batch_size=1024",
        "--d=5", "--n=20"]
GOAL_SECONDS = 2.0


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launch.sweep", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    del argv
    with tempfile.TemporaryDirectory() as root:
        args = [f"--workdir={root}", *GRID]
        first = _run(args)
        reruns = [_run(args) for _ in range(FLAGS.repeats)]
    out = {"members": 8, "grid": GRID, "first_run_seconds": first, "rerun_seconds_median": statistics.median(reruns),
           "rerun_seconds_all": reruns, "goal_seconds": GOAL_SECONDS, "cpu_count": os.cpu_count(),
           "load_average_end": list(os.getloadavg())}
    out["meets_goal"] = out["rerun_seconds_median"] < GOAL_SECONDS
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"8-member sweep: first run (train + aggregate) {first:.1f} s, re-run median "
          f"{out['rerun_seconds_median']:.2f} s over {FLAGS.repeats} -> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
