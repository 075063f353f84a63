"""Benchmark: the whole training loop (``train.train``: eval, logging, checkpoints) against its step.

    python -m benchmarks.loop_efficiency [--out=benchmarks/loop_efficiency.json]

For each (depth, batch), ``train.train`` runs twice into fresh workdirs with the default
bookkeeping (held-out set of ``eval_tasks`` every ``log_every`` steps, a checkpoint every
``checkpoint_every``), for ``short`` and ``long`` steps; the marginal rate
(long - short) * batch / (t_long - t_short), from the medians of ``repeats`` timed pairs, cancels
start-up; an untimed warm-up of each config first takes compilation and the in-process caches
(end-of-run references) out of both. The bench step
(``benchmarks.suite.time_train_step``: the scanned step alone) is timed in the same process
right after, so the ratio sees the same machine. Goal: marginal >= 0.85 x the step's tasks/s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import jax
from absl import app, flags, logging

from benchmarks.suite import load_average, time_train_step
from icl_gd.config import Config
from icl_gd.train import train

flags.DEFINE_string("out", "benchmarks/loop_efficiency.json", "Where to write the JSON results.")
flags.DEFINE_integer("short", 500, "Steps of the short run.")
flags.DEFINE_integer("long", 2500, "Steps of the long run.")
flags.DEFINE_integer("repeats", 3, "Timed (short, long) pairs per case; the medians are used.")
FLAGS = flags.FLAGS

CASES = ((1, 2048), (3, 4000))  # (depth, batch) at d=5, n=20, as in the measurements
GOAL = 0.85


def _train_seconds(cfg: Config) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        train(cfg, workdir, log=lambda _: None)
        return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    del argv
    rows = []
    for depth, batch in CASES:
        base = Config(d=5, n=20, depth=depth, batch_size=batch, steps=FLAGS.short).validate()
        long = dataclasses.replace(base, steps=FLAGS.long)
        # Untimed warm-ups of both: the compiled programs (per config) and the end-of-run references
        # (per distribution) are cached in the process, so a first run alone would pay them and bias
        # the difference of the two timed runs.
        for cfg in (base, long):
            _train_seconds(cfg)
        pairs = [(_train_seconds(base), _train_seconds(long)) for _ in range(FLAGS.repeats)]
        t_short, t_long = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        marginal = (FLAGS.long - FLAGS.short) * batch / (t_long - t_short)
        step = time_train_step(base, steps=20, repeats=7)
        row = {"depth": depth, "batch_size": batch, "short_steps": FLAGS.short, "long_steps": FLAGS.long,
               "short_seconds": t_short, "long_seconds": t_long, "pairs": pairs, "marginal_tasks_per_s": marginal,
               "step_tasks_per_s": step["tasks_per_s"], "ratio": marginal / step["tasks_per_s"],
               "eval_tasks": base.eval_tasks, "log_every": base.log_every, "checkpoint_every": base.checkpoint_every}
        row["meets_goal"] = row["ratio"] >= GOAL
        rows.append(row)
        logging.info("L=%d B=%d: loop %.3g tasks/s, step %.3g tasks/s, ratio %.2f", depth, batch, marginal,
                     step["tasks_per_s"], row["ratio"])
    out = {"cases": rows, "goal": GOAL, "jax": jax.__version__, "backend": jax.default_backend(),
           "cpu_count": os.cpu_count(), "machine": platform.machine(), "load_average_end": load_average()}
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
