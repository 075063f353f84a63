"""End-to-end training: the 1-layer optimum, checkpoints, exact resume, the NaN guard."""

import dataclasses
import re

import jax
import numpy as np
import pytest

import icl_gd
from icl_gd import theory
from icl_gd.checkpoint import ConfigMismatchError
from icl_gd.config import Config
from icl_gd.model import apply
from icl_gd.train import NonFiniteLossError, train


def test_one_layer_reaches_the_one_step_gd_optimum():
    """Mahankali et al. 2023, Thm. 1: the trained 1-layer LSA is one GD step with eta*."""
    cfg = Config(d=3, n=10, noise=0.5, steps=1500, batch_size=1024, lr=3e-3, eval_tasks=65536,
                 log_every=1500, checkpoint_every=1500)
    res = train(cfg)
    l_star = theory.isotropic_loss_star(10, 3, 0.5)
    assert l_star == pytest.approx(0.25 + 3 * 4.25 / 14.25)
    assert res.summary["loss_star"] == pytest.approx(l_star, rel=1e-12)
    assert res.summary["eval_loss"] == pytest.approx(l_star, rel=0.03)
    assert res.summary["eta_star"] == pytest.approx(10 / 14.25, rel=1e-12)
    assert res.summary["eta_learned"] == pytest.approx(10 / 14.25, rel=0.03)


@pytest.fixture
def tiny() -> Config:
    return Config(d=3, n=5, batch_size=32, steps=200, log_every=50, checkpoint_every=100, eval_tasks=256)


def test_checkpoint_round_trip(tmp_path, tiny):
    res = train(tiny, str(tmp_path))
    run = icl_gd.load(str(tmp_path))
    assert run.step == 200 and run.config == tiny
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(res.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert run.params["layers"][0]["W_K"].shape == (4, 4)
    assert [m["step"] for m in run.metrics] == [50, 100, 150, 200]
    np.testing.assert_allclose(run.covariance, np.eye(3))
    rng = np.random.default_rng(0)
    x, y, xq = rng.standard_normal((7, 5, 3)), rng.standard_normal((7, 5)), rng.standard_normal((7, 3))
    pred = run.predict(x, y, xq)
    assert pred.shape == (7,)
    np.testing.assert_allclose(pred, apply(res.state.params, x.astype(np.float32), y.astype(np.float32),
                                           xq.astype(np.float32), tiny), rtol=1e-6)
    assert icl_gd.load(str(tmp_path), step=100).step == 100


def test_resume_is_exact(tmp_path):
    cfg = Config(d=3, n=5, batch_size=64, steps=2000, log_every=500, checkpoint_every=1000, eval_tasks=256,
                 covariance="cond", cond=4.0, noise=0.2)
    straight = train(cfg, str(tmp_path / "straight"))
    first = train(cfg, str(tmp_path / "resumed"), until=1000)
    assert int(first.state.step) == 1000
    resumed = train(cfg, str(tmp_path / "resumed"))
    assert int(resumed.state.step) == 2000
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m["step"] for m in resumed.history] == [500, 1000, 1500, 2000]


def test_different_config_is_refused_but_bookkeeping_may_change(tmp_path, tiny):
    train(tiny, str(tmp_path), until=100)
    with pytest.raises(ConfigMismatchError, match="--noise"):
        train(dataclasses.replace(tiny, noise=0.1), str(tmp_path))
    res = train(dataclasses.replace(tiny, log_every=100), str(tmp_path))
    assert int(res.state.step) == 200


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # The warm-up ramps the step size from 0 to 0.3: sane at first (checkpoints get written), then it diverges.
    cfg = Config(d=3, n=5, batch_size=32, steps=400, log_every=25, checkpoint_every=25, eval_tasks=64,
                 lr=0.3, optimizer="sgd", schedule="warmup_cosine", warmup_steps=300)
    with pytest.raises(NonFiniteLossError, match="lower --lr") as err:
        train(cfg, str(tmp_path))
    run_steps = icl_gd.checkpoint.Checkpointer(str(tmp_path), read_only=True).all_steps()
    bad_step = int(re.search(r"non-finite training loss at step (\d+)", str(err.value)).group(1))
    # Every kept step precedes the first non-finite loss (a checkpoint AT bad_step would hold the
    # very params whose loss was non-finite), and the latest one is the step the message names.
    assert run_steps and max(run_steps) < bad_step < cfg.steps
    assert f"last good checkpoint kept: step {max(run_steps)}" in str(err.value)
    latest = icl_gd.load(str(tmp_path))
    assert latest.step == max(run_steps)
    assert [m["step"] for m in latest.metrics] == [25 * (i + 1) for i in range(latest.step // 25)]
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["eval_loss"]) for m in latest.metrics)
    for step in run_steps:
        run = icl_gd.load(str(tmp_path), step=step)
        assert run.step == step
        assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves((run.params, run.opt_state)))


def test_kept_heldout_set_is_the_drawn_one():
    """The loop keeps the held-out set when it is small and draws it again chunk by chunk when not: both
    score the same tasks (those the baselines are scored on), so the eval loss is the same."""
    from icl_gd.data import distribution
    from icl_gd.keys import heldout_stored, run_keys
    from icl_gd.model import init_params
    from icl_gd.theory import baselines
    from icl_gd.train import make_eval, make_heldout

    cfg = Config(d=3, n=10, eval_tasks=5000, covariance="cond", cond=5.0, noise=0.3)
    assert heldout_stored(cfg) and not heldout_stored(dataclasses.replace(cfg, n=4096, eval_tasks=65536))
    dist, key = distribution(cfg), run_keys(cfg.seed)["eval"]
    kept = jax.jit(make_heldout(cfg))(dist, key)
    np.testing.assert_array_equal(kept.x[1], baselines.heldout_chunk(key, 1, dist, baselines.TaskSpec.from_config(cfg),
                                                                       4096).x)
    params = init_params(jax.random.PRNGKey(1), cfg)
    score = jax.jit(make_eval(cfg))
    np.testing.assert_allclose(float(score(params, kept)), float(score(params, (dist, key))), rtol=1e-6)
