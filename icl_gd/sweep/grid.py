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
"""


from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

from icl_gd.config import OPERATIONAL_FIELDS, Config, ConfigError

# Fields that only change the Distribution arrays or the keys: members differing only in these
# share one compiled program.
VMAPPABLE_FIELDS = ("covariance", "cond", "eigenvalues", "rotate", "rotation_seed", "weight_prior", "noise", "seed",
                    "x_scale", "w_scale", "prior_eigenvalues", "prior_mean")
# Fields added after sweeps existed: hashed only when set, so older members keep their folder names.
HASHED_WHEN_SET = ("x_scale", "w_scale", "prior_eigenvalues", "prior_mean")

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


# ---------------------------------------------------------------------------------------
# Grid expansion and naming (pure).
# ---------------------------------------------------------------------------------------
def parse_covariance(entry: str) -> dict[str, Any]:
    """Config fields for one covariance-axis entry; ``ConfigError`` (field 'covariances') if malformed."""
    entry = entry.strip()
    if entry in ("isotropic", "iso"):
        return {"covariance": "isotropic", "eigenvalues": ()}
    m = re.fullmatch(rf"cond({_NUM})", entry)
    if m:
        return {"covariance": "cond", "cond": float(m.group(1)), "eigenvalues": ()}
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
    default = Config().to_dict()  # compared as dicts: a tuple field is a list in both
    data = {k: v for k, v in cfg.to_dict().items()
            if k not in OPERATIONAL_FIELDS and not (k in HASHED_WHEN_SET and v == default[k])}
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
