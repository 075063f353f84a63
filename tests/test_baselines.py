"""Baselines: exactness of OLS, ridge == Gaussian posterior mean, and the held-out harness."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import Tasks, covariance_matrix, distribution, prior_covariance
from icl_gd.keys import run_keys
from icl_gd.model import gd_params
from icl_gd.theory import baselines
from icl_gd.train import make_eval, make_heldout

Z = 5.0


def _tasks(d: int, n: int, noise: float, seed: int, omega: np.ndarray | None = None, batch: int = 64):
    rng = np.random.default_rng(seed)
    sigma = np.diag(np.linspace(1.0, 0.25, d))
    omega = np.eye(d) if omega is None else omega
    x = rng.multivariate_normal(np.zeros(d), sigma, size=(batch, n + 1))
    w = rng.multivariate_normal(np.zeros(d), omega, size=batch)
    y = np.einsum("bnd,bd->bn", x, w) + noise * rng.standard_normal((batch, n + 1))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Tasks(f32(x[:, :n]), f32(y[:, :n]), f32(x[:, n]), f32(y[:, n])), x, y, w


def _kernel_posterior_mean(x: np.ndarray, y: np.ndarray, omega: np.ndarray, noise: float) -> np.ndarray:
    """E[w | X, y] by Gaussian conditioning of (w, y): Cov(w, y) Cov(y)^-1 y = Omega X^T (X Omega X^T + s^2 I)^-1 y."""
    n = x.shape[1]
    k = np.einsum("bnd,de,bme->bnm", x, omega, x) + noise**2 * np.eye(n)
    return np.einsum("de,bne,bn->bd", omega, x, np.linalg.solve(k, y[..., None])[..., 0])


def test_ols_exact_on_noiseless_overdetermined_tasks():
    for d, n in ((3, 3), (3, 10)):
        tasks, x, y, w = _tasks(d, n, 0.0, seed=n)
        np.testing.assert_allclose(baselines.ols_weights(tasks.x, tasks.y), w, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(baselines.ols_predict(tasks), tasks.y_query, rtol=2e-3, atol=2e-3)
    # n < d: the minimum-norm interpolant fits the context exactly but cannot recover w
    tasks, x, y, w = _tasks(4, 2, 0.0, seed=1)
    w_hat = np.asarray(baselines.ols_weights(tasks.x, tasks.y))
    np.testing.assert_allclose(np.einsum("bnd,bd->bn", x[:, :2], w_hat), y[:, :2], atol=1e-3)
    assert np.abs(w_hat - w).max() > 0.1


def test_ols_by_qr_is_the_pseudo_inverse_solution():
    """n >= d goes through QR: the same least-squares weights as X^+ y, noisy tasks, to float64 precision."""
    for d, n in ((3, 3), (5, 20)):
        _, x, y, _ = _tasks(d, n, 1.0, seed=d + n)
        expected = np.einsum("bdn,bn->bd", np.linalg.pinv(x[:, :n]), y[:, :n])
        np.testing.assert_allclose(baselines.ols_weights(x[:, :n], y[:, :n]), expected, rtol=1e-9, atol=1e-12)


def test_model_predictor_depends_on_the_model_fields_alone():
    """Runs that differ outside ``MODEL_FIELDS`` share one predictor (one jit key, one compile), and it
    predicts what ``model.apply`` does with the run's own config."""
    from icl_gd.model import apply, init_params

    cfg = Config(d=3, n=6, depth=2, parameterization="block", heads=1).validate()
    other = dataclasses.replace(cfg, covariance="cond", cond=5.0, noise=0.5, lr=0.01, seed=3, steps=7,
                                batch_size=32, init_scale=0.3, weight_prior="inverse").validate()
    assert baselines.model_predictor(cfg) is baselines.model_predictor(other)
    assert baselines.model_predictor(cfg) is not baselines.model_predictor(dataclasses.replace(cfg, depth=3))
    params = init_params(jax.random.PRNGKey(0), other)
    tasks, *_ = _tasks(3, 6, 0.5, seed=4)
    np.testing.assert_array_equal(np.asarray(baselines.model_predictor(cfg)(tasks, params)),
                                  np.asarray(apply(params, tasks.x, tasks.y, tasks.x_query, other)))


