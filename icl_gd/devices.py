"""Members over devices and processes: stack runs on a leading axis, shard it, bring it home.

A sweep group trains M same-shape runs as one vmapped program whose member axis is split over
a 1-D mesh of every (global) device; under jax.distributed each process holds the full host
copy and fills its own shards. ``agree`` and ``barrier`` keep processes in step (no-ops alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MEMBER_AXIS = "members"


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


def agree(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process (itself when single-process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
