"""The one-layer closed forms for non-Gaussian covariates (``theory.fourth_moment``), against Monte Carlo draws
of ``data.sample_tasks``: the fourth-moment identity, Gamma* and L*, the isotropic step sizes, and the
Gaussian (Isserlis) formula refuted for uniform covariates."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import TaskSpec, covariance_matrix, distribution, prior_covariance, sample_tasks

Z = 5.0  # allowed |MC - exact| in standard errors (fixed keys: deterministic)
BATCHES = 16

# Anisotropic, rotated Sigma (cond 5), x_scale != 1 (Sigma includes x_scale^2) and an anisotropic prior
# Omega that does not commute with Sigma, so every term of the fourth moment is exercised.
BASE = Config(d=3, n=8, noise=0.5, covariance="cond", cond=5.0, rotation_seed=4, x_scale=1.3,
              weight_prior="eigenvalues", prior_eigenvalues=(2.0, 1.0, 0.5))
LAWS = {"uniform": dict(x_dist="uniform"), "sphere": dict(x_dist="sphere"),
        "student_t7": dict(x_dist="student_t", dof=7.0), "student_t12": dict(x_dist="student_t", dof=12.0)}


def _cfg(law: str, **fields) -> Config:
    return dataclasses.replace(BASE, **LAWS[law], **fields).validate()


def _law(cfg: Config) -> tuple[str, str, float]:
    return cfg.noise_dist, cfg.x_dist, cfg.dof


def _covariates(cfg: Config, seed: int, batch: int = 2**15) -> np.ndarray:
    """Every covariate (context and query) of ``batch`` tasks of ``data.sample_tasks``, float64 [N, d]."""
    t = sample_tasks(jax.random.PRNGKey(seed), distribution(cfg), TaskSpec.from_config(cfg), batch)
    return np.concatenate([np.asarray(t.x).reshape(-1, cfg.d), np.asarray(t.x_query)]).astype(np.float64)


def _batch_means(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    means = samples[: len(samples) // BATCHES * BATCHES].reshape(BATCHES, -1, *samples.shape[1:]).mean(1)
    return means.mean(0), means.std(0, ddof=1) / np.sqrt(BATCHES)


def test_symmetric_root_is_the_samplers():
    """The root in the uniform law's fourth-moment term is ``data.distribution``'s sigma_sqrt (x_scale included)."""
    cfg = _cfg("uniform")
    np.testing.assert_allclose(theory.symmetric_sqrt(covariance_matrix(cfg)),
                               np.asarray(distribution(cfg).sigma_sqrt, np.float64), atol=1e-6)


@pytest.mark.parametrize("law", ["uniform", "sphere", "student_t7", "student_t12"])
def test_fourth_moment_matches_monte_carlo(law):
    """E[x x^T A x x^T] = kappa (2 Sigma A Sigma + tr(A Sigma) Sigma) + e R Diag(R A R) R against draws of the
    sampler, A = Omega. At nu = 7 the eighth moment behind the standard error is infinite (heavy tails make
    the batch-means s.e. itself noisy), so nu = 12 (finite) is checked too. Every law also refutes the
    Gaussian (Isserlis) tensor: its kappa or e is measurably not (1, 0)."""
    cfg = _cfg(law)
    sigma, a = covariance_matrix(cfg), prior_covariance(cfg)
    x = _covariates(cfg, seed=1)
    quad = np.einsum("nd,de,ne->n", x, a, x)
    mean, se = _batch_means(quad[:, None, None] * x[:, :, None] * x[:, None, :])
    exact = theory.fourth_moment(a, sigma, cfg.x_dist, cfg.dof)
    assert np.max(np.abs(mean - exact) / se) <= Z, np.abs(mean - exact) / se
    gaussian = theory.fourth_moment(a, sigma)
    assert np.max(np.abs(mean - gaussian) / se) > 2 * Z


def test_fourth_moment_formula_by_hand():
    """The uniform e-term in coordinates: for Sigma = diag(s) (R = diag(sqrt s)) and any A,
    E[x x^T A x x^T]_il = s_i s_l (A_il + A_li) + d_il s_i tr(A Sigma) + e d_il s_i^2 A_ii; and E x_i^4 = m4 s_i^2."""
    s = np.array([2.0, 0.5, 1.0])
    a = np.random.default_rng(0).standard_normal((3, 3))
    sigma = np.diag(s)
    e = theory.UNIFORM_M4 - 3
    by_hand = np.outer(s, s) * (a + a.T) + np.diag(s * np.trace(a @ sigma) + e * s**2 * np.diag(a))
    np.testing.assert_allclose(theory.fourth_moment(a, sigma, "uniform"), by_hand, rtol=1e-12)
    unit = np.zeros((3, 3))
    unit[0, 0] = 1.0  # A = e_0 e_0^T: E[x_0^2 x x^T]_00 = E x_0^4
    assert theory.fourth_moment(unit, sigma, "uniform")[0, 0] == pytest.approx(theory.UNIFORM_M4 * s[0] ** 2)
    assert theory.fourth_moment(unit, sigma)[0, 0] == pytest.approx(3 * s[0] ** 2)


@pytest.mark.parametrize("law,noise_dist", [("uniform", "gaussian"), ("uniform", "heteroscedastic"),
                                            ("sphere", "gaussian"), ("student_t7", "gaussian")])
def test_gamma_star_and_loss_star_match_monte_carlo(law, noise_dist):
    """The law's closed-form Gamma* is the Monte-Carlo optimum of its tasks (normal equations over vec Gamma),
    and L* its Monte-Carlo loss; the Gaussian formula's Gamma* is rejected by the same estimate and loses to
    the law's Gamma*."""
    cfg = _cfg(law, noise_dist=noise_dist, noise=1.0 if noise_dist == "heteroscedastic" else BASE.noise)
    dist, spec = distribution(cfg), TaskSpec.from_config(cfg)
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    assert theory.has_closed_form(cfg)
    g, l_star = theory.config_optimum(cfg)
    np.testing.assert_allclose(g, theory.gamma_star(sigma, omega, cfg.n, cfg.noise, *_law(cfg)))
    est = theory.mc_gamma_star(jax.random.PRNGKey(13), dist, spec, 2**16, BATCHES)
    z = np.abs(est.value - g) / est.stderr
    assert z.max() < Z, z
    g_gauss = theory.gamma_star(sigma, omega, cfg.n, cfg.noise, cfg.noise_dist)
    assert np.max(np.abs(est.value - g_gauss) / est.stderr) > 2 * Z  # the estimate has power
    key = jax.random.PRNGKey(21)
    loss = theory.mc_loss(theory.one_step_predict, (jnp.asarray(g, jnp.float32),), key, dist, spec, 2**15)
    assert abs(loss.value - l_star) <= Z * loss.stderr, (loss, l_star)
    # The Gaussian formula's Gamma is worse under this law (exactly: Gamma* is the unique minimiser).
    assert theory.loss_of_gamma(g_gauss, sigma, omega, cfg.n, cfg.noise, *_law(cfg)) > l_star + 1e-4


