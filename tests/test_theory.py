"""Closed forms against Monte Carlo (tolerances from the MC standard error), optimality, special cases."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import Tasks, TaskSpec, covariance_matrix, distribution, prior_covariance
from icl_gd.theory import optima

Z = 5.0  # allowed |MC - exact| in standard errors (fixed keys: deterministic, and a miss at 5 s.e. is ~1e-6)
MC_TASKS, MC_BATCHES = 2**17, 16

CASES = [  # (d, n, noise, covariance, prior): anisotropic both priors, noisy and not, n < d
    Config(d=3, n=8, noise=0.5, covariance="cond", cond=5.0, weight_prior="identity"),
    Config(d=3, n=8, noise=0.0, covariance="cond", cond=5.0, weight_prior="inverse", rotation_seed=3),
    Config(d=3, n=8, noise=1.0, covariance="eigenvalues", eigenvalues=(2.0, 0.7, 0.2), weight_prior="identity"),
    Config(d=4, n=3, noise=0.3, covariance="isotropic"),
]
# Heteroscedastic noise (Var(eps | x) = sigma^2 |x|^2 / tr Sigma): S gains sigma^2/n (Sigma + 2 Sigma^2 / tr Sigma).
# Large sigma and an anisotropic Sigma, so the homoscedastic formula is many standard errors off.
HETERO_CASES = [
    Config(d=3, n=8, noise=1.0, covariance="eigenvalues", eigenvalues=(2.0, 0.7, 0.2), noise_dist="heteroscedastic"),
    Config(d=3, n=8, noise=1.5, covariance="cond", cond=5.0, weight_prior="inverse", noise_dist="heteroscedastic"),
]
# An anisotropic prior alone: Sigma = I, Omega = U diag(4, 1, 0.25) U^T (rotated).
PRIOR_CASE = Config(d=3, n=8, noise=0.5, weight_prior="eigenvalues", prior_eigenvalues=(4.0, 1.0, 0.25))


def _exact(cfg: Config):
    return covariance_matrix(cfg), prior_covariance(cfg), cfg.n, cfg.noise


def _numpy_tasks(cfg: Config, num: int, seed: int):
    """An independent float64 NumPy sampler of the same law (x ~ N(0, Sigma), w ~ N(0, Omega), and
    eps ~ N(0, sigma^2), or N(0, sigma^2 |x|^2 / tr Sigma) for heteroscedastic noise)."""
    sigma, omega, n, noise = _exact(cfg)
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal(np.zeros(cfg.d), sigma, size=(num, n + 1))
    w = rng.multivariate_normal(np.zeros(cfg.d), omega, size=num)
    scale = np.sqrt((x**2).sum(-1) / np.trace(sigma)) if cfg.noise_dist == "heteroscedastic" else 1.0
    y = np.einsum("bnd,bd->bn", x, w) + noise * scale * rng.standard_normal((num, n + 1))
    return x[:, :n], y[:, :n], x[:, n], y[:, n], w


def _batch_means(samples: np.ndarray, batches: int = MC_BATCHES) -> tuple[np.ndarray, np.ndarray]:
    means = samples.reshape(batches, -1, *samples.shape[1:]).mean(1)
    return means.mean(0), means.std(0, ddof=1) / np.sqrt(batches)


@pytest.mark.parametrize("cfg", CASES + HETERO_CASES + [PRIOR_CASE],
                         ids=lambda c: f"d{c.d}n{c.n}s{c.noise}{c.covariance}-{c.weight_prior}-{c.noise_dist}")
def test_closed_forms_match_monte_carlo(cfg):
    """S = E[g g^T], E[g w^T] = Sigma Omega and the exact L(Gamma) of a random Gamma, against Monte Carlo."""
    sigma, omega, n, noise = _exact(cfg)
    x, y, xq, yq, w = _numpy_tasks(cfg, 2**16, seed=cfg.d * 100 + cfg.n)
    g = np.einsum("bnd,bn->bd", x, y) / n
    s_exact = theory.second_moment(sigma, omega, n, noise, cfg.noise_dist)
    for samples, exact in ((g[:, :, None] * g[:, None, :], s_exact), (g[:, :, None] * w[:, None, :], sigma @ omega)):
        mean, se = _batch_means(samples)
        assert np.all(np.abs(mean - exact) <= Z * se), np.max(np.abs(mean - exact) / se)
    gamma = np.random.default_rng(0).standard_normal((cfg.d, cfg.d)) * 0.5 + np.eye(cfg.d)
    mean, se = _batch_means((np.einsum("bd,de,be->b", xq, gamma, g) - yq) ** 2)
    assert abs(mean - theory.loss_of_gamma(gamma, sigma, omega, n, noise, cfg.noise_dist)) <= Z * se
    if cfg.noise_dist == "heteroscedastic":  # the homoscedastic S is refuted by the same sample
        mean, se = _batch_means(g[:, :, None] * g[:, None, :])
        assert np.max(np.abs(mean - theory.second_moment(sigma, omega, n, noise)) / se) > Z


def test_heteroscedastic_noise_moment_matches_monte_carlo():
    """E[|x|^2 x x^T] = 2 Sigma^2 + tr(Sigma) Sigma for x ~ N(0, Sigma) (Isserlis), the heteroscedastic S's term."""
    cfg = HETERO_CASES[0]
    sigma = covariance_matrix(cfg)
    x = np.random.default_rng(4).multivariate_normal(np.zeros(cfg.d), sigma, size=2**18)
    mean, se = _batch_means((x**2).sum(-1)[:, None, None] * x[:, :, None] * x[:, None, :])
    exact = theory.noise_moment(sigma, 1.0, "heteroscedastic") * np.trace(sigma)
    np.testing.assert_allclose(exact, 2 * sigma @ sigma + np.trace(sigma) * sigma, rtol=1e-12)
    assert np.all(np.abs(mean - exact) <= Z * se), np.max(np.abs(mean - exact) / se)


