"""Benchmark: a 16-member sweep group trained vmapped (one program) vs member by member.

    python -m benchmarks.sweep_vmap [--steps=200 --batch_size=64 --repeats=5 --out=FILE.json]
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.sweep_vmap  # + sharded


Both sides run the same training steps of the same 16 members (2 covariances x 2 noises x 4
seeds): the vmapped side is ``sweep.make_group_fns(rep).chunk`` (what ``launch.sweep`` runs),
the sequential side is the single-run program of ``train.train`` (jit of
``make_train_chunk`` with donated state) called once per member; it compiles once, since the
members differ only in arguments. Compile time is measured separately (``lower().compile()``)
and excluded from the step timings; each timing is the median of ``--repeats`` runs (the two sides
alternate run by run, so both see the same load), and the outputs are blocked on before the clock
stops. With several devices (e.g. host CPU devices
forced by XLA_FLAGS) a third timing shards the vmapped members over them (``devices.member_mesh``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from icl_gd import devices, sweep
from icl_gd.config import Config
from icl_gd.data import distribution
from icl_gd.keys import run_keys
from icl_gd.optim import make_optimizer
from icl_gd.train import init_state, make_train_chunk

flags.DEFINE_integer("d", 5, "Covariate dimension.")
flags.DEFINE_integer("n", 20, "Context length.")
flags.DEFINE_integer("batch_size", 64, "Tasks per step per member.")
flags.DEFINE_integer("steps", 200, "Training steps per timed run (one compiled call).")
flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
flags.DEFINE_string("out", "benchmarks/sweep_vmap.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS


def members(base: Config) -> list[Config]:
    """The 16 members: isotropic/cond10 x noise 0/0.5 x seeds 0..3 (one group)."""
    out = sweep.expand(base, sweep.Axes(covariances=("isotropic", "cond10"), noises=(0.0, 0.5), seeds=(0, 1, 2, 3)))
    assert len(out) == 16 and len(sweep.group(out)) == 1
    return out


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        args = fn.fresh()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


class _Vmapped:
    def __init__(self, ms: list[Config], steps: int, mesh: jax.sharding.Mesh | None = None):
        rep = sweep.group_key(ms[0])
        self.mesh = mesh
        self.states = devices.stack([init_state(c, make_optimizer(c)) for c in ms])
        self.dists = devices.place(devices.stack([distribution(c) for c in ms]), mesh)
        self.keys = devices.place(devices.stack([run_keys(c.seed)["train"] for c in ms]), mesh)
        fn = sweep.make_group_fns(rep).chunk
        t0 = time.perf_counter()
        self.compiled = fn.lower(self.fresh()[0], self.dists, self.keys, length=steps).compile()
        self.compile_seconds = time.perf_counter() - t0

    def fresh(self):
        return (devices.place(self.states, self.mesh),)

    def __call__(self, state):
        return self.compiled(state, self.dists, self.keys)


class _Sequential:
    def __init__(self, ms: list[Config], steps: int):
        rep = sweep.group_key(ms[0])
        self.states = [init_state(c, make_optimizer(c)) for c in ms]
        self.dists = [distribution(c) for c in ms]
        self.keys = [run_keys(c.seed)["train"] for c in ms]
        fn = jax.jit(make_train_chunk(rep, make_optimizer(rep)), static_argnames="length", donate_argnums=0)
        t0 = time.perf_counter()
        self.compiled = fn.lower(self.fresh()[0][0], self.dists[0], self.keys[0], length=steps).compile()
        self.compile_seconds = time.perf_counter() - t0

    def fresh(self):
        return ([jax.tree.map(lambda x: x.copy(), s) for s in self.states],)

    def __call__(self, states):
        return [self.compiled(s, d, k) for s, d, k in zip(states, self.dists, self.keys, strict=True)]


def main(argv: list[str]) -> None:
    del argv
    base = Config(d=FLAGS.d, n=FLAGS.n, batch_size=FLAGS.batch_size, steps=FLAGS.steps, lr=1e-2)
    ms = members(base)
    vm, sq = _Vmapped(ms, FLAGS.steps), _Sequential(ms, FLAGS.steps)
    # Same numbers either way (a correctness guard on what is being timed).
    v_state, v_loss = vm(*vm.fresh())
    s_out = sq(*sq.fresh())
    np.testing.assert_allclose(np.asarray(v_loss), np.stack([np.asarray(l) for _, l in s_out]), rtol=2e-3, atol=1e-5)
    t_vm, t_sq = [], []
    for _ in range(FLAGS.repeats):  # interleaved, so both sides see the same load from other processes
        t_vm += _timed(vm, 1)
        t_sq += _timed(sq, 1)
    sharded = None
    if jax.device_count() > 1 and len(ms) % jax.device_count() == 0:
        sh = _Vmapped(ms, FLAGS.steps, devices.member_mesh())
        t_sh = _timed(sh, FLAGS.repeats)
        sharded = {"sharded_seconds_median": statistics.median(t_sh), "sharded_seconds_all": t_sh,
                   "sharded_compile_seconds": sh.compile_seconds,
                   "sharded_speedup": statistics.median(t_sq) / statistics.median(t_sh)}
    result = {
        "members": len(ms), "steps": FLAGS.steps, "d": FLAGS.d, "n": FLAGS.n, "batch_size": FLAGS.batch_size,
        "repeats": FLAGS.repeats,
        "vmapped_seconds_median": statistics.median(t_vm), "sequential_seconds_median": statistics.median(t_sq),
        "vmapped_seconds_all": t_vm, "sequential_seconds_all": t_sq,
        "vmapped_compile_seconds": vm.compile_seconds, "sequential_compile_seconds": sq.compile_seconds,
        "speedup": statistics.median(t_sq) / statistics.median(t_vm),
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "jax": jax.__version__, "loadavg_1_5_15min": list(os.getloadavg()),
        **(sharded or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"16 members x {FLAGS.steps} steps (d={FLAGS.d}, n={FLAGS.n}, batch {FLAGS.batch_size}):")
    print(f"  vmapped    {result['vmapped_seconds_median']:.3f}s  (compile {vm.compile_seconds:.2f}s, excluded)")
    print(f"  sequential {result['sequential_seconds_median']:.3f}s  (compile {sq.compile_seconds:.2f}s, excluded)")
    if sharded:
        print(f"  sharded over {jax.device_count()} devices {sharded['sharded_seconds_median']:.3f}s  "
              f"(speedup {sharded['sharded_speedup']:.2f}x)")
    print(f"  speedup    {result['speedup']:.2f}x   -> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
