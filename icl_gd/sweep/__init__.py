"""Sweeps: a grid of configs (``grid``), trained group by group in one vmapped program each
(``engine``), claimed per member across processes (``locks``), emitted as SLURM arrays
(``cluster``) and collected into a CSV with figures (``aggregate``).

``from icl_gd import sweep`` gives the grid and engine API; ``icl_gd.sweep.aggregate``,
``icl_gd.sweep.cluster`` and ``icl_gd.sweep.locks`` are imported by name where they are used.
"""

from typing import Any

from icl_gd.sweep.grid import (
    VMAPPABLE_FIELDS,
    Axes,
    config_hash,
    covariance_label,
    expand,
    expand_union,
    group,
    group_key,
    member_name,
    parse_covariance,
    shard,
)

__all__ = ["VMAPPABLE_FIELDS", "Axes", "MemberResult", "config_hash", "covariance_label", "default_mesh", "expand",
           "expand_union", "group", "group_key", "make_group_fns", "member_name", "num_array_tasks",
           "parse_covariance", "run_slice", "run_sweep", "shard", "summarize", "train_group"]

_ENGINE = ("MemberResult", "default_mesh", "make_group_fns", "num_array_tasks", "run_slice", "run_sweep", "summarize",
           "train_group")


def __getattr__(name: str) -> Any:
    """The engine (and JAX with it) loads on first use: a re-run of a finished sweep never needs it."""
    if name in _ENGINE:
        from icl_gd.sweep import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'icl_gd.sweep' has no attribute {name!r}")
