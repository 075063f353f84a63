"""Independent oracles for the paths that had none: softmax attention against a NumPy loop,
restoring an old checkpoint step against a run stopped there, and an in-process SIGTERM."""

import os
import re
import signal

import jax
import numpy as np
import pytest

import icl_gd
from icl_gd import model
from icl_gd.checkpoint import Checkpointer
from icl_gd.config import Config
from icl_gd.train import Preempted, train

# --- softmax attention ---------------------------------------------------------------------


def _softmax(s: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_oracle(params, x, y, x_query, cfg: Config, residual: bool = True, axis: str = "keys",
                   scale: float = 1.0) -> np.ndarray:
    """yhat [B] by explicit float64 loops, straight from the conventions in ``icl_gd.model``:
    tokens z_i = [x_i, y_i], z_q = [x_q, 0]; per head q_j = W_Q z_j, k_i = W_K z_i, v_i = W_V z_i
    over the n context keys only; score k_i^T q_j, softmax over the keys i of each row j;
    z_j <- z_j + sum_heads sum_i a_ji v_i for every row j (no 1/n); yhat = h^T z_q.

    ``residual``, ``axis`` ("keys" or the wrong "queries") and ``scale`` (1/n: the linear
    model's factor) build the mutants that show the comparison can fail."""
    heads, n, dim = cfg.heads, cfg.n, cfg.d + 1
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    layers = [p["layers"][0]] * cfg.depth if cfg.tie_weights else p["layers"]
    per_head = (lambda w: w) if heads > 1 else (lambda w: w[None])
    preds = np.zeros(x.shape[0])
    for b in range(x.shape[0]):
        z = np.zeros((n + 1, dim))
        for i in range(n):
            z[i, : dim - 1], z[i, dim - 1] = x[b, i], y[b, i]
        z[n, : dim - 1] = x_query[b]
        for layer in layers:
            wk, wq, wv = (per_head(layer[k]) for k in ("W_K", "W_Q", "W_V"))
            new = z.copy() if residual else np.zeros_like(z)
            for hd in range(heads):
                scores = np.zeros((n + 1, n))
                for j in range(n + 1):
                    q = wq[hd] @ z[j]
                    for i in range(n):
                        scores[j, i] = (wk[hd] @ z[i]) @ q
                attn = _softmax(scores, axis=1 if axis == "keys" else 0)
                for j in range(n + 1):
                    for i in range(n):
                        new[j] += scale * attn[j, i] * (wv[hd] @ z[i])
            z = new
        preds[b] = p["h"] @ z[n]
    return preds


def _inputs(cfg: Config, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.n, cfg.d)).astype(np.float32)
    y = rng.standard_normal((batch, cfg.n)).astype(np.float32)
    return x, y, rng.standard_normal((batch, cfg.d)).astype(np.float32)


@pytest.mark.parametrize("depth,heads,key_size", [(1, 1, 0), (2, 1, 0), (1, 2, 0), (2, 2, 0), (2, 2, 2)])
def test_softmax_attention_matches_a_numpy_loop_oracle(depth, heads, key_size):
    cfg = Config(d=3, n=6, depth=depth, heads=heads, key_size=key_size, attention="softmax",
                 parameterization="full", init_scale=0.5)
    params = model.init_params(jax.random.PRNGKey(10 * depth + heads + key_size), cfg)
    x, y, xq = _inputs(cfg, batch=8, seed=depth + heads)
    got = np.asarray(model.apply(params, x, y, xq, cfg))
    want = softmax_oracle(params, x, y, xq, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # The first layer's attention of the query row is far from uniform (mean largest weight well
    # above 1/n), so a softmax over the wrong axis or a missing residual cannot hide.
    p0 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["layers"][0])
    wk, wq = (p0[k] if heads > 1 else p0[k][None] for k in ("W_K", "W_Q"))
    zc = np.concatenate([x, y[..., None]], -1).astype(np.float64)
    zq = np.concatenate([xq, np.zeros((len(xq), 1))], -1)
    scores = np.einsum("bi,hki,hkj,bnj->bhn", zq, wq, wk, zc)
    assert _softmax(scores, axis=-1).max(-1).mean() > 2.0 / cfg.n

    # Power: each mutant of the oracle misses apply by far more than the tolerance above.
    scale = np.abs(want).max()
    for mutant in (dict(residual=False), dict(axis="queries"), dict(scale=1.0 / cfg.n)):
        wrong = softmax_oracle(params, x, y, xq, cfg, **mutant)
        assert np.abs(wrong - got).max() > 0.05 * scale, mutant


