"""Reading GD out of weights: exact on constructed models, close on a trained one; the CLI report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import Tasks, covariance_matrix
from icl_gd.model import apply, gd_params, init_params
from icl_gd.theory import probes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 3


def _gamma(seed: int) -> np.ndarray:
    """A non-symmetric preconditioner (transposes would show)."""
    return np.eye(D) * 0.8 + 0.3 * np.random.default_rng(seed).standard_normal((D, D))


def _tasks(cfg: Config, batch: int = 32) -> Tasks:
    """Gaussian tasks from NumPy (the weight-reading tests need any inputs, not the sampler's)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, cfg.n + 1, cfg.d))
    y = x @ rng.standard_normal(cfg.d) + 0.1 * rng.standard_normal((batch, cfg.n + 1))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Tasks(f32(x[:, :-1]), f32(y[:, :-1]), f32(x[:, -1]), f32(y[:, -1]))


@pytest.mark.parametrize("parameterization,heads", [("full", 1), ("sparse", 1), ("full", 2)])
def test_one_layer_gamma_recovered_exactly(parameterization, heads):
    cfg = Config(d=D, n=6, parameterization=parameterization, heads=heads)
    g = _gamma(0)
    params = gd_params(cfg, g)
    np.testing.assert_allclose(probes.effective_gamma(params, cfg), g, atol=1e-6)
    terms = probes.one_layer_terms(params, cfg)
    assert all(v == 0.0 for k, v in terms.items() if k != "gamma")
    gammas, c = probes.layer_preconditioners(params, cfg)
    np.testing.assert_allclose(c * gammas[0], g, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_sparse_multilayer_preconditioners_recovered_exactly(tie):
    cfg = Config(d=D, n=6, depth=3, parameterization="sparse", tie_weights=tie)
    gs = [_gamma(1)] * 3 if tie else [_gamma(1), 0.5 * np.eye(D), _gamma(2)]
    params = gd_params(cfg, gs)
    gammas, c = probes.layer_preconditioners(params, cfg)
    np.testing.assert_allclose(gammas, np.stack(gs), atol=1e-6)
    assert c == pytest.approx(1.0)
    tasks = _tasks(cfg)
    np.testing.assert_allclose(apply(params, tasks.x, tasks.y, tasks.x_query, cfg),
                               theory.pgd_predict(tasks, jnp.asarray(np.stack(gs), jnp.float32)), rtol=1e-4, atol=1e-4)


def test_any_sparse_model_is_scaled_preconditioned_gd():
    """The derivation in layer_preconditioners, on random (not GD-built) weights with 2 heads:
    yhat = c x_q^T w_L exactly, with Gamma_l = -sum_h p_lh A_lh^T and c = -h_y."""
    cfg = Config(d=D, n=6, depth=3, heads=2, parameterization="sparse", init_scale=0.5)
    params = init_params(jax.random.PRNGKey(3), cfg)
    gammas, c = probes.layer_preconditioners(params, cfg)
    tasks = _tasks(cfg)
    model = np.asarray(apply(params, tasks.x, tasks.y, tasks.x_query, cfg))
    ours = c * np.asarray(theory.pgd_predict(tasks, jnp.asarray(gammas, jnp.float32)))
    np.testing.assert_allclose(model, ours, rtol=1e-4, atol=1e-4 * np.abs(model).max())
    assert np.abs(model).max() > 1e-2  # not trivially zero


@pytest.mark.parametrize("heads", [1, 2])
def test_one_layer_decomposition(heads):
    """A random full one-layer model equals the GD term plus the non-GD terms of the module docstring."""
    cfg = Config(d=D, n=6, heads=heads, init_scale=0.5)
    params = init_params(jax.random.PRNGKey(4), cfg)
    tasks = _tasks(cfg)
    b, wv, h = probes.layer_blocks(params, cfg)
    u = np.einsum("hrc,r->hc", wv, h)
    x, y, xq = (np.asarray(a, np.float64) for a in (tasks.x, tasks.y, tasks.x_query))
    g, cov, yy = np.einsum("bnd,bn->bd", x, y) / 6, np.einsum("bnd,bne->bde", x, x) / 6, (y**2).mean(1)
    vec = g @ probes.effective_gamma(params, cfg).T + h[:D]
    for bh, uh in zip(b, u):
        vec = vec + np.einsum("ij,bik,k->bj", bh[:D, :D], cov, uh[:D]) + uh[D] * yy[:, None] * bh[D, :D]
    np.testing.assert_allclose(apply(params, tasks.x, tasks.y, tasks.x_query, cfg), np.einsum("bd,bd->b", xq, vec),
                               rtol=1e-4, atol=1e-4)
    terms = probes.one_layer_terms(params, cfg)
    assert terms["h_x"] > 0 and terms["u_x"] > 0 and terms["B_yx"] > 0
    # Gamma_eff holds every term linear in g, the rank-one B_yx^T u_x^T included.
    gamma_ref = sum(uh[D] * bh[:D, :D].T + np.outer(bh[D, :D], uh[:D]) for bh, uh in zip(b, u))
    np.testing.assert_allclose(probes.effective_gamma(params, cfg), gamma_ref, rtol=1e-12)


def test_metrics():
    cfg = Config(d=D, covariance="cond", cond=5.0)
    sigma = covariance_matrix(cfg)
    assert probes.ahn_distance(0.7 * np.linalg.inv(sigma), sigma) < 1e-6
    assert probes.ahn_distance(np.eye(D), sigma) > 0.1
    assert probes.scalar_fit(0.3 * np.eye(D)) == pytest.approx((0.3, 0.0))
    c, res = probes.shape_fit(2.0 * sigma + 0.01 * np.eye(D), sigma)
    assert c == pytest.approx(2.0, rel=0.02) and 0 < res < 0.01
    # sensitivities of a GD-built model are Gamma g; the cosine against the same predictor is 1
    cfg1 = Config(d=D, n=6)
    g = _gamma(5)
    params, tasks = gd_params(cfg1, g), _tasks(cfg1)
    model = lambda t, p: apply(p, t.x, t.y, t.x_query, cfg1)  # noqa: E731
    sens = probes.sensitivities(model, (params,), tasks)
    np.testing.assert_allclose(sens, np.asarray(theory.context_mean(tasks)) @ g.T, rtol=1e-4, atol=1e-5)
    cos = probes.sensitivity_cosines(model, (params,), {
        "same": (theory.one_step_predict, (jnp.asarray(g, jnp.float32),)),
        "scalar": (theory.one_step_predict, (jnp.eye(D),))}, tasks)
    assert cos["same"]["mean"] == pytest.approx(1.0, abs=1e-5) and cos["scalar"]["mean"] < 0.999


# ---------------------------------------------------------------------------------------
# A trained anisotropic run and the launch.analyze report on it.
# ---------------------------------------------------------------------------------------
TRAINED = Config(d=D, n=10, covariance="cond", cond=4.0, weight_prior="inverse", steps=1000, batch_size=512,
                 lr=1e-2, log_every=500, checkpoint_every=1000, eval_tasks=4096)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from icl_gd.train import train

    workdir = str(tmp_path_factory.mktemp("runs") / "aniso")
    result = train(TRAINED, workdir, log=lambda _: None)
    return workdir, result


def test_trained_anisotropic_run_learns_gamma_star(trained_run):
    _, result = trained_run
    g_star, _ = theory.config_optimum(TRAINED)
    gamma = probes.effective_gamma(result.state.params, TRAINED)
    assert probes.relative_error(gamma, g_star) < 0.05
    # Gamma* = eta* Sigma^-1 here, far from a scalar: the model learned the preconditioning
    assert probes.scalar_fit(gamma)[1] > 0.3
    assert probes.ahn_distance(gamma, covariance_matrix(TRAINED)) < 0.05


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.analyze", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_launch_analyze_end_to_end(trained_run):
    workdir, _ = trained_run
    proc = _analyze(f"--workdir={workdir}", "--tune_tasks=4096", "--max_steps=2", "--eval_ns=3,40",
                    "--eval_ns_tasks=8192", "--compare_gd",
                    "--eval_x_scales=0.5,2", "--eval_conds=1,30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(workdir, "analysis")
    with open(os.path.join(out, "context_length.json")) as f:
        curve = json.load(f)
    assert [r["n"] for r in curve] == [3, 40]
    for r in curve:  # the trained layer at n' it never saw: its closed-form loss predicts it
        assert abs(r["model"] - r["exact"]) <= max(0.02 * r["exact"], 3 * r["model_stderr"]), r
        assert r["bayes"] <= r["model"]
    assert curve[1]["model"] < curve[0]["model"]  # more context, lower loss
    with open(os.path.join(out, "compare_gd.json")) as f:
        cmp = json.load(f)
    assert cmp["sensitivity_cosine"] > 0.99 and cmp["prediction_difference"] < 0.2 * cmp["prediction_rms"]
    assert len(cmp["interpolation"]) == 11
    with open(os.path.join(out, "shifts.json")) as f:
        shifts = json.load(f)
    assert [r["x_scale"] for r in shifts["x_scale"]] == [0.5, 2.0] and [r["cond"] for r in shifts["cond"]] == [1, 30]
    for rows in shifts.values():  # a one-layer model off its distribution: still its closed-form loss
        for r in rows:
            assert abs(r["model"] - r["exact"]) <= max(0.03 * r["exact"], 3 * r["model_stderr"]), r
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    for key in ("loss", "loss_star", "gamma_learned", "gamma_star", "rel_error", "baselines"):
        assert key in summary
    assert summary["rel_error"] < 0.05
    assert np.asarray(summary["gamma_learned"]).shape == (D, D)
    assert {"zero", "ols", "bayes", "gd_1", "gd_2", "pgd_1", "pgd_2", "one_layer_opt"} <= set(summary["baselines"])
    assert summary["baselines"]["bayes"]["loss"] < summary["loss"] < summary["baselines"]["zero"]["loss"]
    for png in ("training.png", "gamma.png", "weights.png", "context_length.png", "compare_gd.png",
                "shifts.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert "](gamma.png)" in report and "| rel. error" in report


def test_launch_analyze_user_errors(tmp_path):
    for args, flag in (([f"--workdir={tmp_path / 'missing'}"], "--workdir"), ([], "--workdir"),
                       ([f"--workdir={tmp_path}"], "--workdir")):
        proc = _analyze(*args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr, proc.stderr
