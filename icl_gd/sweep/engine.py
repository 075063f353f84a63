"""The group engine: train every same-shape group of sweep members in ONE compiled program.

Groups. Members that differ only in the Distribution arrays (covariance, cond, eigenvalues,
rotation, weight prior, noise) and the seed trace to the same program, so ``train_group`` vmaps
``train.make_train_chunk`` over (state, Distribution, train key) and ``train.make_eval`` over
(params, Distribution, eval key). With several devices (or several processes joined by
``jax.distributed``) the member axis is sharded over a 1-D ``Mesh`` with ``NamedSharding``.

Run folders. Member ``m`` lives in ``ROOT/member_name(m)`` with exactly ``train()``'s layout
(config.json + orbax checkpoints/, metrics.jsonl + TensorBoard event files), so ``icl_gd.load``
opens it. A member whose latest checkpoint is at ``steps`` is skipped; an unfinished one resumes
from its checkpoint; a folder whose config differs is refused (``ConfigMismatchError``), never
overwritten. Since the data key of step t is fold_in(train_key, t), a resumed or vmapped member
sees the same tasks as ``train(cfg)`` and ends with the same params (to float tolerance).
"""


from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging

from icl_gd import devices, resources
from icl_gd.checkpoint import Checkpointer, check_same_run, disk_full, saved_steps, write_config
from icl_gd.config import Config
from icl_gd.data import distribution
from icl_gd.keys import run_keys
from icl_gd.metrics import open_writer
from icl_gd.optim import make_optimizer
from icl_gd.sweep.grid import group, group_key, member_name
from icl_gd.sweep.locks import RunLock
from icl_gd.train import (
    Member,
    Programs,
    SigtermFlag,
    TrainState,
    chunk_boundary,
    chunk_loop,
    compile_checked,
    init_state,
    make_eval,
    make_heldout,
    make_train_chunk,
)

# ---------------------------------------------------------------------------------------
# Group programs.
# ---------------------------------------------------------------------------------------
# The fields only training reads: groups equal on the rest share one held-out evaluation program.
TRAINING_FIELDS = ("optimizer", "lr", "schedule", "warmup_steps", "weight_decay", "clip_norm", "batch_size", "steps",
                   "log_every", "checkpoint_every", "keep_checkpoints", "init_scale")


def make_group_fns(rep: Config) -> Programs:
    """vmap the single-run chunk and eval of ``train`` over the member axis (``Programs.stacked``).

    The jitted functions are shared by every group with the same ``rep`` (the eval: the same fields
    outside ``TRAINING_FIELDS``), so JAX's compile cache serves a shape compiled before, e.g. the
    same model scored in two experiments of a reproduction."""
    defaults = Config()
    key = dataclasses.replace(rep, **{f: getattr(defaults, f) for f in TRAINING_FIELDS})
    return Programs(_group_chunk(rep), _group_heldout(key), _group_eval(key), {}, stacked=True)


@functools.lru_cache(maxsize=64)
def _group_chunk(rep: Config) -> Callable:
    chunk = make_train_chunk(rep, make_optimizer(rep))

    def vchunk(state: TrainState, dist: Any, train_key: jax.Array, length: int):
        return jax.vmap(functools.partial(chunk, length=length))(state, dist, train_key)

    return jax.jit(vchunk, static_argnames="length", donate_argnums=0)


@functools.lru_cache(maxsize=64)
def _group_eval(key: Config) -> Callable:
    return jax.jit(jax.vmap(make_eval(key)))


@functools.lru_cache(maxsize=64)
def _group_heldout(key: Config) -> Callable:
    return jax.jit(jax.vmap(make_heldout(key)))


@dataclasses.dataclass
class MemberResult:
    """What happened to one member in this invocation."""

    name: str
    config: Config
    workdir: str
    status: str  # 'skipped' (already finished), 'trained', 'resumed', 'failed'
    start_step: int
    final_step: int
    eval_loss: float | None = None
    message: str = ""


