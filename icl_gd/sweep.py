"""Sweeps: expand a grid of configs, then train every same-shape group in ONE compiled program.

Grid. ``Axes`` lists the swept values; ``expand(base, axes)`` is a pure function to a list of
validated ``Config`` members, ordered shape-axes-first (d, n, depth) so that members that can
share a program are contiguous (this also keeps ``shard`` slices group-friendly).

Covariance axis syntax (one entry names a spectrum; ``rotate``/``rotation_seed`` come from the
base config):

    isotropic            Sigma = I
    cond<K>              --covariance=cond --cond=K   (e.g. cond10, cond100, cond1e3)
    eig<v1>_<v2>_...     --covariance=eigenvalues --eigenvalues=v1,...,vd  (e.g. eig1_0.5_0.1)

``covariance_label(cfg)`` gives the canonical entry back, used in folder names and the CSV.

Groups. Members that differ only in the Distribution arrays (covariance, cond, eigenvalues,
rotation, weight prior, noise) and the seed trace to the same program, so ``train_group`` vmaps
``train.make_train_chunk`` over (state, Distribution, train key) and ``train.make_eval`` over
(params, Distribution, eval key). With several devices (or several processes joined by
``jax.distributed``) the member axis is sharded over a 1-D ``Mesh`` with ``NamedSharding``.

Run folders. Member ``m`` lives in ``ROOT/member_name(m)`` with exactly ``train()``'s layout
(config.json + orbax checkpoints/), so ``icl_gd.load`` opens it. A member whose latest
checkpoint is at ``steps`` is skipped; an unfinished one resumes from its checkpoint; a folder
whose config differs is refused (``ConfigMismatchError``), never overwritten. Since the data key
of step t is fold_in(train_key, t), a resumed or vmapped member sees the same tasks as
``train(cfg)`` and ends with the same params (to float tolerance).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from icl_gd import theory, watchdog
from icl_gd.checkpoint import Checkpointer, check_same_run, read_config, write_config
from icl_gd.config import OPERATIONAL_FIELDS, Config, ConfigError
from icl_gd.data import distribution
from icl_gd.locks import RunLock
from icl_gd.train import (
    Preempted,
    SigtermFlag,
    TrainState,
    init_state,
    make_eval,
    make_optimizer,
    make_train_chunk,
    run_keys,
)

# Fields that only change the Distribution arrays or the keys: members differing only in these
# share one compiled program.
VMAPPABLE_FIELDS = ("covariance", "cond", "eigenvalues", "rotate", "rotation_seed", "weight_prior", "noise", "seed")
MEMBER_AXIS = "members"

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


# ---------------------------------------------------------------------------------------
# Grid expansion and naming (pure).
# ---------------------------------------------------------------------------------------
def parse_covariance(entry: str) -> dict[str, Any]:
    """Config fields for one covariance-axis entry; ``ConfigError`` (field 'covariances') if malformed."""
    entry = entry.strip()
    if entry in ("isotropic", "iso"):
        return {"covariance": "isotropic"}
    m = re.fullmatch(rf"cond({_NUM})", entry)
    if m:
        return {"covariance": "cond", "cond": float(m.group(1))}
    m = re.fullmatch(rf"eig({_NUM}(?:_{_NUM})*)", entry)
    if m:
        return {"covariance": "eigenvalues", "eigenvalues": tuple(float(v) for v in m.group(1).split("_"))}
    raise ConfigError("covariances", entry, "entries are isotropic, cond<K> (e.g. cond10) or eig<v1>_<v2>_... "
                      "(e.g. eig1_0.5_0.1)")


def covariance_label(cfg: Config) -> str:
    """The canonical covariance-axis entry of a config (inverse of ``parse_covariance``)."""
    if cfg.covariance == "isotropic":
        return "isotropic"
    if cfg.covariance == "cond":
        return f"cond{cfg.cond:g}"
    return "eig" + "_".join(f"{v:g}" for v in cfg.eigenvalues)


@dataclasses.dataclass(frozen=True)
class Axes:
    """Swept values; an empty tuple means "the base config's value" (a one-point axis)."""

    covariances: tuple[str, ...] = ()
    noises: tuple[float, ...] = ()
    depths: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    ns: tuple[int, ...] = ()
    ds: tuple[int, ...] = ()
    weight_priors: tuple[str, ...] = ()


def expand(base: Config, axes: Axes) -> list[Config]:
    """All members of the grid, validated, shape axes outermost; duplicates collapsed."""
    cov_entries = [parse_covariance(c) for c in axes.covariances] or [{}]
    loops = (
        [{"d": v} for v in axes.ds] or [{}],
        [{"n": v} for v in axes.ns] or [{}],
        [{"depth": v} for v in axes.depths] or [{}],
        [{"weight_prior": v} for v in axes.weight_priors] or [{}],
        cov_entries,
        [{"noise": float(v)} for v in axes.noises] or [{}],
        [{"seed": v} for v in axes.seeds] or [{}],
    )
    out: list[Config] = []
    seen: set[Config] = set()
    for combo in itertools.product(*loops):
        fields: dict[str, Any] = {}
        for part in combo:
            fields.update(part)
        cfg = dataclasses.replace(base, **fields).validate()
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def expand_union(base: Config, grids: Sequence[Axes]) -> list[Config]:
    """Members of several grids (e.g. a seeds x noise grid plus a depth line), duplicates collapsed."""
    out: list[Config] = []
    seen: set[Config] = set()
    for axes in grids:
        for cfg in expand(base, axes):
            if cfg not in seen:
                seen.add(cfg)
                out.append(cfg)
    return out


def config_hash(cfg: Config) -> str:
    """8 hex digits over every field that changes training (not the OPERATIONAL_FIELDS)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in OPERATIONAL_FIELDS}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def member_name(cfg: Config) -> str:
    """Folder name: readable swept values plus a hash of the rest, so names are stable across
    re-runs and two configs never share a folder (changing e.g. --lr gives new folders)."""
    return (f"d{cfg.d}_n{cfg.n}_{covariance_label(cfg)}_{cfg.weight_prior}_noise{cfg.noise:g}"
            f"_L{cfg.depth}_seed{cfg.seed}_{config_hash(cfg)}")


