"""Training: fresh tasks every step, many steps per compiled call, one loop for every caller.

``chunk_loop`` is the only training loop: ``train`` runs it for one run, ``sweep.train_group``
for a vmapped group of members. The key streams (``icl_gd.keys``) make a resumed run bitwise
the uninterrupted one; the optimiser comes from ``icl_gd.optim``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from icl_gd import devices, resources, theory, watchdog
from icl_gd.checkpoint import Checkpointer, check_same_run, disk_full, write_config
from icl_gd.config import Config
from icl_gd.data import Distribution, Tasks, TaskSpec, distribution, sample_tasks
from icl_gd.errors import NonFiniteLossError, Preempted, RunBusyError, UnreadableRunError  # noqa: F401
from icl_gd.keys import eval_chunks, heldout_stored, run_keys
from icl_gd.loss import task_loss
from icl_gd.metrics import open_writer
from icl_gd.model import Params, init_params
from icl_gd.optim import make_optimizer
from icl_gd.theory.baselines import depth_references
from icl_gd.theory.probes import one_step_summary


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Params
    opt_state: Any


class SigtermFlag:
    """SIGTERM (scheduler pre-emption) -> a flag checked at every compiled-call boundary, so a
    run (or a sweep group) saves a checkpoint at the step it reached and stops (``Preempted``).
    Outside the main thread it installs nothing (signals are delivered there only)."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        self.set = True

    def __exit__(self, *_: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainResult:
    config: Config
    state: TrainState
    history: list[dict]
    summary: dict


def init_state(cfg: Config, optimizer: optax.GradientTransformation | None = None) -> TrainState:
    optimizer = optimizer or make_optimizer(cfg)
    params = init_params(run_keys(cfg.seed)["init"], cfg)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_chunk(cfg: Config, optimizer: optax.GradientTransformation) -> Callable:
    """chunk(state, dist, train_key, length) -> (state, losses[length]); pure, not yet jitted.

    Sweeps vmap it over (state, dist, train_key); ``train`` jits it with donated state.
    """
    spec = TaskSpec.from_config(cfg)

    def step_fn(state: TrainState, dist: Distribution, train_key: jax.Array) -> tuple[TrainState, jax.Array]:
        tasks = sample_tasks(jax.random.fold_in(train_key, state.step), dist, spec, cfg.batch_size)
        loss, grads = jax.value_and_grad(task_loss)(state.params, tasks, cfg)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss

    def chunk(state: TrainState, dist: Distribution, train_key: jax.Array, length: int):
        return jax.lax.scan(lambda s, _: step_fn(s, dist, train_key), state, None, length=length)

    return chunk


def _heldout_chunk(cfg: Config) -> Callable:
    """chunk(dist, eval_key, j) -> held-out chunk j, drawn from fold_in(eval_key, j)."""
    spec, (_, size) = TaskSpec.from_config(cfg), eval_chunks(cfg)
    return lambda dist, eval_key, j: sample_tasks(jax.random.fold_in(eval_key, j), dist, spec, size)


def make_heldout(cfg: Config) -> Callable:
    """heldout(dist, eval_key) -> what ``make_eval``'s function scores: the held-out tasks themselves,
    Tasks [chunks, chunk size, ...] (``heldout_stored``), or else (dist, eval_key) to draw them from.

    The chunks are the same on every call. Drawing costs more than scoring them: kept, an evaluation
    at d=5, n=20 costs 2.7-3.4x less (it had been 11% of a 1-layer run's loop at B=1024)."""
    chunk, (num, _) = _heldout_chunk(cfg), eval_chunks(cfg)

    def heldout(dist: Distribution, eval_key: jax.Array) -> Any:
        if not heldout_stored(cfg):
            return dist, eval_key
        return jax.lax.map(lambda j: chunk(dist, eval_key, j), jnp.arange(num))

    return heldout


def make_eval(cfg: Config) -> Callable:
    """eval_fn(params, heldout) -> mean squared query error on the fixed held-out set (``make_heldout``).

    A set that is not kept is drawn again chunk by chunk (the same chunks), so its memory stays
    bounded at large n.
    """
    chunk, (num, _) = _heldout_chunk(cfg), eval_chunks(cfg)

    def eval_fn(params: Params, heldout: Any) -> jax.Array:
        if isinstance(heldout, Tasks):
            return jnp.mean(jax.lax.map(lambda tasks: task_loss(params, tasks, cfg), heldout))
        dist, eval_key = heldout
        return jnp.mean(jax.lax.map(lambda j: task_loss(params, chunk(dist, eval_key, j), cfg), jnp.arange(num)))

    return eval_fn


def compile_checked(fn: Any, cfg: Config, members: int = 1, copies: int = 1, program: str = "train", *args: Any,
                    **kwargs: Any) -> Any:
    """``fn.lower(*args, **kwargs).compile()``, refused (``ResourceError``) when XLA's memory analysis
    exceeds the memory available (``resources.check_compiled``)."""
    compiled = fn.lower(*args, **kwargs).compile()
    resources.check_compiled(compiled, cfg, members, copies, program=program)
    return compiled


@functools.lru_cache(maxsize=8)
def _programs(cfg: Config) -> Programs:
    """Jitted train chunk, held-out set and eval with their compile cache, shared by every ``train`` call
    with this config in the process (resumes and tests skip recompiling)."""
    chunk = jax.jit(make_train_chunk(cfg, make_optimizer(cfg)), static_argnames="length", donate_argnums=0)
    return Programs(chunk, jax.jit(make_heldout(cfg)), jax.jit(make_eval(cfg)), {})


@dataclasses.dataclass
class Member:
    """One run inside ``chunk_loop``: its config, checkpoint folder and what the loop records.

    A single run is a one-member loop; a sweep group stacks several members on a leading axis.
    """

    cfg: Config
    workdir: str | None
    ckpt: Checkpointer | None
    history: list[dict]
    start_step: int
    final_step: int = 0
    failed: str = ""  # set when the member's loss went non-finite (it stops; the others go on)
    lock: Any = None  # the sweep's RunLock claim on the folder, released by the caller
    metrics: Any = None  # its metrics.MetricsWriter (metrics.jsonl + TensorBoard events), closed by the caller


@dataclasses.dataclass
class Programs:
    """The jitted chunk, held-out set and eval of a loop, and its {chunk length: executable} cache (keys
    "heldout" and "eval": theirs).

    ``stacked``: the programs carry a leading member axis (a vmapped sweep group); ``stack_size``: the
    member count the ``compiled`` executables were built for (0: none yet; a sweep compiles per stack).
    """

    chunk: Callable  # (state, dist, train_key, length) -> (state, losses[..., length])
    heldout: Callable  # (dist, eval_key) -> the held-out set eval scores (make_heldout)
    eval: Callable  # (params, heldout) -> eval loss (one per member when stacked)
    compiled: dict[int | str, Any]
    stacked: bool = False
    stack_size: int = 0


def chunk_boundary(step: int, cfg: Config, stop: int) -> int:
    """The end of the compiled call that starts at ``step``: the next log or checkpoint step, or ``stop``."""
    return min(stop, (step // cfg.log_every + 1) * cfg.log_every,
               (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)


def _nonfinite_message(member: Member, losses: np.ndarray, first_step: int) -> str:
    bad = first_step + int(np.argmin(np.isfinite(losses)))
    finite = losses[np.isfinite(losses)]
    history = member.history
    last = f"{finite[-1]:.4g}" if finite.size else (f"{history[-1]['train_loss']:.4g}" if history else "none")
    kept = member.ckpt.latest_step() if member.ckpt else None
    return (f"non-finite training loss at step {bad} (last finite loss {last}); last good checkpoint kept: "
            f"step {kept}. Try a lower --lr (now {member.cfg.lr}) or --clip_norm.")


def chunk_loop(members: list[Member], state: Any, dists: Any, train_keys: Any, eval_keys: Any, programs: Programs,
               stop: int, sigterm: SigtermFlag | None = None, fail_fast: bool = True,
               log: Callable[[str], None] = logging.info) -> Any:
    """The training loop: compiled calls of ``chunk_boundary`` steps until ``stop``; returns the state.

    After each call: the NaN guard (``fail_fast`` raises ``NonFiniteLossError``, else the member is
    marked failed and saves nothing more), the held-out loss, one history record per member (also
    appended to its metrics files when it has a ``metrics`` writer: ``icl_gd.metrics``), a
    checkpoint at every ``checkpoint_every`` step and at ``stop``, and SIGTERM handling (save, then
    ``Preempted``; under jax.distributed process 0's flag decides). Resuming from a checkpoint
    replays exactly the same key stream, so a resumed run is bitwise the uninterrupted one.
    """
    cfg0, real = members[0].cfg, len(members)
    leaf = jax.tree.leaves(state)[0]
    copies = len(leaf.sharding.device_set) if hasattr(leaf, "sharding") else 1  # devices the member axis spans
    where = members[0].workdir if real == 1 else f"{real} members under {os.path.dirname(members[0].workdir)}"
    optima = [theory.config_optimum(m.cfg) for m in members]
    lift = (lambda x: x) if programs.stacked else (lambda x: np.asarray(x)[None])  # host arrays get a member axis
    heldout = None  # drawn at the first evaluation, once per loop (or the keys to draw it from)
    step = members[0].start_step
    while step < stop:
        nxt = chunk_boundary(step, cfg0, stop)
        length = nxt - step
        with watchdog.stage(f"training {where}: steps {step} to {nxt}"), resources.out_of_memory(cfg0, real):
            if length not in programs.compiled:
                t0 = time.perf_counter()
                if cfg0.depth > 16 and not programs.compiled:
                    log(f"compiling {cfg0.depth} unrolled layers (compile time grows with --depth)")
                programs.compiled[length] = compile_checked(programs.chunk, cfg0, real, copies, "train", state, dists,
                                                            train_keys, length=length)  # cached once it passed
                size = f" for {jax.tree.leaves(train_keys)[0].shape[0]} members" if programs.stacked else ""
                log(f"compiled a {length}-step call{size} in {time.perf_counter() - t0:.2f}s")
            t0 = time.perf_counter()
            state, losses = programs.compiled[length](state, dists, train_keys)
            losses = lift(devices.to_host(losses))
            dt = time.perf_counter() - t0
        for i, m in enumerate(members):
            if not m.failed and not np.all(np.isfinite(losses[i])):
                m.failed = _nonfinite_message(m, losses[i], step)
                if fail_fast:
                    raise NonFiniteLossError(m.failed)
                logging.error("%s: %s", m.workdir, m.failed)
        with watchdog.stage(f"held-out evaluation of {where} at step {nxt}"), resources.out_of_memory(cfg0, real):
            if heldout is None:
                if "heldout" not in programs.compiled:
                    programs.compiled["heldout"] = compile_checked(programs.heldout, cfg0, real, copies, "eval", dists,
                                                                   eval_keys)
                heldout = programs.compiled["heldout"](dists, eval_keys)
            if "eval" not in programs.compiled:  # compiled for the params a chunk returns (their sharding)
                programs.compiled["eval"] = compile_checked(programs.eval, cfg0, real, copies, "eval", state.params,
                                                            heldout)
            eval_loss = lift(devices.to_host(programs.compiled["eval"](state.params, heldout)))
        step = nxt
        stopping = devices.agree(sigterm is not None and sigterm.set) and step < stop
        save = step % cfg0.checkpoint_every == 0 or step == stop or stopping
        host_state = devices.to_host(state) if save and any(m.ckpt for m in members) else None
        rate = {"steps_per_sec": length / dt, "tasks_per_sec": length * cfg0.batch_size * real / dt}
        for i, m in enumerate(members):
            if m.failed:
                continue
            record = {"step": step, "train_loss": float(losses[i].mean()), "eval_loss": float(eval_loss[i]), **rate}
            if programs.stacked:
                record["group_size"] = real
            if optima[i] is not None:
                record["loss_star"] = optima[i][1]
            m.history.append(record)
            if m.metrics is not None:
                with disk_full(m.workdir):
                    m.metrics.write(record)
            if save and m.ckpt is not None:
                m.ckpt.save(step, devices.unstack(host_state, i) if programs.stacked else host_state, m.cfg, m.history)
                m.final_step = step
        devices.barrier(f"train-step-{step}")
        log(_progress_line(members, losses, eval_loss, optima, step, rate, programs.stacked))
        if stopping:
            raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {where}; re-run the same command to resume")
    return state


def _progress_line(members: list[Member], losses: np.ndarray, eval_loss: np.ndarray, optima: list, step: int,
                   rate: dict[str, float], stacked: bool) -> str:
    real = len(members)
    speed = f"{rate['steps_per_sec']:.1f} steps/s  {rate['tasks_per_sec']:.3g} tasks/s"
    if not stacked:
        star = f"  L*={optima[0][1]:.4f}" if optima[0] is not None and members[0].cfg.depth == 1 else ""
        return f"step {step:>7d}  train {losses[0].mean():.4f}  eval {eval_loss[0]:.4f}{star}  {speed}"
    ok = [i for i, m in enumerate(members) if not m.failed] or [0]
    return (f"step {step:>7d}  {real} members ({real - len(ok)} failed)  "
            f"train loss mean {np.mean([losses[i].mean() for i in ok]):.4f}  "
            f"eval [{np.min(eval_loss[ok]):.4f}, {np.max(eval_loss[ok]):.4f}]  {speed}")


def _claim(workdir: str) -> Any:
    """The run folder's ``RunLock`` (one writer per workdir), or ``RunBusyError`` naming the holder."""
    from icl_gd.sweep.locks import RunLock

    lock = RunLock(workdir)
    if not lock.acquire():
        holder = lock.holder() or {}
        raise RunBusyError(f"{workdir} is being trained by another process ({holder.get('host')}, pid "
                           f"{holder.get('pid')}); wait for it to finish or use another --workdir")
    return lock


def train(cfg: Config, workdir: str | None = None, log: Callable[[str], None] = logging.info,
          until: int | None = None) -> TrainResult:
    """Train (or resume) one run, a one-member ``chunk_loop``; checkpoints go to ``workdir`` when given.

    ``until`` stops early at that step (saving a checkpoint there), e.g. for time-sliced jobs;
    calling again resumes exactly where it stopped. SIGTERM saves a checkpoint at the end of
    the current compiled call and raises ``Preempted``; a NaN/Inf loss raises
    ``NonFiniteLossError`` without saving, so the last good checkpoint stays the latest.
    """
    cfg.validate()
    resources.check_fits(cfg)  # before anything is written or compiled
    state = init_state(cfg)
    history: list[dict] = []
    ckpt = lock = metrics = None
    if workdir is not None:
        lock = _claim(workdir)
    try:
        if workdir is not None:
            check_same_run(workdir, cfg)  # a config.json without checkpoints (a failed first attempt) is replaced
            write_config(workdir, cfg)
            with disk_full(workdir):
                ckpt = Checkpointer(workdir, keep=cfg.keep_checkpoints)
            if ckpt.moved and ckpt.latest_step() is None:  # never silently start over on a damaged run
                raise UnreadableRunError(f"no readable checkpoint under {workdir}/checkpoints; moved the unreadable "
                                         f"steps {sorted(ckpt.moved)} to {workdir}/corrupt (inspect them, or delete "
                                         "the folder to start over)")
            if ckpt.latest_step() is not None:
                state, _, history = ckpt.restore(state)
                state = TrainState(*state) if not isinstance(state, TrainState) else state
                log(f"resumed from step {int(state.step)} in {workdir}")
        stop = cfg.steps if until is None else min(until, cfg.steps)
        with disk_full(workdir) if workdir is not None else contextlib.nullcontext():
            metrics = open_writer(workdir, cfg, int(state.step), stop)
        member = Member(cfg, workdir, ckpt, history, int(state.step), metrics=metrics)
        keys = run_keys(cfg.seed)
        t_start = time.perf_counter()
        with SigtermFlag() as sigterm:
            state = chunk_loop([member], state, distribution(cfg), keys["train"], keys["eval"], _programs(cfg),
                               stop, sigterm, fail_fast=True, log=log)
    finally:
        if metrics is not None:
            metrics.close()
        if ckpt is not None:
            ckpt.close()
        if lock is not None:
            lock.release()
    summary = {"steps": int(state.step), "wall_seconds": time.perf_counter() - t_start}
    if history:
        summary["eval_loss"] = history[-1]["eval_loss"]
    optimum = theory.config_optimum(cfg)
    if optimum is not None:
        summary["loss_star"] = optimum[1]
    summary.update(one_step_summary(cfg, state.params))
    if cfg.depth > 1 and cfg.attention == "linear":
        with watchdog.stage("end-of-run references: tuned L-step PGD and the general form's optimum"):
            summary.update(depth_references(cfg, state.params))
    return TrainResult(cfg, state, history, summary)
