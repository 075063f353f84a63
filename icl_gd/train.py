"""Training: optax optimiser, fresh tasks every step, many steps per compiled call.

Determinism: with root = PRNGKey(seed), the init key is fold_in(root, 0), the data key of
step t is fold_in(fold_in(root, 1), t) and held-out chunk j uses fold_in(fold_in(root, 2), j).
A run resumed from step t therefore sees exactly the tasks the uninterrupted run saw.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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

from icl_gd import analysis, theory, watchdog
from icl_gd.checkpoint import Checkpointer, check_same_run, write_config
from icl_gd.config import Config
from icl_gd.data import Distribution, TaskSpec, distribution, sample_tasks
from icl_gd.loss import task_loss
from icl_gd.model import Params, init_params

EVAL_CHUNK = 4096  # tasks per held-out chunk; bounds eval memory at large n


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Params
    opt_state: Any


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the last good checkpoint was kept."""


class Preempted(RuntimeError):
    """SIGTERM arrived (pre-emption): a checkpoint was saved and the run stopped cleanly."""


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


def run_keys(seed: int) -> dict[str, jax.Array]:
    root = jax.random.PRNGKey(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "train", "eval"))}


def make_schedule(cfg: Config) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, cfg.steps)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    sched = make_schedule(cfg)
    if cfg.optimizer == "adam":
        opt = optax.adam(sched)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(sched, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(sched)
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt


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


def eval_chunks(cfg: Config) -> tuple[int, int]:
    """(number of chunks, tasks per chunk) of the held-out set (eval_tasks rounded up)."""
    size = min(cfg.eval_tasks, EVAL_CHUNK)
    return math.ceil(cfg.eval_tasks / size), size


def make_eval(cfg: Config) -> Callable:
    """eval_fn(params, dist, eval_key) -> mean squared query error on the fixed held-out set.

    The held-out tasks are regenerated from fixed keys chunk by chunk instead of stored, so the
    set is identical on every call and its memory stays bounded at large n.
    """
    spec = TaskSpec.from_config(cfg)
    num, size = eval_chunks(cfg)

    def eval_fn(params: Params, dist: Distribution, eval_key: jax.Array) -> jax.Array:
        def one(j):
            tasks = sample_tasks(jax.random.fold_in(eval_key, j), dist, spec, size)
            return task_loss(params, tasks, cfg)

        return jnp.mean(jax.lax.map(one, jnp.arange(num)))

    return eval_fn


def one_step_summary(cfg: Config, params: Params) -> dict:
    """Learned vs theoretical one-step numbers for a 1-layer linear model (empty otherwise)."""
    out: dict[str, Any] = {}
    if cfg.depth != 1 or cfg.attention != "linear":
        return out
    gamma = analysis.effective_gamma(params, cfg)
    out["eta_learned"] = float(np.trace(gamma) / cfg.d)
    optimum = theory.config_optimum(cfg)
    if optimum is not None:
        g_star, _ = optimum
        out["eta_star"] = float(np.trace(g_star) / cfg.d)
        out["gamma_rel_error"] = analysis.relative_error(gamma, g_star)
    return out


@functools.lru_cache(maxsize=8)
def _programs(cfg: Config) -> tuple[Callable, Callable, dict[int, Any]]:
    """Jitted train chunk, jitted eval and a {length: executable} cache, shared by every
    ``train`` call with this config in the process (resumes and tests skip recompiling)."""
    chunk = jax.jit(make_train_chunk(cfg, make_optimizer(cfg)), static_argnames="length", donate_argnums=0)
    return chunk, jax.jit(make_eval(cfg)), {}


def train(cfg: Config, workdir: str | None = None, log: Callable[[str], None] = logging.info,
          until: int | None = None) -> TrainResult:
    """Train (or resume) one run; checkpoints go to ``workdir`` when given.

    ``until`` stops early at that step (saving a checkpoint there), e.g. for time-sliced jobs;
    calling again resumes exactly where it stopped. SIGTERM saves a checkpoint at the end of
    the current compiled call and raises ``Preempted``; a NaN/Inf loss raises
    ``NonFiniteLossError`` without saving, so the last good checkpoint stays the latest.
    """
    with SigtermFlag() as sigterm:
        return _train(cfg, workdir, log, until, sigterm)


def _train(cfg: Config, workdir: str | None, log: Callable[[str], None], until: int | None,
           sigterm: SigtermFlag) -> TrainResult:
    cfg.validate()
    optimizer = make_optimizer(cfg)
    keys = run_keys(cfg.seed)
    state = init_state(cfg, optimizer)
    history: list[dict] = []
    ckpt = None
    if workdir is not None:
        check_same_run(workdir, cfg)
        write_config(workdir, cfg)
        ckpt = Checkpointer(workdir, keep=cfg.keep_checkpoints)
        if ckpt.latest_step() is not None:
            state, _, history = ckpt.restore(state)
            state = TrainState(*state) if not isinstance(state, TrainState) else state
            log(f"resumed from step {int(state.step)} in {workdir}")

    dist = distribution(cfg)
    optimum = theory.config_optimum(cfg)
    loss_star = None if optimum is None else optimum[1]
    chunk, eval_fn, compiled = _programs(cfg)

    step = int(state.step)
    stop = cfg.steps if until is None else min(until, cfg.steps)
    t_start = time.perf_counter()
    while step < stop:
        nxt = min(stop, (step // cfg.log_every + 1) * cfg.log_every,
                  (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
        length = nxt - step
        with watchdog.stage(f"training {workdir or 'run'}: steps {step} to {nxt}"):
            if length not in compiled:
                t0 = time.perf_counter()
                compiled[length] = chunk.lower(state, dist, keys["train"], length=length).compile()
                log(f"compiled a {length}-step call in {time.perf_counter() - t0:.2f}s")
            t0 = time.perf_counter()
            state, losses = compiled[length](state, dist, keys["train"])
            losses = np.asarray(losses)
            dt = time.perf_counter() - t0
        if not np.all(np.isfinite(losses)):
            bad = step + int(np.argmin(np.isfinite(losses)))
            finite = losses[np.isfinite(losses)]
            last = f"{finite[-1]:.4g}" if finite.size else (f"{history[-1]['train_loss']:.4g}" if history else "none")
            kept = ckpt.latest_step() if ckpt else None
            raise NonFiniteLossError(
                f"non-finite training loss at step {bad} (last finite loss {last}); "
                f"last good checkpoint kept: step {kept}. Try a lower --lr (now {cfg.lr}) or --clip_norm."
            )
        step = nxt
        with watchdog.stage(f"held-out evaluation of {workdir or 'run'} at step {step}"):
            eval_loss = float(eval_fn(state.params, dist, keys["eval"]))
        record = {
            "step": step,
            "train_loss": float(losses.mean()),
            "eval_loss": eval_loss,
            "steps_per_sec": length / dt,
            "tasks_per_sec": length * cfg.batch_size / dt,
        }
        if loss_star is not None:
            record["loss_star"] = loss_star
        history.append(record)
        star = f"  L*={loss_star:.4f}" if loss_star is not None else ""
        log(f"step {step:>7d}  train {record['train_loss']:.4f}  eval {eval_loss:.4f}{star}  "
            f"{record['steps_per_sec']:.1f} steps/s  {record['tasks_per_sec']:.3g} tasks/s")
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == stop or sigterm.set):
            with watchdog.stage(f"saving the step-{step} checkpoint of {workdir}"):
                ckpt.save(step, state, cfg, history)
        if sigterm.set and step < stop:
            if ckpt is not None:
                ckpt.close()
            raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {workdir}; "
                            "re-run the same command to resume")

    summary = {"steps": int(state.step), "wall_seconds": time.perf_counter() - t_start}
    if history:
        summary["eval_loss"] = history[-1]["eval_loss"]
    if loss_star is not None:
        summary["loss_star"] = loss_star
    summary.update(one_step_summary(cfg, state.params))
    if ckpt is not None:
        ckpt.close()
    return TrainResult(cfg, state, history, summary)
