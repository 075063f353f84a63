"""Key streams and the held-out set of a run, stated once.

With root = PRNGKey(seed): the init key is fold_in(root, 0), the data key of step t is
fold_in(fold_in(root, 1), t), held-out chunk j uses fold_in(fold_in(root, 2), j) and the tasks
that tune the baselines come from fold_in(root, 3). A run resumed from step t therefore sees
exactly the tasks the uninterrupted run saw, and no baseline is ever tuned on held-out tasks.
"""

from __future__ import annotations

import math

import jax

from icl_gd.config import Config

EVAL_CHUNK = 4096  # tasks per held-out chunk; bounds eval memory at large n
# A training loop keeps its held-out set in memory when it takes at most this many bytes per run
# (65536 tasks at d=5, n=20: 33 MB); a larger one is drawn again, chunk by chunk, at every evaluation.
STORED_HELDOUT_BYTES = 2**26


def run_keys(seed: int) -> dict[str, jax.Array]:
    root = jax.random.PRNGKey(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "train", "eval"))}


TUNE_KEY_INDEX = 3  # fold_in(PRNGKey(seed), i): 0-2 are init/train/eval (run_keys); 3 tunes baselines


def tune_key(seed: int) -> jax.Array:
    """The key of the tasks baselines are tuned on: disjoint from the init, train and eval streams."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), TUNE_KEY_INDEX)


def eval_chunks(cfg: Config) -> tuple[int, int]:
    """(number of chunks, tasks per chunk) of the held-out set (eval_tasks rounded up)."""
    size = min(cfg.eval_tasks, EVAL_CHUNK)
    return math.ceil(cfg.eval_tasks / size), size


def heldout_bytes(cfg: Config) -> int:
    """float32 bytes of the whole held-out set: (n+1) (d+1) numbers per task."""
    num, size = eval_chunks(cfg)
    return num * size * (cfg.n + 1) * (cfg.d + 1) * 4


def heldout_stored(cfg: Config) -> bool:
    """Does a training loop keep the held-out set of ``cfg`` between evaluations (``STORED_HELDOUT_BYTES``)?"""
    return heldout_bytes(cfg) <= STORED_HELDOUT_BYTES
