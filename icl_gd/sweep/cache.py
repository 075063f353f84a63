"""What a finished sweep keeps so that re-running it costs no training and no analysis.

Each member folder stores its aggregated CSV row (``ROW_NAME``) under a key of everything the
row depends on (row version, the member's last saved step, baseline settings, config); the
sweep root stores the digest of the rows the CSV and figures were drawn from (``MANIFEST_NAME``).
This module imports neither JAX nor orbax, so ``launch.sweep`` can tell in a fraction of a second
that a re-run has nothing to do (``up_to_date``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from icl_gd.checkpoint import atomic_open, check_same_run, saved_steps
from icl_gd.config import Config
from icl_gd.sweep.grid import member_name

ROW_NAME = "aggregate_row.json"
MANIFEST_NAME = "aggregate_manifest.json"
ROW_VERSION = 1  # bump when the row's columns change: stored rows of other versions are recomputed
BASELINE_TUNE_TASKS = 4096  # Monte-Carlo tasks that tune the GD / PGD step sizes of each member
CSV_NAME = "sweep_results.csv"


def latest_step(workdir: str) -> int | None:
    steps = saved_steps(workdir)
    return steps[-1] if steps else None


def row_key(cfg: Config, root: str, baselines: bool) -> dict[str, Any]:
    return {"version": ROW_VERSION, "final_step": latest_step(os.path.join(root, member_name(cfg))),
            "baselines": baselines, "tune_tasks": BASELINE_TUNE_TASKS, "config": cfg.to_dict()}


def load_row(cfg: Config, root: str, baselines: bool) -> dict[str, Any] | None:
    """The member's stored row if its key still holds, else None."""
    path = os.path.join(root, member_name(cfg), ROW_NAME)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path) as f:
            stored = json.load(f)
        if stored["key"] == row_key(cfg, root, baselines):
            return stored["row"]
    return None


def store_row(cfg: Config, root: str, baselines: bool, row: dict[str, Any]) -> None:
    with atomic_open(os.path.join(root, member_name(cfg), ROW_NAME)) as f:  # processes may write the same row
        json.dump({"key": row_key(cfg, root, baselines), "row": row}, f)


def output_paths(root: str, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The CSV and the figures drawn from ``rows`` (eta vs noise needs a depth-1 member with a learned eta)."""
    paths = {"csv": os.path.join(root, CSV_NAME), "loss_vs_depth": os.path.join(root, "loss_vs_depth.png")}
    if any(int(r["depth"]) == 1 and _finite(r.get("eta_learned")) for r in rows):
        paths["eta_vs_noise"] = os.path.join(root, "eta_vs_noise.png")
    return paths


def _finite(v: Any) -> bool:
    try:
        return abs(float(v)) < float("inf")
    except (TypeError, ValueError):
        return False


def digest(rows: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps([ROW_VERSION, list(rows)], sort_keys=True, default=str).encode()).hexdigest()


def outputs_current(root: str, rows: Sequence[dict[str, Any]]) -> bool:
    """The CSV and figures exist and were drawn from exactly these rows."""
    paths = output_paths(root, rows)
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(root, MANIFEST_NAME)) as f:
            return json.load(f) == {"digest": digest(rows), "paths": paths} and all(map(os.path.exists, paths.values()))
    return False


def record_outputs(root: str, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_open(os.path.join(root, MANIFEST_NAME)) as f:
        json.dump({"digest": digest(rows), "paths": output_paths(root, rows)}, f)


def up_to_date(members: Sequence[Config], root: str, baselines: bool) -> dict[str, str] | None:
    """The output paths when every member is trained to its ``steps`` (with the same config),
    its row is stored and the CSV and figures are current; else None (there is work to do)."""
    rows = []
    for cfg in members:
        workdir = os.path.join(root, member_name(cfg))
        last = latest_step(workdir)
        if last is None or last < cfg.steps:
            return None
        check_same_run(workdir, cfg)
        row = load_row(cfg, root, baselines)
        if row is None:
            return None
        rows.append(row)
    return output_paths(root, rows) if outputs_current(root, rows) else None
