"""``barrier``: the identity as a materialised array that XLA:CPU cannot fuse into its consumers.

Shared by the sampler (``data.normal``) and the model's Gram layers (``model``): both hit
XLA:CPU fusion choices that cost several times the arithmetic (docs/BENCHMARKS.md, round 4-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import custom_batching


def _cpu_barrier(x: jax.Array) -> jax.Array:
    # A conditional is a fusion boundary, and XLA cannot prove ``x[0] > inf`` false, so the
    # operand is computed once; the other branch never runs (nothing exceeds inf, NaN included).
    return jax.lax.cond(x.reshape(-1)[0] > jnp.inf, jnp.zeros_like, lambda a: a, x)


@custom_batching.custom_vmap
def barrier(x: jax.Array) -> jax.Array:
    """The identity, computed as a materialised array that XLA:CPU cannot fuse into consumers.

    Why: XLA:CPU duplicates cheap elementwise producers into every consumer fusion, even one
    that reads each element many times, and it drops ``optimization_barrier``. A chain of k
    unrolled per-task (d+1) x (d+1) matmuls then costs (d+1)^(k-1) times its arithmetic: the
    gradient of a 4-layer model fused the layers' backward products into chains and ran 3x
    slower. It also fuses a reshape into its producer, so a flat loop of random draws becomes a
    loop over a [.., d] array with a minor axis too short to vectorise (6x slower at d=5).
    docs/BENCHMARKS.md has the numbers. Other backends fuse with a cost model and get the
    plain identity.
    """
    return jax.lax.platform_dependent(x, cpu=_cpu_barrier, default=lambda a: a)


@barrier.def_vmap
def _barrier_vmap(axis_size: int, in_batched: list[bool], x: jax.Array) -> tuple[jax.Array, bool]:
    # Under vmap (sweep members) the barrier stays one conditional on the whole stacked array;
    # a batched predicate would turn it into a select that XLA fuses away.
    return barrier(x), in_batched[0]
