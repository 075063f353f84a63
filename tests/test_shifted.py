"""Evaluation off the training distribution (``theory.shifted``, ``Run.evaluate``) and ``launch.theory``."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import icl_gd
from icl_gd import theory
from icl_gd.config import Config, ConfigError
from icl_gd.data import TaskSpec, covariance_matrix, distribution, prior_covariance, sample_tasks
from icl_gd.model import gd_params
from icl_gd.sweep.grid import member_name
from icl_gd.theory import probes, shifted
from icl_gd.train import train
from tests import launchers


def test_context_length_shift_matches_the_closed_form():
    """A one-layer sparse model with a known Gamma, evaluated at n' != n: the layer averages over
    the n' context tokens (1/n'), so its loss is exactly L(Gamma) at n' (Mahankali et al., eq. (3.1))."""
    cfg = Config(d=3, n=10, noise=0.3, covariance="cond", cond=4.0, parameterization="sparse")
    gamma = np.array([[0.9, 0.1, 0.0], [0.1, 0.7, 0.05], [0.0, 0.05, 0.8]])
    params = gd_params(cfg, gamma)
    np.testing.assert_allclose(probes.effective_gamma(params, cfg), gamma, atol=1e-6)
    for n in (4, 10, 25):
        res = shifted.evaluate(cfg, params, num_tasks=2**15, references=False, n=n)
        model, exact = res["model"], res["exact"]["loss"]
        assert model["n"] == n
        assert abs(model["loss"] - exact) <= 3 * model["stderr"], (n, model, exact)
    # The references come along on the same tasks, tuned for the shifted distribution.
    res = shifted.evaluate(cfg, params, num_tasks=2**13, n=25)
    assert {"model", "ols", "bayes", "gd_1", "pgd_1", "exact"} <= set(res)
    assert res["bayes"]["loss"] < res["gd_1"]["loss"]


def test_stretches_scale_sigma_and_omega_only():
    cfg = Config(d=3, n=6, covariance="cond", cond=10.0, weight_prior="inverse")
    test = shifted.shifted_config(cfg, x_scale=2.0, w_scale=0.5)
    np.testing.assert_allclose(covariance_matrix(test), 4 * covariance_matrix(cfg))
    np.testing.assert_allclose(prior_covariance(test), 0.25 * prior_covariance(cfg))  # the unstretched Sigma^-1
    tasks = sample_tasks(jax.random.PRNGKey(0), distribution(test), TaskSpec.from_config(test), 2**15)
    x = np.asarray(tasks.x, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(x.T @ x / len(x), covariance_matrix(test), atol=0.12)
    # y = w^T x: its variance is tr(Omega Sigma) = x_scale^2 w_scale^2 d
    assert np.var(np.asarray(tasks.y)) == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ConfigError, match="lr"):
        shifted.shifted_config(cfg, lr=0.1)
    with pytest.raises(ConfigError, match="x_scale"):
        shifted.shifted_config(cfg, x_scale=0.0)


def test_new_fields_keep_existing_folder_names():
    """x_scale and w_scale at their defaults leave the hash (and so every sweep folder) unchanged."""
    assert member_name(Config()) == "d5_n20_isotropic_identity_noise0_L1_seed0_c692142f"
    cfg = Config(d=5, n=20, covariance="cond", cond=16, weight_prior="inverse", noise=0.5, depth=3,
                 parameterization="block")
    assert member_name(cfg) == "d5_n20_cond16_inverse_noise0.5_L3_seed0_6770cd3d"
    assert member_name(dataclasses.replace(cfg, x_scale=2.0)) != member_name(cfg)


def test_sparse_model_is_pgd_with_its_learned_preconditioners(tmp_path):
    cfg = Config(d=3, n=8, depth=2, parameterization="sparse", batch_size=32, steps=20, log_every=10,
                 checkpoint_every=20, eval_tasks=256, lr=0.01)
    train(cfg, str(tmp_path), log=lambda _: None)
    run = icl_gd.load(str(tmp_path))
    res = run.evaluate(num_tasks=2**12, references=False, n=16, noise=0.2)
    assert res["pgd_learned"]["loss"] == pytest.approx(res["model"]["loss"], rel=1e-4)
    assert res["model"]["n"] == 16