def test_uniform_gaussian_formula_rejected_isotropic():
    """Sigma = Omega = I, uniform x: the Monte-Carlo optimum is n/(n+d-0.2+sigma^2) I, many standard errors
    away from the Gaussian n/(n+d+1+sigma^2) I (a test that fails if the sampler were Gaussian)."""
    cfg = Config(d=3, n=10, noise=0.5, x_dist="uniform").validate()
    est = theory.mc_gamma_star(jax.random.PRNGKey(5), distribution(cfg), TaskSpec.from_config(cfg), 2**16, BATCHES)
    eta_mc = np.trace(est.value) / cfg.d
    eta_se = np.sqrt(np.sum(np.diag(est.stderr) ** 2)) / cfg.d  # conservative: s.e.s of the diagonal, summed
    uniform = cfg.n / (cfg.n + cfg.d - 0.2 + cfg.noise**2)
    gaussian = cfg.n / (cfg.n + cfg.d + 1 + cfg.noise**2)
    assert abs(eta_mc - uniform) <= Z * eta_se, (eta_mc, uniform, eta_se)
    assert abs(eta_mc - gaussian) > 4 * Z * eta_se, (eta_mc, gaussian, eta_se)


def test_isotropic_step_sizes():
    """Sigma = Omega = I: eta* = n / (n - 1 + kappa (d + 2) + e + sigma^2), i.e. Gaussian n/(n+d+1+sigma^2),
    uniform n/(n + d + 1 + (m4 - 3) + sigma^2) = n/(n+d-0.2+sigma^2), sphere n/(n+d-1+sigma^2), Student-t
    n/(n - 1 + (nu-2)(d+2)/(nu-4) + sigma^2); gamma_star, best_scale and config_optimum agree."""
    for d, n, noise in ((3, 10, 0.0), (3, 10, 0.5), (5, 20, 0.5)):
        eye = np.eye(d)
        expected = {("uniform", None): n / (n + d - 0.2 + noise**2),
                    ("sphere", None): n / (n + d - 1 + noise**2),
                    ("student_t", 7.0): n / (n - 1 + 5 / 3 * (d + 2) + noise**2),
                    ("gaussian", None): n / (n + d + 1 + noise**2)}
        for (x_dist, dof), eta in expected.items():
            assert theory.eta_star(n, d, noise, x_dist, dof) == pytest.approx(eta, rel=1e-12)
            np.testing.assert_allclose(theory.gamma_star(eye, eye, n, noise, "gaussian", x_dist, dof), eta * eye,
                                       rtol=1e-12, atol=1e-15)
            assert theory.best_scale(eye, eye, eye, n, noise, "laplace", x_dist, dof) == pytest.approx(eta, rel=1e-12)
            cfg = Config(d=d, n=n, noise=noise, x_dist=x_dist, dof=dof or 5.0)
            np.testing.assert_allclose(theory.config_optimum(cfg)[0], eta * eye, rtol=1e-12, atol=1e-15)
        assert n / (n + d + 1 + (theory.UNIFORM_M4 - 3) + noise**2) == pytest.approx(expected["uniform", None])
        # Gaussian x reduces to the papers' forms (Mahankali et al. Thm. 1).
        assert theory.eta_star(n, d, noise, "gaussian") == theory.eta_star(n, d, noise)


def test_closed_form_availability():
    """Closed forms where the fourth moments are finite: Student-t needs nu > 4."""
    assert theory.has_closed_form(Config(x_dist="sphere"))
    assert theory.has_closed_form(Config(x_dist="uniform", noise_dist="heteroscedastic"))
    assert theory.has_closed_form(Config(x_dist="student_t", dof=4.5))
    assert not theory.has_closed_form(Config(x_dist="student_t", dof=4.0))
    assert theory.config_optimum(Config(x_dist="student_t", dof=3.0)) is None
    assert not theory.has_closed_form(Config(x_dist="uniform", target="tanh"))
    with pytest.raises(ValueError, match="dof > 4"):
        theory.covariate_moments("student_t", 3, 4.0)
    with pytest.raises(ValueError, match="dof > 4"):
        theory.gamma_star(np.eye(2), np.eye(2), 5, 0.0, "gaussian", "student_t")  # dof is required
