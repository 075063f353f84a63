"""The in-context regression loss: squared error of the query prediction."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from icl_gd.config import Config
from icl_gd.data import Tasks
from icl_gd.model import Params, apply


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """E[(yhat - y_q)^2] over the batch (no 1/2: the papers' L(theta), so L* is comparable)."""
    chex.assert_equal_shape([pred, target])
    return jnp.mean(jnp.square(pred - target))


def task_loss(params: Params, tasks: Tasks, cfg: Config) -> jax.Array:
    """Mean squared query error of the model on a batch of tasks."""
    return mse(apply(params, tasks.x, tasks.y, tasks.x_query, cfg), tasks.y_query)