def test_jax_sampler_moments_match_closed_form():
    """The same check through ``data.sample_tasks`` and the normal-equation sums ``mc_gamma_star`` uses:
    E[phi phi^T] = Sigma (x) S and E[phi y_q] = vec(Sigma Omega Sigma) for phi = vec(x_q g^T)."""
    for cfg in CASES[:2]:  # one compile: same (d, n)
        sigma, omega, n, noise = _exact(cfg)
        a, c, _ = (np.asarray(v, np.float64) for v in optima._normal_equation_sums(
            jax.random.PRNGKey(11), distribution(cfg), TaskSpec.from_config(cfg), MC_BATCHES, MC_TASKS // MC_BATCHES))
        for sums, exact in ((a, np.kron(sigma, theory.second_moment(sigma, omega, n, noise))),
                            (c, (sigma @ omega @ sigma).reshape(-1))):
            means = sums / (MC_TASKS // MC_BATCHES)
            se = means.std(0, ddof=1) / np.sqrt(MC_BATCHES)
            assert np.all(np.abs(means.mean(0) - exact) <= Z * se), np.max(np.abs(means.mean(0) - exact) / se)


@pytest.mark.parametrize("cfg", [*CASES[:2], HETERO_CASES[1],
                                 dataclasses.replace(HETERO_CASES[1], noise_dist="laplace"), PRIOR_CASE],
                         ids=["identity", "inverse", "heteroscedastic", "laplace", "prior-eigenvalues"])
def test_mc_gamma_star_matches_closed_form(cfg):
    """The JAX sampler's optimum (normal equations over vec Gamma) is the closed form's, noise law included:
    heteroscedastic through its own S, Laplace through the Gaussian S of the same variance."""
    sigma, omega, n, noise = _exact(cfg)
    est = theory.mc_gamma_star(jax.random.PRNGKey(13), distribution(cfg), TaskSpec.from_config(cfg),
                               MC_TASKS, MC_BATCHES)
    g = theory.gamma_star(sigma, omega, n, noise, cfg.noise_dist)
    z = np.abs(est.value - g) / est.stderr
    assert z.max() < Z, z
    assert np.all(est.stderr < 0.05 * np.abs(g).max())  # the estimate is informative, not just noisy
    if cfg.noise_dist == "heteroscedastic":  # and the homoscedastic Gamma* is rejected by it
        assert np.max(np.abs(est.value - theory.gamma_star(sigma, omega, n, noise)) / est.stderr) > 2 * Z


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"d{c.d}n{c.n}-{c.weight_prior}")
def test_gamma_star_is_the_minimum(cfg):
    sigma, omega, n, noise = _exact(cfg)
    g = theory.gamma_star(sigma, omega, n, noise)
    l_star = theory.loss_star(sigma, omega, n, noise)
    s = theory.second_moment(sigma, omega, n, noise)
    rng = np.random.default_rng(1)
    for _ in range(10):
        e = rng.standard_normal(g.shape)
        for t in (1e-2, 0.3):
            # L is quadratic: L(G* + tE) - L* = t^2 tr(Sigma E S E^T) > 0 (no linear term at the minimum).
            excess = theory.loss_of_gamma(g + t * e, sigma, omega, n, noise) - l_star
            assert excess > 0
            np.testing.assert_allclose(excess, t**2 * np.trace(sigma @ e @ s @ e.T), rtol=1e-6, atol=1e-12)
    assert l_star >= noise**2  # never below the Bayes floor of the query noise


def test_special_cases():
    for d, n, noise in ((5, 20, 0.0), (3, 7, 0.8)):
        eye = np.eye(d)
        np.testing.assert_allclose(theory.gamma_star(eye, eye, n, noise), theory.eta_star(n, d, noise) * eye)
        np.testing.assert_allclose(theory.loss_star(eye, eye, n, noise), theory.isotropic_loss_star(n, d, noise))
        np.testing.assert_allclose(theory.best_scale(eye, eye, eye, n, noise), theory.eta_star(n, d, noise))
        # Omega = Sigma^-1, anisotropic: Gamma* = eta* Sigma^-1 and the isotropic L* (Mahankali et al., Thm. 2).
        cfg = Config(d=d, n=n, noise=noise, covariance="cond", cond=7.0, weight_prior="inverse")
        sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
        np.testing.assert_allclose(theory.gamma_star(sigma, omega, n, noise),
                                   theory.inverse_prior_gamma_star(sigma, n, noise), rtol=1e-10)
        np.testing.assert_allclose(theory.loss_star(sigma, omega, n, noise),
                                   theory.isotropic_loss_star(n, d, noise), rtol=1e-10)
        # Omega = I, noise 0: the general formula reduces to Ahn et al.'s preconditioner.
        np.testing.assert_allclose(theory.gamma_star(sigma, eye, n, 0.0), theory.ahn_preconditioner(sigma, n),
                                   rtol=1e-10)
        assert not np.allclose(theory.gamma_star(sigma, eye, n, 0.0),
                               theory.best_scale(np.linalg.inv(sigma), sigma, eye, n, 0.0) * np.linalg.inv(sigma))


def test_anisotropic_prior_alone_changes_gamma_star():
    """Sigma = I, w ~ N(0, Omega): Gamma* = Omega ((n+1)/n Omega + (tr Omega + sigma^2)/n I)^-1, i.e. eigenvalues
    n w_i / ((n+1) w_i + tr Omega + sigma^2) along Omega's eigenvectors: no multiple of I (the response law
    alone changes the algorithm), yet still one preconditioned GD step, its preconditioner commuting with Omega."""
    from icl_gd.theory import probes

    for d, n, noise in ((3, 10, 0.0), (3, 10, 0.5), (5, 20, 0.0), (5, 20, 0.5)):
        cfg = Config(d=d, n=n, noise=noise, weight_prior="eigenvalues", prior_eigenvalues=(4, 2, 1, 0.5, 0.25)[:d])
        g, l = theory.config_optimum(cfg)
        omega, eye = prior_covariance(cfg), np.eye(d)
        np.testing.assert_allclose(covariance_matrix(cfg), eye)
        closed = omega @ np.linalg.inv((n + 1) / n * omega + (np.trace(omega) + noise**2) / n * eye)
        np.testing.assert_allclose(g, closed, rtol=1e-10, atol=1e-12)
        w = np.asarray(cfg.prior_eigenvalues)
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(g)), np.sort(n * w / ((n + 1) * w + w.sum() + noise**2)),
                                   rtol=1e-10)
        np.testing.assert_allclose(g @ omega, omega @ g, atol=1e-10)
        assert probes.scalar_fit(g)[1] > 0.1
        best_plain = theory.best_scale(eye, eye, omega, n, noise) * eye  # the best plain GD step eta I loses
        assert l < theory.loss_of_gamma(best_plain, eye, omega, n, noise) - 1e-3


