"""Open a trained run from Python in one line: ``run = icl_gd.load(workdir)``."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from icl_gd.checkpoint import Checkpointer, read_config
from icl_gd.config import Config, ConfigFileError
from icl_gd.data import covariance_matrix, prior_covariance
from icl_gd.errors import UnreadableRunError
from icl_gd.model import Params, apply
from icl_gd.train import TrainState, init_state

if TYPE_CHECKING:  # icl_gd.nn imports flax: loaded only by Run.flax_module
    from icl_gd.nn import LSA


@dataclasses.dataclass(frozen=True)
class Run:
    """A checkpointed run: its config, named params (``params['layers'][l]['W_K']``, ...,
    ``params['h']``), step, metrics history and the Sigma it trained on."""

    workdir: str
    config: Config
    params: Params
    step: int
    metrics: list[dict]
    opt_state: Any = None

    @property
    def covariance(self) -> np.ndarray:
        """The d x d Sigma = E[x x^T] of the training distribution."""
        return covariance_matrix(self.config)

    @property
    def prior_covariance(self) -> np.ndarray:
        """Omega = E[w w^T] of the training distribution."""
        return prior_covariance(self.config)

    def predict(self, x: Any, y: Any, x_query: Any) -> np.ndarray:
        """Model predictions [B] for x [B, n, d], y [B, n], x_query [B, d] (NumPy or JAX)."""
        x, y, x_query = (jnp.asarray(a, jnp.float32) for a in (x, y, x_query))
        cfg = self.config
        b = x.shape[0]
        chex.assert_shape(x, (b, cfg.n, cfg.d))
        chex.assert_shape(y, (b, cfg.n))
        chex.assert_shape(x_query, (b, cfg.d))
        return np.asarray(_jitted_apply(cfg)(self.params, x, y, x_query))

    def flax_module(self) -> LSA:
        """This run's LSA as a Flax NNX module (``icl_gd.nn.LSA``: ``W_K``, ``W_Q``, ``W_V`` per layer
        and ``h`` as ``nnx.Param``s) to train inside a larger Flax model; ``module.to_params()``
        gives the icl-gd pytree back. Flax loads here, not on ``import icl_gd``."""
        from icl_gd.nn import LSA

        return LSA.from_params(self.params, self.config)

    def evaluate(self, num_tasks: int | None = None, references: bool = True, num_tune_tasks: int = 2**14,
                 **overrides: Any) -> dict[str, dict]:
        """Held-out loss (with standard error and median) of the trained model on tasks from this run's
        distribution with task fields overridden, e.g. ``run.evaluate(n=40)`` (test-time context
        length: the layers then average over 40 tokens, 1/n = 1/40), ``run.evaluate(x_scale=2)``,
        ``run.evaluate(covariance="cond", cond=100)`` or ``run.evaluate(noise=1.0)``; beside it the
        baselines tuned for that distribution and, where it exists, the theory's loss of the model
        (``icl_gd.theory.shifted``)."""
        from icl_gd.theory import shifted

        return shifted.evaluate(self.config, self.params, num_tasks, references, num_tune_tasks, **overrides)


@functools.lru_cache(maxsize=32)
def _jitted_apply(cfg: Config):
    return jax.jit(functools.partial(apply, cfg=cfg))


def load(workdir: str, step: int | None = None) -> Run:
    """Load the latest (or the given) checkpoint of the run in ``workdir``."""
    ckpt = Checkpointer(workdir, read_only=True)
    if ckpt.latest_step() is None:
        moved = f"; moved the unreadable steps {sorted(ckpt.moved)} to {workdir}/corrupt" if ckpt.moved else ""
        raise UnreadableRunError(f"no checkpoint under {workdir}/checkpoints{moved}")
    cfg = None
    if step is None:
        try:
            cfg = read_config(workdir)
        except ConfigFileError as e:
            logging.warning("%s; using the config stored in the checkpoint", e)
    cfg = cfg or ckpt.restore_config(step)
    template = init_state(cfg)
    state, cfg, history = ckpt.restore(template, step)
    state = TrainState(*state) if not isinstance(state, TrainState) else state
    ckpt.close()
    return Run(workdir, cfg, state.params, int(state.step), history, state.opt_state)