# --- restoring an old checkpoint step ------------------------------------------------------


def _assert_trees_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb) > 0
    for u, v in zip(la, lb):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def test_old_step_restores_the_state_of_a_run_stopped_there(tmp_path):
    """load(workdir, step=S1) of a run trained to S2 is bit for bit the state of the same config
    stopped at S1 (``until``: same cosine schedule over ``steps``), params AND Adam state."""
    s1, s2 = 100, 200
    cfg = Config(d=3, n=5, batch_size=32, steps=s2, log_every=25, checkpoint_every=50, keep_checkpoints=10,
                 eval_tasks=64, noise=0.2)
    full = train(cfg, str(tmp_path))
    assert Checkpointer(str(tmp_path), read_only=True).all_steps() == [50, 100, 150, 200]
    stopped = train(cfg, until=s1)  # in memory, no checkpoint involved
    assert int(stopped.state.step) == s1
    old = icl_gd.load(str(tmp_path), step=s1)
    assert old.step == s1 and old.config == cfg
    _assert_trees_equal(old.params, stopped.state.params)
    _assert_trees_equal(old.opt_state, stopped.state.opt_state)
    assert [(m["step"], m["train_loss"], m["eval_loss"]) for m in old.metrics] == \
        [(m["step"], m["train_loss"], m["eval_loss"]) for m in stopped.history]
    # Not vacuous: the latest step holds a different state.
    assert not np.array_equal(np.asarray(old.params["h"]), np.asarray(full.state.params["h"]))


# --- SIGTERM, in process ------------------------------------------------------------------


@pytest.fixture
def sigterm_fallback():
    """A SIGTERM handler that only records, so that a signal train() failed to catch ends the
    test with a failure instead of killing pytest; the previous handler comes back after."""
    caught = []

    def handler(*_):
        caught.append(True)

    previous = signal.signal(signal.SIGTERM, handler)
    yield caught, handler
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_inside_train_saves_at_the_next_boundary_and_resumes_exactly(tmp_path, sigterm_fallback):
    """SIGTERM sent to this process from the log callback after step 50: the flag stops the run
    at the end of the next compiled call (step 75, not a checkpoint_every step) with a checkpoint
    there and ``Preempted``; resuming ends bit-identical to an uninterrupted run."""
    cfg = Config(d=3, n=5, batch_size=32, steps=200, log_every=25, checkpoint_every=100, eval_tasks=64, noise=0.2)
    straight = train(cfg)
    sent = []

    def log(line: str) -> None:
        m = re.match(r"step\s+(\d+)\b", line)
        if m and int(m.group(1)) == 50 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="SIGTERM at step 75"):
        train(cfg, str(tmp_path), log=log)
    caught, fallback = sigterm_fallback
    assert sent and not caught  # sent, and caught by train's handler, not the fallback
    assert signal.getsignal(signal.SIGTERM) is fallback  # train put the previous handler back
    assert Checkpointer(str(tmp_path), read_only=True).all_steps() == [75]
    assert icl_gd.load(str(tmp_path)).step == 75
    resumed = train(cfg, str(tmp_path))
    assert int(resumed.state.step) == 200
    _assert_trees_equal(resumed.state, straight.state)
    assert [m["step"] for m in resumed.history] == [25, 50, 75, 100, 125, 150, 175, 200]