def test_config_optimum():
    cfg = CASES[0]
    g, l = theory.config_optimum(cfg)
    np.testing.assert_allclose(g, theory.gamma_star(*_exact(cfg)))
    assert theory.config_optimum(Config(x_dist="student_t", dof=4.0)) is None  # infinite fourth moments
    assert theory.config_optimum(Config(target="tanh")) is None
    # Heteroscedastic noise: a closed form too (every caller passes cfg.noise_dist).
    het = HETERO_CASES[0]
    g, l = theory.config_optimum(het)
    np.testing.assert_allclose(g, theory.gamma_star(*_exact(het), "heteroscedastic"))
    np.testing.assert_allclose(l, theory.loss_star(*_exact(het), "heteroscedastic"))
    assert theory.has_closed_form(het)
    assert theory.has_closed_form(dataclasses.replace(het, noise_dist="laplace"))
    assert theory.config_optimum(dataclasses.replace(het, x_dist="student_t", dof=3.0)) is None
    # Sigma = Omega = I: Gamma* = n / (n + d + 1 + sigma^2 (d+2)/d) I, the noise weighted by 1 + 2/d.
    for d, n, noise in ((3, 10, 0.7), (5, 20, 0.7)):
        eye = np.eye(d)
        np.testing.assert_allclose(theory.gamma_star(eye, eye, n, noise, "heteroscedastic"),
                                   n / (n + d + 1 + noise**2 * (d + 2) / d) * eye, rtol=1e-12)


