"""Benchmark: what keeping LAPACK out of the held-out XLA program costs (docs/XLA_CPU_HANG.md).

    python -m benchmarks.heldout_baselines [--repeats=5 --max_steps=3 --out=FILE.json]

Times ``baselines.heldout_squared_errors`` on the default held-out set (65536 tasks, d=5, n=20)
two ways, in one process, alternating, median of ``--repeats`` after a warm-up call:

* ``host`` (what icl-gd runs): zero, GD/PGD and the model in one XLA program; OLS and the
  posterior mean in NumPy float64 on host copies of the same chunks.
* ``xla`` (the old layout): every predictor, the two LAPACK ones included (``jnp.linalg.pinv``
  and ``jnp.linalg.solve``), in one XLA program. That layout can wedge XLA:CPU for ever; it is
  timed at noise 0, where it finished in every trial, and each call is guarded by the watchdog.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from icl_gd import watchdog
from icl_gd.config import Config
from icl_gd.data import Tasks, distribution
from icl_gd.theory import baselines

flags.DEFINE_integer("repeats", 5, "Timed calls per layout (median reported).")
flags.DEFINE_integer("max_steps", 3, "Largest k of the GD/PGD baselines in the predictor stack.")
flags.DEFINE_string("out", "benchmarks/heldout_baselines.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS


def _xla_ols(tasks: Tasks) -> jax.Array:
    w = jnp.einsum("bdn,bn->bd", jnp.linalg.pinv(tasks.x), tasks.y)
    return jnp.einsum("bd,bd->b", tasks.x_query, w)


def _xla_noiseless_bayes(tasks: Tasks, omega_sqrt: jax.Array) -> jax.Array:
    xo = tasks.x @ omega_sqrt
    w = jnp.einsum("de,be->bd", omega_sqrt, jnp.einsum("bdn,bn->bd", jnp.linalg.pinv(xo), tasks.y))
    return jnp.einsum("bd,bd->b", tasks.x_query, w)


def _layouts(cfg: Config) -> dict[str, list[baselines.Predictor]]:
    host, _ = baselines.baseline_predictors(cfg, FLAGS.max_steps, num_tune_tasks=4096)
    omega_sqrt = jnp.asarray(np.asarray(distribution(cfg).prior_sqrt), jnp.float32)
    swap = {"ols": baselines.Predictor("ols", _xla_ols),
            "bayes": baselines.Predictor("bayes", _xla_noiseless_bayes, (omega_sqrt,))}
    return {"host": host, "xla": [swap.get(p.name, p) for p in host]}


def main(argv: list[str]) -> None:
    del argv
    watchdog.configure(300)
    cfg = Config(noise=0.0).validate()
    layouts = _layouts(cfg)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    losses = {}
    for name, preds in layouts.items():  # warm-up: compile
        errs = baselines.heldout_squared_errors(cfg, preds)
        losses[name] = {k: float(v.mean()) for k, v in errs.items()}
    for _ in range(FLAGS.repeats):
        for name, preds in layouts.items():
            t0 = time.perf_counter()
            baselines.heldout_squared_errors(cfg, preds)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"config": {"d": cfg.d, "n": cfg.n, "eval_tasks": cfg.eval_tasks, "noise": cfg.noise,
                      "max_steps": FLAGS.max_steps},
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                       "backend": jax.default_backend(), "load_average": os.getloadavg()},
           "seconds": times, "median_s": med, "host_over_xla": med["host"] / med["xla"], "losses": losses}
    for name in layouts:
        print(f"{name:5s} median {med[name]:.3f}s  (all: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"host / xla = {out['host_over_xla']:.2f}   load average {os.getloadavg()}")
    print("OLS loss host vs xla:", losses["host"]["ols"], losses["xla"]["ols"])
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    app.run(main)