@pytest.fixture(scope="module")
def theory_json():
    out = launchers.run("launch.theory", "--d=4", "--n=12", "--noise=0.5", "--covariance=cond", "--cond=8",
                        "--weight_prior=inverse", "--depth=2", "--parameterization=block", "--format=json",
                        "--num_tasks=8192", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_launch_theory_matches_the_closed_forms(theory_json):
    res = theory_json
    cfg = Config(d=4, n=12, noise=0.5, covariance="cond", cond=8.0, weight_prior="inverse")
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    np.testing.assert_allclose(res["covariance"], sigma, atol=1e-12)
    np.testing.assert_allclose(res["gamma_star"], theory.gamma_star(sigma, omega, 12, 0.5), atol=1e-6)
    assert res["loss_star"] == pytest.approx(theory.loss_star(sigma, omega, 12, 0.5), abs=1e-6)
    assert res["eta_star"] == pytest.approx(np.trace(res["gamma_star"]) / 4, abs=1e-6)
    assert res["one_layer_source"] == "closed_form"
    # Two tuned PGD steps beat the best single layer (Monte Carlo, with its standard error).
    assert len(res["pgd_steps"]) == 2 and res["pgd_loss"] < res["loss_star"] - 3 * res["pgd_loss_stderr"]
    # The two PGD tunings (task sample; Wishart polynomial) agree.
    assert sorted(res["pgd_steps_wishart"]) == pytest.approx(sorted(res["pgd_steps"]), rel=0.1)
    assert abs(res["pgd_loss_wishart"] - res["pgd_loss"]) <= 4 * res["pgd_loss_stderr"]
    # The general form's optimum is at least as good as PGD (it contains it: b = 0).
    g = res["general_form"]
    assert len(g["a"]) == len(g["b"]) == 2 and g["loss"] <= res["pgd_loss"] + 3 * g["stderr"]


def test_launch_theory_isotropic_eta_star_and_bad_flags(tmp_path):
    config = tmp_path / "config.json"  # another run's config.json as the base, as launch.train takes it
    config.write_text(json.dumps(Config(d=5, n=20, noise=0.5).to_dict()))
    out = launchers.run("launch.theory", f"--config={config}", "--format=json", "--num_tasks=4096", timeout=300)
    res = json.loads(out.stdout)
    assert res["eta_star"] == pytest.approx(20 / (20 + 5 + 1 + 0.25), abs=1e-6)
    assert res["loss_star"] == pytest.approx(theory.isotropic_loss_star(20, 5, 0.5), abs=1e-6)
    assert abs(res["pgd_loss"] - res["loss_star"]) <= 3 * res["pgd_loss_stderr"]
    bad = launchers.run("launch.theory", "--num_tasks=5", timeout=60)
    assert bad.returncode != 0 and "num_tasks" in bad.stderr and "Traceback" not in bad.stderr


def test_compare_with_gd_construction():
    """The GD construction compared with itself: no difference, cosine 1, a flat interpolation; a
    perturbed copy differs; a tied GD layer iterated k times is k GD steps of that size."""
    import jax.numpy as jnp

    from icl_gd.theory import compare

    cfg = Config(d=3, n=10, noise=0.2, parameterization="sparse", tie_weights=True, depth=2)
    gd, _ = compare.gd_construction(cfg, num_tune_tasks=2**12)
    res = compare.compare(cfg, gd, num_tasks=2**12, alphas=3, num_tune_tasks=2**12)
    assert res["prediction_difference"] < 1e-5 and res["model_difference"] < 1e-5
    assert res["sensitivity_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert [p["loss"] for p in res["interpolation"]] == pytest.approx([res["loss_gd"]] * 3, rel=1e-5)
    eta = float(-gd["layers"][0]["W_Q"][0, 0])  # W_Q = [-Gamma^T 0] with Gamma = eta I (isotropic)
    tasks = compare._heldout(cfg, 2**12)
    for row in res["iterated"]:
        k = row["depth"]
        ref = theory.scaled_pgd_predict(tasks, jnp.full((k,), eta), jnp.eye(3))
        assert row["loss"] == pytest.approx(float(jnp.mean((ref - tasks.y_query) ** 2)), rel=1e-4)
    noisy = jax.tree.map(lambda a: a + 0.05, gd)
    off = compare.compare(cfg, noisy, num_tasks=2**12, alphas=3, num_tune_tasks=2**12)
    assert off["prediction_difference"] > 1e-3 and off["sensitivity_cosine"] < 1.0
    assert off["interpolation"][-1]["loss"] == pytest.approx(off["loss_gd"], rel=1e-6)