def test_multistep_references():
    """Krylov form == direct k-step GD; tuned 1 step == the exact best step; 2 steps beat 1 on fresh tasks."""
    cfg = CASES[0]
    sigma, omega, n, noise = _exact(cfg)
    dist, spec = distribution(cfg), TaskSpec.from_config(cfg)
    x, y, xq, yq, _ = _numpy_tasks(cfg, 64, seed=20)
    tasks = Tasks(*(jnp.asarray(a, jnp.float32) for a in (x, y, xq, yq)))
    etas, p = jnp.array([0.9, 0.4, 0.2]), jnp.asarray(np.linalg.inv(sigma), jnp.float32)
    via_krylov = theory.krylov_features(tasks, p, 3) @ theory.step_polynomial(etas)
    np.testing.assert_allclose(via_krylov, theory.scaled_pgd_predict(tasks, etas, p), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(theory.pgd_predict(tasks, 0.7 * p[None]),
                               theory.one_step_predict(tasks, 0.7 * p), rtol=1e-5, atol=1e-5)

    for precond in (np.eye(cfg.d), np.linalg.inv(sigma)):
        e1 = theory.optimal_step_sizes(jax.random.PRNGKey(21), dist, spec, precond, 1, max_steps=2)
        assert e1[1] == 0.0
        best = theory.best_scale(precond, sigma, omega, n, noise)
        assert abs(e1[0] / best - 1) < 0.03, (e1, best)
        # exact excess loss of the MC-tuned step is second order in its error
        assert theory.loss_of_gamma(e1[0] * precond, sigma, omega, n, noise) < \
            theory.loss_of_gamma(best * precond, sigma, omega, n, noise) * 1.002
        e2 = theory.optimal_step_sizes(jax.random.PRNGKey(21), dist, spec, precond, 2, max_steps=2)
        x, y, xq, yq, _ = _numpy_tasks(cfg, 2**15, seed=5)  # fresh tasks, float64, no compile
        l1, se1 = _batch_means((_np_pgd(x, y, xq, e1[:1], precond) - yq) ** 2)
        l2, se2 = _batch_means((_np_pgd(x, y, xq, e2, precond) - yq) ** 2)
        assert l2 + Z * se2 < l1
        assert abs(l1 - theory.loss_of_gamma(best * precond, sigma, omega, n, noise)) <= Z * se1


def _np_pgd(x, y, xq, etas, precond):
    w = np.zeros(x.shape[::2])
    for eta in etas:
        w = w + eta * (np.einsum("bnd,bn->bd", x, y - np.einsum("bnd,bd->bn", x, w)) / x.shape[1]) @ precond.T
    return np.einsum("bd,bd->b", xq, w)
