"""theory.symmetry: the full model's features against the model itself, the span optimum (GD from the prior mean)
against Monte Carlo, the sparse closed form with a prior mean, the exact loss of GD from a start, and the
quadratic target whose extra features stay unused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import (
    TaskSpec,
    covariance_matrix,
    distribution,
    prior_covariance,
    prior_mean,
    sample_tasks,
    sample_weights,
)
from icl_gd.model import apply
from icl_gd.theory import symmetry

Z = 5.0  # allowed |MC - exact| in standard errors (fixed keys: deterministic)
MC_TASKS, MC_BATCHES = 2**17, 32
# Anisotropic, rotated Sigma and noise: nothing about the result relies on Sigma = I.
BASE = Config(d=3, n=8, noise=0.5, covariance="cond", cond=4.0, rotation_seed=2)
C1 = 1.5
QUAD = 0.5  # y = w^T x + QUAD (w^T x)^2 + eps


def _f32(*a):
    return tuple(jnp.asarray(v, jnp.float32) for v in a)


def _span(cfg: Config, seed: int = 1, sampler=sample_tasks) -> symmetry.FullOptimum:
    return symmetry.mc_full_optimum(jax.random.PRNGKey(seed), distribution(cfg), TaskSpec.from_config(cfg),
                                    MC_TASKS, MC_BATCHES, sampler=sampler)


def _fresh_loss(cfg: Config, theta: np.ndarray) -> theory.MCEstimate:
    return theory.mc_loss(symmetry.full_feature_predict, _f32(theta), jax.random.PRNGKey(99), distribution(cfg),
                          TaskSpec.from_config(cfg), 2**16)


def _within(measured: np.ndarray, expected: np.ndarray, stderr: np.ndarray) -> None:
    z = np.abs(measured - expected) / stderr
    assert z.max() <= Z, (z.max(), int(z.argmax()))


def _head_params(a, u, m, d: int):
    """Full-model params with h = [a, 1], W_K = I, W_Q = B with B[:, :d] = M, W_V = e_d u^T (so W_V^T h = u)."""
    b = np.zeros((d + 1, d + 1))
    b[:, :d] = m
    wv = np.zeros((d + 1, d + 1))
    wv[d] = u
    layer = {"W_K": np.eye(d + 1), "W_Q": b, "W_V": wv}
    return {"layers": [{k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}],
            "h": jnp.asarray(np.concatenate([a, [1.0]]), jnp.float32)}


@pytest.mark.parametrize("heads", [1, 2])
def test_features_span_the_full_model(heads):
    """apply(params) = phi . model_coefficients(params) for random full weights (the readout's direct x_q term
    included), and the one head of ``start_head`` computes GD from w_0 exactly (= start_coefficients)."""
    cfg = Config(d=3, n=5, heads=heads, parameterization="full").validate()
    tasks = sample_tasks(jax.random.PRNGKey(0), distribution(dataclasses.replace(cfg, prior_mean=1.0)),
                         TaskSpec.from_config(cfg), 256)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    shape = (heads,) if heads > 1 else ()
    params = {"layers": [{"W_K": jax.random.normal(keys[0], (*shape, 4, 4)),
                          "W_Q": jax.random.normal(keys[1], (*shape, 4, 4)),
                          "W_V": jax.random.normal(keys[2], (*shape, 4, 4))}],
              "h": jax.random.normal(keys[3], (4,))}
    theta = symmetry.model_coefficients(params, cfg)
    assert theta.shape == (symmetry.num_features(3),) == (3 + 10 * 3,)
    model = np.asarray(apply(params, tasks.x, tasks.y, tasks.x_query, cfg))
    np.testing.assert_allclose(np.asarray(symmetry.full_feature_predict(tasks, *_f32(theta))), model,
                               rtol=2e-4, atol=2e-4 * np.abs(model).max())

    rng = np.random.default_rng(0)
    w0, gamma = rng.standard_normal(3), rng.standard_normal((3, 3))
    one = dataclasses.replace(cfg, heads=1)
    head = _head_params(*symmetry.start_head(w0, gamma), d=3)
    start = np.asarray(symmetry.start_predict(tasks, *_f32(w0, gamma)))
    np.testing.assert_allclose(np.asarray(apply(head, tasks.x, tasks.y, tasks.x_query, one)), start, rtol=1e-4,
                               atol=1e-4 * np.abs(start).max())
    np.testing.assert_allclose(symmetry.model_coefficients(head, one), symmetry.start_coefficients(w0, gamma),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(symmetry.full_feature_predict(
        tasks, *_f32(symmetry.start_coefficients(w0, gamma)))), start, rtol=1e-4, atol=1e-4 * np.abs(start).max())
    # the blocks: GD part Gamma, Sigma_hat part -Gamma Sigma_hat w_0, and the start read back from it
    blocks = symmetry.split_coefficients(symmetry.start_coefficients(w0, gamma), 3)
    np.testing.assert_allclose(blocks["gamma"], gamma, atol=1e-12)
    np.testing.assert_allclose(blocks["a"], w0, atol=1e-12)
    np.testing.assert_allclose(blocks["b"], 0.0, atol=1e-12)
    w0_back, res = symmetry.implied_start(symmetry.start_coefficients(w0, gamma), 3)
    np.testing.assert_allclose(w0_back, w0, atol=1e-10)
    assert res < 1e-10


def test_relative_output_distance_is_the_rms_of_the_outputs_and_the_excess_loss():
    """On one sample with G = phi^T phi / N: relative_output_distance = RMS(phi.theta - phi.ref) / RMS(phi.ref)
    exactly, and for the sample's least-squares theta* the excess sample loss of any theta is
    (theta - theta*)^T G (theta - theta*)."""
    cfg = dataclasses.replace(BASE, prior_mean=C1)
    with jax.enable_x64(True):
        tasks = sample_tasks(jax.random.PRNGKey(7), distribution(cfg), TaskSpec.from_config(cfg), 4096)
        phi = np.asarray(symmetry.full_features(tasks), np.float64)
        y = np.asarray(tasks.y_query, np.float64)
    gram = phi.T @ phi / len(phi)
    rng = np.random.default_rng(8)
    theta, ref = rng.standard_normal(phi.shape[1]), rng.standard_normal(phi.shape[1])
    rms = np.sqrt(np.mean((phi @ theta - phi @ ref) ** 2) / np.mean((phi @ ref) ** 2))
    assert np.isclose(symmetry.relative_output_distance(theta, ref, gram), rms, rtol=1e-10)
    best = np.linalg.solve(gram, phi.T @ y / len(phi))
    excess = np.mean((phi @ theta - y) ** 2) - np.mean((phi @ best - y) ** 2)
    assert np.isclose(excess, (theta - best) @ gram @ (theta - best), rtol=1e-8)


def test_centred_span_optimum_is_one_gd_step():
    """c = 0: over every feature of the full model, the MC optimum is Gamma* g (extra coefficients zero within
    Z standard errors, the GD block at the closed form) and its loss on fresh tasks is L*."""
    cfg = BASE
    opt = _span(cfg)
    g_star, l_star = theory.config_optimum(cfg)
    _within(opt.theta, symmetry.start_coefficients(np.zeros(3), g_star), opt.theta_stderr)
    extra = symmetry.extra_coefficients(opt.theta, 3)
    assert np.abs(extra).max() > 0  # the extra coefficients were estimated, not left out
    fresh = _fresh_loss(cfg, opt.theta)
    assert abs(fresh.value - l_star) <= Z * fresh.stderr, (fresh.value, l_star, fresh.stderr)
    assert abs(opt.loss - l_star) <= Z * opt.loss_stderr


def test_prior_mean_span_optimum_is_gd_from_the_mean():
    """c > 0: the MC optimum over the full model's features is GD from w_0 = mu with Gamma*(Omega_0) (every
    coefficient within Z s.e.), its fresh loss is L*(Omega_0), and it beats the best GD step from 0,
    L*(Omega_0 + mu mu^T), by many standard errors."""
    cfg = dataclasses.replace(BASE, prior_mean=C1)
    opt = _span(cfg)
    w0, gamma0, l_start = symmetry.config_start_optimum(cfg)
    np.testing.assert_allclose(w0, prior_mean(cfg))
    _within(opt.theta, symmetry.start_coefficients(w0, gamma0), opt.theta_stderr)
    _, l_star = theory.config_optimum(cfg)
    fresh = _fresh_loss(cfg, opt.theta)
    assert abs(fresh.value - l_start) <= Z * fresh.stderr, (fresh.value, l_start, fresh.stderr)
    assert (l_star - fresh.value) / fresh.stderr > 10 * Z, (l_star, fresh.value, fresh.stderr)
    # the span's best loss does not depend on c: the same sample at c = 0 solves to the same loss
    centred = _span(BASE)
    assert abs(centred.loss - opt.loss) <= 1e-3 * opt.loss
    w0_mc, res = symmetry.implied_start(opt.theta, 3)
    assert np.linalg.norm(w0_mc - w0) <= 0.05 * np.linalg.norm(w0) and res < 0.1, (w0_mc, w0, res)


def test_sparse_closed_form_with_prior_mean_matches_mc_gamma_star():
    """The GD-form optimum with a prior mean is gamma_star with the second moment Omega_0 + mu mu^T (as
    data.prior_covariance returns), not with Cov(w) = Omega_0."""
    cfg = dataclasses.replace(BASE, prior_mean=C1)
    est = theory.mc_gamma_star(jax.random.PRNGKey(3), distribution(cfg), TaskSpec.from_config(cfg), MC_TASKS,
                               MC_BATCHES)
    sigma = covariance_matrix(cfg)
    _within(est.value, theory.gamma_star(sigma, prior_covariance(cfg), cfg.n, cfg.noise), est.stderr)
    omega0, _ = symmetry.centred_prior(cfg)
    assert (np.abs(est.value - theory.gamma_star(sigma, omega0, cfg.n, cfg.noise)) / est.stderr).max() > 4 * Z


def test_loss_from_start_matches_monte_carlo():
    """loss_from_start = L(Gamma; Omega_0 + (mu - w_0)(mu - w_0)^T) against MC at arbitrary (w_0, Gamma), and
    start_optimum is its minimum (perturbing w_0 or Gamma only raises it)."""
    cfg = dataclasses.replace(BASE, prior_mean=C1)
    sigma, (omega0, mu) = covariance_matrix(cfg), symmetry.centred_prior(cfg)
    rng = np.random.default_rng(4)
    w0_opt, g_opt, l_opt = symmetry.start_optimum(sigma, omega0, mu, cfg.n, cfg.noise)
    cases = [(rng.standard_normal(3), 0.5 * np.eye(3) + 0.2 * rng.standard_normal((3, 3))), (w0_opt, g_opt)]
    for w0, gamma in cases:
        exact = symmetry.loss_from_start(w0, gamma, sigma, omega0, mu, cfg.n, cfg.noise)
        mc = theory.mc_loss(symmetry.start_predict, _f32(w0, gamma), jax.random.PRNGKey(5), distribution(cfg),
                            TaskSpec.from_config(cfg), 2**16)
        assert abs(mc.value - exact) <= Z * mc.stderr, (mc.value, exact, mc.stderr)
    assert np.isclose(symmetry.loss_from_start(w0_opt, g_opt, sigma, omega0, mu, cfg.n, cfg.noise), l_opt)
    for _ in range(5):
        dw, dg = 0.1 * rng.standard_normal(3), 0.05 * rng.standard_normal((3, 3))
        assert symmetry.loss_from_start(w0_opt + dw, g_opt, sigma, omega0, mu, cfg.n, cfg.noise) > l_opt
        assert symmetry.loss_from_start(w0_opt, g_opt + dg, sigma, omega0, mu, cfg.n, cfg.noise) > l_opt
    # from 0 it is the GD-form loss with the second moment
    assert np.isclose(symmetry.loss_from_start(np.zeros(3), g_opt, sigma, omega0, mu, cfg.n, cfg.noise),
                      theory.loss_of_gamma(g_opt, sigma, prior_covariance(cfg), cfg.n, cfg.noise))


def _quadratic_tasks(key, dist, spec, batch):
    """Tasks of ``sample_tasks`` with QUAD (w^T x)^2 added to every label (query included)."""
    tasks = sample_tasks(key, dist, spec, batch)
    w = sample_weights(key, dist, spec, batch)
    ctx = jnp.einsum("bnd,bd->bn", tasks.x, w)
    query = jnp.einsum("bd,bd->b", tasks.x_query, w)
    return tasks._replace(y=tasks.y + QUAD * ctx**2, y_query=tasks.y_query + QUAD * query**2)


def test_quadratic_target_leaves_the_extra_features_unused():
    """A centred prior and y = w^T x + QUAD (w^T x)^2 + eps: the law is invariant under (X, x_q, w) -> (-X, -x_q,
    -w), so every coefficient outside the GD block vanishes within Z s.e.; with a prior mean (the control)
    the same features are used, many s.e. away from 0."""
    for c, used in ((0.0, False), (C1, True)):
        opt = _span(dataclasses.replace(BASE, prior_mean=c), seed=6, sampler=_quadratic_tasks)
        z = np.abs(symmetry.extra_coefficients(opt.theta, 3)) / opt.theta_stderr
        assert (z.max() > 2 * Z) if used else (z.max() <= Z), (c, z.max())