@pytest.mark.parametrize("d,n,noise", [(3, 10, 0.5), (4, 2, 0.3), (3, 5, 2.0)])
def test_ridge_is_the_posterior_mean(d, n, noise):
    a = np.random.default_rng(d + n).standard_normal((d, d))
    omega = a @ a.T / d + 0.3 * np.eye(d)
    tasks, x, y, _ = _tasks(d, n, noise, seed=2, omega=omega)
    ours = baselines.posterior_mean_weights(tasks.x, tasks.y, jnp.asarray(np.linalg.inv(omega), jnp.float32),
                                            jnp.float32(noise))
    np.testing.assert_allclose(ours, _kernel_posterior_mean(x[:, :n], y[:, :n], omega, noise), rtol=2e-3, atol=2e-3)


def test_noiseless_posterior_mean():
    d = 4
    a = np.random.default_rng(0).standard_normal((d, d))
    omega = a @ a.T / d + 0.3 * np.eye(d)
    lam, u = np.linalg.eigh(omega)
    omega_sqrt = jnp.asarray((u * np.sqrt(lam)) @ u.T, jnp.float32)
    tasks, x, y, w = _tasks(d, 2, 0.0, seed=3, omega=omega)  # n < d: the prior decides
    ours = baselines.noiseless_posterior_mean_weights(tasks.x, tasks.y, omega_sqrt)
    np.testing.assert_allclose(ours, _kernel_posterior_mean(x[:, :2], y[:, :2], omega, 0.0), rtol=2e-3, atol=2e-3)
    tasks, x, y, w = _tasks(d, 9, 0.0, seed=4, omega=omega)  # n >= d: the data decide, w is recovered
    np.testing.assert_allclose(baselines.noiseless_posterior_mean_weights(tasks.x, tasks.y, omega_sqrt), w,
                               rtol=3e-3, atol=3e-3)


def test_evaluate_on_the_heldout_tasks_of_a_run():
    """Scores share train.make_eval's tasks exactly, and their order is what theory predicts."""
    cfg = Config(d=3, n=10, covariance="cond", cond=4.0, weight_prior="identity", noise=0.5, eval_tasks=4096)
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    g_star, l_star = theory.config_optimum(cfg)
    params = gd_params(cfg, g_star)  # a model that is exactly the best one-layer LSA
    res = baselines.evaluate(cfg, max_steps=2, params=params, gamma_one_layer=g_star, num_tune_tasks=2**14)
    assert set(res) == {"zero", "ols", "bayes", "one_layer_opt", "gd_1", "gd_2", "pgd_1", "pgd_2", "model"}

    eval_loss = float(make_eval(cfg)(params, make_heldout(cfg)(distribution(cfg), run_keys(cfg.seed)["eval"])))
    np.testing.assert_allclose(res["model"]["loss"], eval_loss, rtol=1e-5)
    np.testing.assert_allclose(res["model"]["loss"], res["one_layer_opt"]["loss"], rtol=1e-4)

    def close(name, exact):
        assert abs(res[name]["loss"] - exact) <= Z * res[name]["stderr"], (name, res[name], exact)

    close("zero", np.trace(sigma @ omega) + cfg.noise**2)
    close("one_layer_opt", l_star)
    close("gd_1", theory.loss_of_gamma(res["gd_1"]["step_sizes"][0] * np.eye(3), sigma, omega, cfg.n, cfg.noise))
    np.testing.assert_allclose(res["gd_1"]["step_sizes"], [theory.best_scale(np.eye(3), sigma, omega, 10, 0.5)])
    # The posterior mean is the best predictor there is; more GD steps help; the best Gamma beats any eta I.
    assert res["bayes"]["loss"] < min(v["loss"] for k, v in res.items() if k != "bayes")
    assert res["bayes"]["loss"] > cfg.noise**2 - Z * res["bayes"]["stderr"]
    assert res["gd_2"]["loss"] < res["gd_1"]["loss"] and res["pgd_2"]["loss"] < res["pgd_1"]["loss"]
    assert res["one_layer_opt"]["loss"] < min(res["gd_1"]["loss"], res["pgd_1"]["loss"])
    assert len(res["gd_2"]["step_sizes"]) == 2 and all(e > 0 for e in res["gd_2"]["step_sizes"])