def group_key(cfg: Config) -> Config:
    """The config with every vmappable field reset: equal keys <=> one compiled program."""
    defaults = Config()
    return dataclasses.replace(cfg, **{f: getattr(defaults, f) for f in VMAPPABLE_FIELDS})


def group(members: Sequence[Config]) -> list[list[Config]]:
    """Members bucketed by ``group_key``, in order of first appearance."""
    buckets: dict[Config, list[Config]] = {}
    for cfg in members:
        buckets.setdefault(group_key(cfg), []).append(cfg)
    return list(buckets.values())


def shard(members: Sequence[Config], num_shards: int, index: int) -> list[Config]:
    """Contiguous slice ``index`` of ``num_shards`` near-equal slices: together they partition
    the grid exactly, and contiguity keeps same-shape members together."""
    if num_shards < 1:
        raise ConfigError("num_shards", num_shards, "must be an integer >= 1")
    if not 0 <= index < num_shards:
        raise ConfigError("shard_index", index, f"must be in [0, {num_shards})")
    m = len(members)
    return list(members[index * m // num_shards:(index + 1) * m // num_shards])


# ---------------------------------------------------------------------------------------
# Pytree stacking and multi-device placement.
# ---------------------------------------------------------------------------------------
def stack(trees: Sequence[Any]) -> Any:
    """Stack same-structure pytrees along a new leading (member) axis, on the host."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, i: int) -> Any:
    """Member ``i`` of a stacked host pytree."""
    return jax.tree.map(lambda x: x[i], tree)


def member_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """1-D mesh over all (global) devices; the member axis is split over it."""
    devices = list(jax.devices()) if devices is None else list(devices)
    return jax.sharding.Mesh(np.array(devices), (MEMBER_AXIS,))


def place(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Host arrays -> global jax.Arrays sharded on the member axis (every process holds the full
    host copy, so each one fills its own shards; works across jax.distributed processes)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MEMBER_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), tree)


def to_host(tree: Any) -> Any:
    """Global (possibly multi-process) arrays -> full NumPy copies on every process."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _agree(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process (itself when single-process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------
# Group programs.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class GroupFns:
    """The vmapped, jitted programs of one group (built once, reused across chunk lengths)."""

    chunk: Callable  # (state[M], dist[M], train_key[M], length) -> (state[M], losses[M, length])
    eval: Callable  # (params[M], dist[M], eval_key[M]) -> eval_loss[M]


def make_group_fns(rep: Config) -> GroupFns:
    """vmap the single-run chunk and eval of ``train`` over the member axis."""
    chunk = make_train_chunk(rep, make_optimizer(rep))

    def vchunk(state: TrainState, dist: Any, train_key: jax.Array, length: int):
        return jax.vmap(functools.partial(chunk, length=length))(state, dist, train_key)

    return GroupFns(
        chunk=jax.jit(vchunk, static_argnames="length", donate_argnums=0),
        eval=jax.jit(jax.vmap(make_eval(rep))),
    )


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


@dataclasses.dataclass
class _Active:
    cfg: Config
    workdir: str
    ckpt: Checkpointer
    state: TrainState
    history: list[dict]
    start_step: int
    final_step: int = 0
    failed: str = ""
    lock: RunLock | None = None


def _open_member(cfg: Config, root: str, log: Callable[[str], None]) -> _Active | MemberResult:
    """Claim, check, create or resume one member's folder; a MemberResult if it is already
    finished or another sweep process is training it (status 'busy')."""
    workdir = os.path.join(root, member_name(cfg))
    lock = None
    # Finished members need no claim; a multi-process runtime trains every member collectively.
    if jax.process_count() == 1 and not _finished(workdir, cfg):
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


def _finished(workdir: str, cfg: Config) -> bool:
    """A finalised checkpoint at ``steps`` exists (orbax names only finished step folders as bare digits)."""
    path = os.path.join(workdir, "checkpoints")
    return os.path.isdir(path) and any(e.isdigit() and int(e) >= cfg.steps for e in os.listdir(path))


def _open_claimed(cfg: Config, workdir: str, lock: RunLock | None,
                  log: Callable[[str], None]) -> _Active | MemberResult:
    check_same_run(workdir, cfg)
    if jax.process_index() == 0 and read_config(workdir) is None:  # never rewrite a finished member's files
        write_config(workdir, cfg)
    _barrier(f"sweep-config-{member_name(cfg)}")
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
    return _Active(cfg, workdir, ckpt, state, history, int(state.step), int(state.step), lock=lock)


def train_group(members: Sequence[Config], root: str, fns: GroupFns | None = None,
                mesh: jax.sharding.Mesh | None = None,
                log: Callable[[str], None] = logging.info) -> list[MemberResult]:
    """Train (or resume, or skip) same-shape members together; one checkpoint folder each."""
    keys = {group_key(c) for c in members}
    if len(keys) != 1:
        raise ValueError(f"train_group needs members of one group, got {len(keys)} groups")
    results: list[MemberResult] = []
    active: list[_Active] = []
    for cfg in members:
        opened = _open_member(cfg, root, log)
        (results if isinstance(opened, MemberResult) else active).append(opened)
    if active:
        fns = fns or make_group_fns(group_key(members[0]))
        # Members interrupted at different checkpoints advance in separate stacks (rare).
        by_step: dict[int, list[_Active]] = {}
        for a in active:
            by_step.setdefault(a.start_step, []).append(a)
        try:
            with SigtermFlag() as sigterm:
                for batch in by_step.values():
                    _train_stack(batch, fns, mesh, log, sigterm)
        finally:
            for a in active:
                a.ckpt.close()
                if a.lock is not None:
                    a.lock.release()
        for a in active:
            status = "failed" if a.failed else ("resumed" if a.start_step else "trained")
            last = a.history[-1]["eval_loss"] if a.history else None
            results.append(MemberResult(member_name(a.cfg), a.cfg, a.workdir, status, a.start_step,
                                        a.final_step, last, a.failed))
    order = {id(c): i for i, c in enumerate(members)}
    return sorted(results, key=lambda r: order.get(id(r.config), 0))


def _train_stack(batch: list[_Active], fns: GroupFns, mesh: jax.sharding.Mesh | None,
                 log: Callable[[str], None], sigterm: SigtermFlag | None = None) -> None:
    """The chunk loop of ``train.train``, vmapped over ``batch`` (padded to the mesh size)."""
    cfg0 = batch[0].cfg
    real = len(batch)
    size = 1 if mesh is None else mesh.size
    padded = batch + [batch[0]] * ((-real) % size)  # padding members are computed, never saved
    m = len(padded)
    keys = [run_keys(a.cfg.seed) for a in padded]
    state = place(stack([a.state for a in padded]), mesh)
    dists = place(stack([distribution(a.cfg) for a in padded]), mesh)
    train_keys = place(stack([k["train"] for k in keys]), mesh)
    eval_keys = place(stack([k["eval"] for k in keys]), mesh)
    optima = [theory.config_optimum(a.cfg) for a in batch]
    compiled: dict[int, Any] = {}
    step = batch[0].start_step
    while step < cfg0.steps:
        nxt = min(cfg0.steps, (step // cfg0.log_every + 1) * cfg0.log_every,
                  (step // cfg0.checkpoint_every + 1) * cfg0.checkpoint_every)
        length = nxt - step
        with watchdog.stage(f"training {real} sweep members from {batch[0].workdir}: steps {step} to {nxt}"):
            if length not in compiled:
                t0 = time.perf_counter()
                compiled[length] = fns.chunk.lower(state, dists, train_keys, length=length).compile()
                log(f"compiled a {length}-step call for {m} members in {time.perf_counter() - t0:.2f}s")
            t0 = time.perf_counter()
            state, losses = compiled[length](state, dists, train_keys)
            losses = to_host(losses)
            dt = time.perf_counter() - t0
            eval_loss = to_host(fns.eval(state.params, dists, eval_keys))
        step = nxt
        # Under jax.distributed every process must agree to stop: process 0's flag decides.
        stop = _agree(sigterm is not None and sigterm.set) and step < cfg0.steps
        save = step % cfg0.checkpoint_every == 0 or step == cfg0.steps or stop
        host_state = to_host(state) if save else None
        for i, a in enumerate(batch):
            if a.failed:
                continue
            if not np.all(np.isfinite(losses[i])):
                bad = step - length + int(np.argmin(np.isfinite(losses[i])))
                a.failed = (f"non-finite training loss at step {bad}; last good checkpoint kept: "
                            f"step {a.ckpt.latest_step()}")
                logging.error("%s: %s", member_name(a.cfg), a.failed)
                continue
            record = {"step": step, "train_loss": float(losses[i].mean()), "eval_loss": float(eval_loss[i]),
                      "steps_per_sec": length / dt, "tasks_per_sec": length * a.cfg.batch_size * real / dt,
                      "group_size": real}
            if optima[i] is not None:
                record["loss_star"] = optima[i][1]
            a.history.append(record)
            if save:
                with watchdog.stage(f"saving the step-{step} checkpoint of {a.workdir}"):
                    a.ckpt.save(step, unstack(host_state, i), a.cfg, a.history)
                a.final_step = step
        _barrier(f"sweep-step-{step}")
        ok = [i for i, a in enumerate(batch) if not a.failed] or [0]
        log(f"step {step:>7d}  {real} members ({real - len(ok)} failed)  "
            f"train loss mean {np.mean([losses[i].mean() for i in ok]):.4f}  "
            f"eval [{np.min(eval_loss[ok]):.4f}, {np.max(eval_loss[ok]):.4f}]  "
            f"{length / dt:.1f} steps/s  {length * cfg0.batch_size * real / dt:.3g} tasks/s")
        if stop:
            raise Preempted(f"SIGTERM at step {step}: {real} members checkpointed under "
                            f"{os.path.dirname(batch[0].workdir)}; re-run the same command to resume")


def run_sweep(members: Sequence[Config], root: str, mesh: jax.sharding.Mesh | None = None,
              log: Callable[[str], None] = logging.info) -> list[MemberResult]:
    """Train every member (grouped by shape) under ``root``; finished members are skipped."""
    os.makedirs(root, exist_ok=True)
    results: list[MemberResult] = []
    groups = group(members)
    for gi, members_g in enumerate(groups):
        rep = group_key(members_g[0])
        log(f"group {gi + 1}/{len(groups)}: {len(members_g)} members (d={rep.d}, n={rep.n}, depth={rep.depth})")
        results.extend(train_group(members_g, root, mesh=mesh, log=log))
    return results


def default_mesh() -> jax.sharding.Mesh | None:
    """A member mesh when more than one (global) device exists, else None (plain vmap)."""
    return member_mesh() if jax.device_count() > 1 else None


def summarize(results: Sequence[MemberResult]) -> dict[str, int]:
    """Counts per status, for the end-of-run line and the tests."""
    out: dict[str, int] = {}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def num_array_tasks(num_members: int, members_per_task: int) -> int:
    """How many array tasks cover ``num_members`` at ``members_per_task`` each."""
    return max(1, math.ceil(num_members / max(1, members_per_task)))