def _open_member(cfg: Config, root: str, log: Callable[[str], None]) -> tuple[Member, TrainState] | MemberResult:
    """Claim, check, create or resume one member's folder; a MemberResult if it is already
    finished or another sweep process is training it (status 'busy')."""
    workdir = os.path.join(root, member_name(cfg))
    steps = saved_steps(workdir)
    if steps and steps[-1] >= cfg.steps:  # finished: no claim, no orbax, nothing to compile
        check_same_run(workdir, cfg)
        return MemberResult(member_name(cfg), cfg, workdir, "skipped", steps[-1], steps[-1])
    lock = None
    # A multi-process runtime trains every member collectively: no claims there.
    if jax.process_count() == 1:
        lock = RunLock(workdir)
        if not lock.acquire():
            holder = lock.holder() or {}
            log(f"{member_name(cfg)}: claimed by {holder.get('host')}:{holder.get('pid')}, skipping")
            return MemberResult(member_name(cfg), cfg, workdir, "busy", 0, 0,
                                message=f"claimed by {holder.get('host')}:{holder.get('pid')}")
    try:
        return _open_claimed(cfg, workdir, lock, log)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _open_claimed(cfg: Config, workdir: str, lock: RunLock | None,
                  log: Callable[[str], None]) -> tuple[Member, TrainState] | MemberResult:
    # Written when absent, or replacing one of an attempt that saved no checkpoint; never a trained member's.
    if check_same_run(workdir, cfg) and jax.process_index() == 0:
        write_config(workdir, cfg)
    devices.barrier(f"sweep-config-{member_name(cfg)}")
    with disk_full(workdir):
        ckpt = Checkpointer(workdir, keep=cfg.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None and latest >= cfg.steps:
        ckpt.close()
        if lock is not None:
            lock.release()
        return MemberResult(member_name(cfg), cfg, workdir, "skipped", latest, latest)
    state, history = init_state(cfg, make_optimizer(cfg)), []
    if latest is not None:
        state, _, history = ckpt.restore(state)
        state = state if isinstance(state, TrainState) else TrainState(*state)
        log(f"{member_name(cfg)}: resuming from step {latest}")
    try:
        with disk_full(workdir):
            metrics = open_writer(workdir, cfg, int(state.step), cfg.steps)
    except BaseException:
        ckpt.close()
        raise
    return Member(cfg, workdir, ckpt, history, int(state.step), int(state.step), lock=lock, metrics=metrics), state


def train_group(members: Sequence[Config], root: str, fns: Programs | None = None,
                mesh: jax.sharding.Mesh | None = None,
                log: Callable[[str], None] = logging.info) -> list[MemberResult]:
    """Train (or resume, or skip) same-shape members together in one ``train.chunk_loop``; one
    checkpoint folder each. A member whose loss goes non-finite fails alone."""
    keys = {group_key(c) for c in members}
    if len(keys) != 1:
        raise ValueError(f"train_group needs members of one group, got {len(keys)} groups")
    resources.check_fits(members[0], len(members), 1 if mesh is None else mesh.size)  # before any folder is touched
    results: list[MemberResult] = []
    active: list[tuple[Member, TrainState]] = []
    for cfg in members:
        opened = _open_member(cfg, root, log)
        (results if isinstance(opened, MemberResult) else active).append(opened)
    if active:
        fns = fns or make_group_fns(group_key(members[0]))
        # Members interrupted at different checkpoints advance in separate stacks (rare).
        by_step: dict[int, list[tuple[Member, TrainState]]] = {}
        for a in active:
            by_step.setdefault(a[0].start_step, []).append(a)
        try:
            with SigtermFlag() as sigterm:
                for batch in by_step.values():
                    _train_stack(batch, fns, mesh, log, sigterm)
        finally:
            for m, _ in active:
                if m.metrics is not None:
                    m.metrics.close()
                m.ckpt.close()
                if m.lock is not None:
                    m.lock.release()
        for m, _ in active:
            status = "failed" if m.failed else ("resumed" if m.start_step else "trained")
            last = m.history[-1]["eval_loss"] if m.history else None
            results.append(MemberResult(member_name(m.cfg), m.cfg, m.workdir, status, m.start_step,
                                        m.final_step, last, m.failed))
    order = {id(c): i for i, c in enumerate(members)}
    return sorted(results, key=lambda r: order.get(id(r.config), 0))


def _stacked_inputs(cfgs: Sequence[Config], states: Sequence[TrainState], mesh: jax.sharding.Mesh | None) -> tuple:
    """(state, distributions, train keys, eval keys) of members stacked on a leading axis, placed on ``mesh``."""
    keys = [run_keys(c.seed) for c in cfgs]
    trees = (states, [distribution(c) for c in cfgs], [k["train"] for k in keys], [k["eval"] for k in keys])
    return tuple(devices.place(devices.stack(t), mesh) for t in trees)


def _train_stack(batch: list[tuple[Member, TrainState]], fns: Programs, mesh: jax.sharding.Mesh | None,
                 log: Callable[[str], None], sigterm: SigtermFlag | None = None) -> None:
    """Stack ``batch`` (padded to the mesh size; padding is computed, never saved) and run the loop."""
    members = [m for m, _ in batch]
    size = 1 if mesh is None else mesh.size
    padded = batch + [batch[0]] * ((-len(batch)) % size)
    state, dists, train_keys, eval_keys = _stacked_inputs([m.cfg for m, _ in padded], [s for _, s in padded], mesh)
    # Executables are per stack size: those compiled ahead (``Precompiler``) serve only the stack they were built for.
    programs = fns if fns.stack_size == len(padded) else dataclasses.replace(fns, compiled={}, stack_size=len(padded))
    chunk_loop(members, state, dists, train_keys, eval_keys, programs, members[0].cfg.steps, sigterm,
               fail_fast=False, log=log)


def _compile_ahead(members: Sequence[Config], root: str) -> Programs | None:
    """The group's programs, compiled for the stack ``train_group`` will train when every member is fresh (no
    checkpoint): its first chunk, held-out set and eval. None when it is not (resumes are compiled by the loop)."""
    if any(saved_steps(os.path.join(root, member_name(c))) for c in members):
        return None
    cfg = members[0]
    fns = make_group_fns(group_key(cfg))
    state, dists, train_keys, eval_keys = _stacked_inputs(members, [init_state(c, make_optimizer(c)) for c in members],
                                                          None)
    length = chunk_boundary(0, cfg, cfg.steps)
    m = len(members)
    compiled = {length: compile_checked(fns.chunk, cfg, m, 1, "train", state, dists, train_keys, length=length),
                "heldout": compile_checked(fns.heldout, cfg, m, 1, "eval", dists, eval_keys),
                "eval": compile_checked(fns.eval, cfg, m, 1, "eval", state.params,
                                        jax.eval_shape(fns.heldout, dists, eval_keys))}
    return dataclasses.replace(fns, compiled=compiled, stack_size=m)


class Precompiler:
    """Compiles sweep groups' programs ahead of their turn, in one background thread, while earlier
    groups train or their runs are analysed.

    Why: compiling a group's chunk and eval costs 4-7 s at d=5 (XLA:CPU compiles on ~1.5 cores, the
    tracing is single-threaded Python), and a paper-scale reproduction compiles ~58 groups; the
    analysis between experiments leaves cores idle. At most ``ahead`` groups are compiled beyond the
    one being trained. Speculative and never wrong: only single-device groups whose members are all
    fresh; a group taken before its turn, or whose compile fails, is compiled by the loop as before.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[Config], str]], ahead: int = 2,
                 log: Callable[[str], None] = logging.info):
        self._jobs = [(list(members), root) for members, root in groups]
        self._state = ["pending"] * len(self._jobs)  # pending -> running -> done, or pending -> dropped
        self._out: list[Programs | None] = [None] * len(self._jobs)
        self._taken, self._ahead, self._stop, self._log = 0, ahead, False, log
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="icl-gd-precompile", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        for i, (members, root) in enumerate(self._jobs):
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._taken >= i - self._ahead)  # noqa: B023 - i is current
                if self._stop:
                    return
                if self._state[i] != "pending":
                    continue
                self._state[i] = "running"
            out, t0 = None, time.perf_counter()
            try:
                out = _compile_ahead(members, root)
                if out is not None:
                    self._log(f"compiled {len(members)} member(s) of {root} ahead in {time.perf_counter() - t0:.1f}s")
            except Exception as e:  # noqa: BLE001 - the loop compiles it again and reports any real error
                self._log(f"compiling ahead failed ({type(e).__name__}: {e}); the loop compiles that group itself")
            with self._cv:
                self._out[i], self._state[i] = out, "done"
                self._cv.notify_all()

    def take(self, members: Sequence[Config], root: str) -> Programs | None:
        """The programs compiled ahead for this group (waiting for a compile in progress), else None."""
        job = (list(members), root)
        with self._cv:
            found = [i for i, j in enumerate(self._jobs) if j == job and self._state[i] not in ("taken", "dropped")]
            if not found:
                return None
            i = found[0]
            self._taken = max(self._taken, i + 1)
            self._cv.notify_all()
            if self._state[i] == "pending":
                self._state[i] = "dropped"
                return None
            self._cv.wait_for(lambda: self._state[i] == "done")
            out, self._out[i], self._state[i] = self._out[i], None, "taken"
            return out

    def wait(self) -> None:
        """Block until every group the look-ahead allows now has been compiled (or skipped)."""
        with self._cv:
            self._cv.wait_for(lambda: all(s != "running" and (s != "pending" or i > self._taken + self._ahead)
                                          for i, s in enumerate(self._state)))

    def close(self) -> None:
        """Stop after the compile in progress, if any."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()


def run_sweep(members: Sequence[Config], root: str, mesh: jax.sharding.Mesh | None = None,
              log: Callable[[str], None] = logging.info, ahead: Precompiler | None = None) -> list[MemberResult]:
    """Train every member (grouped by shape) under ``root``; finished members are skipped. Each
    group's programs are compiled while the previous one trains (``ahead``, or a ``Precompiler`` of
    this sweep's own on a single device)."""
    os.makedirs(root, exist_ok=True)
    results: list[MemberResult] = []
    groups = group(members)
    for members_g in groups:  # refuse a group that cannot fit before any group trains
        resources.check_fits(members_g[0], len(members_g), 1 if mesh is None else mesh.size)
    own = None
    if ahead is None and mesh is None and jax.process_count() == 1 and len(groups) > 1:
        ahead = own = Precompiler([(g, root) for g in groups], log=log)
    try:
        for gi, members_g in enumerate(groups):
            rep = group_key(members_g[0])
            log(f"group {gi + 1}/{len(groups)}: {len(members_g)} members (d={rep.d}, n={rep.n}, depth={rep.depth})")
            fns = ahead.take(members_g, root) if ahead is not None and mesh is None else None
            results.extend(train_group(members_g, root, fns=fns, mesh=mesh, log=log))
    finally:
        if own is not None:
            own.close()
    return results


def run_slice(members: Sequence[Config], mine: Sequence[Config], root: str, train: bool = True, aggregate: bool = True,
              baselines: bool = True, log: Callable[[str], None] = logging.info) -> dict[str, int]:
    """One sweep invocation: train this process's slice ``mine`` of the grid ``members``, then
    aggregate the whole grid when this slice is all of it (or ``train`` is off). Returns the status
    counts; a failed member skips aggregation. Process 0 prints the end-of-slice lines."""
    counts: dict[str, int] = {}
    if train:
        t0 = time.perf_counter()
        log(f"sweep: {len(members)} members in the grid, {len(mine)} in this slice, {len(group(mine))} group(s), "
            f"{jax.device_count()} device(s) in {jax.process_count()} process(es)")
        results = run_sweep(mine, root, mesh=default_mesh(), log=log)
        counts = summarize(results)
        if jax.process_index() == 0:
            print(f"sweep slice done in {time.perf_counter() - t0:.1f}s: {len(mine)} members: "
                  + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
            for r in results:
                if r.status == "failed":
                    print(f"FAILED {r.workdir}: {r.message}", file=sys.stderr)
        if counts.get("failed"):
            return counts
    if aggregate and (not train or len(mine) == len(members)):
        from icl_gd.sweep import aggregate as aggregation  # matplotlib loads only when needed

        # Every process reads (orbax synchronises reads across processes); process 0 writes.
        lead = jax.process_index() == 0
        paths = aggregation.aggregate(members, root, baselines=baselines, write=lead)
        if lead:
            print("aggregated: " + "  ".join(paths.values()))
    return counts


def default_mesh() -> jax.sharding.Mesh | None:
    """A member mesh when more than one (global) device exists, else None (plain vmap)."""
    return devices.member_mesh() if jax.device_count() > 1 else None


def summarize(results: Sequence[MemberResult]) -> dict[str, int]:
    """Counts per status, for the end-of-run line and the tests."""
    out: dict[str, int] = {}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def num_array_tasks(num_members: int, members_per_task: int) -> int:
    """How many array tasks cover ``num_members`` at ``members_per_task`` each."""
    return max(1, math.ceil(num_members / max(1, members_per_task)))