def test_tune_key_is_disjoint_from_the_run_streams():
    keys = [np.asarray(jax.random.key_data(k)) for k in run_keys(0).values()]
    tk = np.asarray(jax.random.key_data(baselines.tune_key(0)))
    assert not any(np.array_equal(tk, k) for k in keys)


def test_paired_stderr_is_the_spread_of_the_difference_of_means():
    """Two predictors on the same tasks share each task's difficulty: the paired standard error
    matches the repeat-to-repeat spread of mean(a) - mean(b), far below the unpaired one."""
    rng = np.random.default_rng(0)
    diffs, paired, unpaired = [], [], []
    for _ in range(400):
        hard = rng.exponential(size=2000)
        a, b = hard * (1 + 0.01 * rng.normal(size=2000)), hard * (1 + 0.01 * rng.normal(size=2000))
        diffs.append(a.mean() - b.mean())
        paired.append(baselines.paired_stderr(a, b))
        unpaired.append(np.hypot(a.std(ddof=1), b.std(ddof=1)) / np.sqrt(a.size))
    assert abs(np.mean(paired) / np.std(diffs) - 1) < 0.1
    assert np.mean(paired) < 0.05 * np.mean(unpaired)


def test_members_of_one_distribution_share_their_baselines(monkeypatch):
    """A depth ladder (same tasks, different models) tunes and scores its baselines once; a change
    of anything the tasks depend on (here the noise) computes them afresh."""
    calls = []
    real = baselines.baseline_predictors
    monkeypatch.setattr(baselines, "baseline_predictors", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(baselines, "_BASELINE_CACHE", {})
    base = Config(d=2, n=6, eval_tasks=512, parameterization="sparse", weight_prior="inverse")
    one = baselines.evaluate(base, 2, num_tune_tasks=256)
    two = baselines.evaluate(dataclasses.replace(base, lr=0.5, init_scale=0.3), 2, num_tune_tasks=256)
    assert len(calls) == 1 and one["pgd_2"]["loss"] == two["pgd_2"]["loss"]
    baselines.evaluate(dataclasses.replace(base, noise=0.5), 2, num_tune_tasks=256)
    assert len(calls) == 2


def test_heldout_programs_are_shared_across_task_laws():
    """A device predictor compiles once per shape: a second run with another task law (covariance,
    noise law, weight prior) of the same shapes reuses every program of the first."""
    base = Config(d=3, n=10, eval_tasks=2048)
    other = Config(d=3, n=10, eval_tasks=2048, covariance="cond", cond=4.0, noise=0.3, noise_dist="laplace",
                   weight_prior="inverse")
    params = gd_params(base, np.eye(3) * 0.5)
    preds = [baselines.Predictor("zero", baselines.zero_predict),
             baselines.Predictor("model", baselines.model_predictor(base), (params,))]
    first = baselines.heldout_squared_errors(base, preds)
    compiled = baselines._squared_errors._cache_size()
    second = baselines.heldout_squared_errors(other, preds)
    assert baselines._squared_errors._cache_size() == compiled
    assert first["model"].shape == second["model"].shape == (2048,)
    assert not np.allclose(first["model"], second["model"])
