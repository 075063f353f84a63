"""The rank-r one-layer optimum (icl_gd.theory.lowrank): Eckart-Young on Mahankali et al. 2023's loss (4.1),
checked against the closed forms, random and locally optimised rank-r Gammas, Monte Carlo, and the model's
multi-head attention (rank Gamma_eff <= H k; the non-GD terms only add loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import TaskSpec, covariance_matrix, distribution, prior_covariance, sample_tasks
from icl_gd.model import apply, init_params
from icl_gd.theory import lowrank, probes


def _spd(rng, d, spread=1.0):
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (q * np.exp(spread * rng.standard_normal(d))) @ q.T


def _problem(seed=0, d=4):
    rng = np.random.default_rng(seed)
    return _spd(rng, d), _spd(rng, d), rng


@pytest.mark.parametrize("noise_dist", ["gaussian", "heteroscedastic"])
def test_full_rank_is_the_known_optimum(noise_dist):
    sigma, omega, _ = _problem()
    gamma, loss = lowrank.rank_r_optimum(sigma, omega, 7, 0.5, 4, noise_dist)
    np.testing.assert_allclose(gamma, theory.gamma_star(sigma, omega, 7, 0.5, noise_dist), rtol=1e-9, atol=1e-12)
    assert loss == pytest.approx(theory.loss_star(sigma, omega, 7, 0.5, noise_dist), rel=1e-12)
    zero, loss0 = lowrank.rank_r_optimum(sigma, omega, 7, 0.5, 0, noise_dist)
    assert not zero.any() and loss0 == pytest.approx(np.trace(sigma @ omega) + 0.25, rel=1e-12)


def test_completing_the_square():
    """L(Gamma) = ||Sigma^1/2 Gamma S^1/2 - T||_F^2 + L* for any Gamma (the derivation in lowrank's docstring)."""
    sigma, omega, rng = _problem(1)
    t, sigma_isqrt, s_isqrt = lowrank.whitened_target(sigma, omega, 9, 0.3)
    l_star = theory.loss_star(sigma, omega, 9, 0.3)
    for _ in range(5):
        g = rng.standard_normal((4, 4))
        a = np.linalg.inv(sigma_isqrt) @ g @ np.linalg.inv(s_isqrt)
        assert theory.loss_of_gamma(g, sigma, omega, 9, 0.3) == pytest.approx(np.sum((a - t) ** 2) + l_star,
                                                                              rel=1e-10)


@pytest.mark.parametrize("n,d,noise", [(10, 3, 0.5), (20, 5, 0.0), (4, 6, 1.0)])
def test_isotropic_formula(n, d, noise):
    eye = np.eye(d)
    for r in range(d + 1):
        gamma, loss = lowrank.rank_r_optimum(eye, eye, n, noise, r)
        expected = noise**2 + d - r * n / (n + d + 1 + noise**2)
        assert lowrank.isotropic_rank_r_loss(n, d, noise, r) == pytest.approx(expected, rel=1e-12)
        assert loss == pytest.approx(expected, rel=1e-12)
        assert theory.loss_of_gamma(gamma, eye, eye, n, noise) == pytest.approx(expected, rel=1e-10)
        np.testing.assert_allclose(np.linalg.svd(gamma, compute_uv=False),  # eta* P, P a rank-r projector
                                   [theory.eta_star(n, d, noise)] * r + [0.0] * (d - r), atol=1e-12)
    assert lowrank.isotropic_rank_r_loss(n, d, noise, d) == pytest.approx(theory.isotropic_loss_star(n, d, noise))


@pytest.mark.parametrize("noise_dist", ["gaussian", "heteroscedastic"])
def test_gamma_r_attains_loss_star_r(noise_dist):
    sigma, omega, _ = _problem(2, d=5)
    losses = lowrank.rank_r_losses(sigma, omega, 8, 0.7, noise_dist)
    assert np.all(np.diff(losses) < 0)  # generic T: every extra rank helps
    for r in range(6):
        gamma, loss = lowrank.rank_r_optimum(sigma, omega, 8, 0.7, r, noise_dist)
        assert np.linalg.matrix_rank(gamma, tol=1e-9) == r
        assert loss == pytest.approx(losses[r], rel=1e-12)
        assert theory.loss_of_gamma(gamma, sigma, omega, 8, 0.7, noise_dist) == pytest.approx(loss, rel=1e-10)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_no_rank_r_gamma_beats_gamma_r(r):
    """Random rank-r Gammas and local optimisation over Gamma = U V^T (U, V [d, r], BFGS from 6 starts) never
    go below L*(r), and the optimisation reaches it (so a wrong L*(r) in either direction fails)."""
    sigma, omega, rng = _problem(3, d=4)
    n, noise = 6, 0.5
    _, target = lowrank.rank_r_optimum(sigma, omega, n, noise, r)
    randoms = [theory.loss_of_gamma(rng.standard_normal((4, r)) @ rng.standard_normal((r, 4)) * 0.3, sigma, omega,
                                    n, noise) for _ in range(200)]
    assert min(randoms) > target

    def loss(z):
        u, v = z[: 4 * r].reshape(4, r), z[4 * r:].reshape(4, r)
        return theory.loss_of_gamma(u @ v.T, sigma, omega, n, noise)

    found = [minimize(loss, 0.5 * rng.standard_normal(8 * r), method="BFGS", options={"gtol": 1e-10}).fun
             for _ in range(6)]
    assert min(found) >= target - 1e-9
    assert min(found) == pytest.approx(target, abs=1e-6)
    if r < 4:  # and the rank constraint matters: the full-rank optimum is strictly lower
        assert theory.loss_star(sigma, omega, n, noise) < target - 1e-3


def test_truncation_acts_on_the_whitened_target_not_on_gamma_star():
    """Sigma of condition 10, w ~ N(0, I): Gamma_r keeps Sigma's top eigendirections, where Gamma* is smallest;
    the truncated SVD of Gamma* itself keeps the others and loses (d=3, r=2: principal angle 90 degrees)."""
    cfg = Config(d=3, n=10, noise=0.5, covariance="cond", cond=10.0)
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    gamma_r, loss_r = lowrank.rank_r_optimum(sigma, omega, 10, 0.5, 2)
    g_star = theory.gamma_star(sigma, omega, 10, 0.5)
    u, s, vt = np.linalg.svd(g_star)
    naive = (u[:, :2] * s[:2]) @ vt[:2]
    assert theory.loss_of_gamma(naive, sigma, omega, 10, 0.5) > loss_r + 0.1
    top = np.linalg.eigh(sigma)[1][:, ::-1][:, :2]  # Sigma's top-2 eigenvectors
    assert lowrank.subspace_sine(gamma_r, top, 2) < 1e-9
    assert lowrank.subspace_sine(gamma_r, naive, 2) == pytest.approx(1.0, abs=1e-9)


def test_subspace_sine():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((4, 2)) @ rng.standard_normal((2, 4))
    assert lowrank.subspace_sine(a, a @ _spd(rng, 4), 2) < 1e-9  # same column space
    assert lowrank.subspace_sine(np.diag([1.0, 1, 0, 0]), np.diag([0.0, 0, 1, 1]), 2) == pytest.approx(1.0)
    c, s = np.cos(0.3), np.sin(0.3)
    assert lowrank.subspace_sine(np.diag([1.0, 0]), np.array([[c, 0], [s, 0]]), 1) == pytest.approx(s)


def test_nearest_rank_r_optimum_isotropic():
    """Isotropic: the optima are eta* P for every rank-r projector P; the nearest to Gamma is eta* times the
    top-r eigenprojector of its symmetric part, nearer than any other optimum tried."""
    d, n, noise, r = 4, 10, 0.5, 2
    eye, eta = np.eye(d), theory.eta_star(n, d, noise)
    rng = np.random.default_rng(5)
    for _ in range(3):
        g = rng.standard_normal((d, d))
        near = lowrank.nearest_rank_r_optimum(g, eye, eye, n, noise, r)
        q = np.linalg.eigh(g + g.T)[1][:, -r:]
        np.testing.assert_allclose(near, eta * q @ q.T, atol=1e-10)
        assert theory.loss_of_gamma(near, eye, eye, n, noise) == pytest.approx(lowrank.isotropic_rank_r_loss(
            n, d, noise, r), rel=1e-10)
        others = [np.linalg.qr(rng.standard_normal((d, r)))[0] for _ in range(300)]
        assert min(np.linalg.norm(g - eta * o @ o.T) for o in others) > np.linalg.norm(g - near)
    eta_p = eta * np.diag([0.0, 1, 1, 0])  # an optimum is its own nearest
    np.testing.assert_allclose(lowrank.nearest_rank_r_optimum(eta_p, eye, eye, n, noise, r), eta_p, atol=1e-10)


def test_nearest_rank_r_optimum_partial_tie_and_generic():
    """A tie s_2 = s_3 across the cut r = 2 with a distinct s_1 (Sigma = I, Omega eigenvalues 4, 1, 1, 0.5):
    the nearest optimum keeps the top direction, picks the tied one nearest Gamma, and attains L*(r).
    Without a tie it is Gamma_r itself."""
    eye = np.eye(4)
    omega = np.diag([4.0, 1.0, 1.0, 0.5])
    _, loss_r = lowrank.rank_r_optimum(eye, omega, 10, 0.5, 2)
    g = np.diag([1.0, 0.2, 0.9, 0.1]) + 0.01 * np.random.default_rng(6).standard_normal((4, 4))
    near = lowrank.nearest_rank_r_optimum(g, eye, omega, 10, 0.5, 2)
    assert theory.loss_of_gamma(near, eye, omega, 10, 0.5) == pytest.approx(loss_r, rel=1e-10)
    assert abs(near[2, 2]) > 0.5 and abs(near[1, 1]) < 0.05 and abs(near[0, 0]) > 0.5  # e_3, not e_2, chosen
    sigma, omega, _ = _problem(7)
    gamma_r, _ = lowrank.rank_r_optimum(sigma, omega, 10, 0.5, 2)
    np.testing.assert_allclose(lowrank.nearest_rank_r_optimum(g, sigma, omega, 10, 0.5, 2), gamma_r, atol=1e-10)


def test_monte_carlo_loss_of_gamma_r():
    cfg = Config(d=3, n=10, noise=0.5, covariance="cond", cond=10.0)
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    for r in (1, 2):
        gamma, loss = lowrank.rank_r_optimum(sigma, omega, cfg.n, cfg.noise, r)
        est = theory.mc_loss(theory.one_step_predict, (jnp.asarray(gamma, jnp.float32),), jax.random.PRNGKey(r),
                             distribution(cfg), TaskSpec.from_config(cfg), num_tasks=2**16)
        assert abs(float(est.value) - loss) < 4 * float(est.stderr), (r, est, loss)


@pytest.mark.parametrize("heads,key_size", [(1, 1), (2, 1)])
def test_model_gamma_has_rank_hk_and_the_rest_only_adds_loss(heads, key_size):
    """Random full-form weights of H heads of key size k (model.apply itself, not the probe): the part of yhat
    odd in (y, y_q) -> -(y, y_q) is x_q^T Gamma_eff g with rank Gamma_eff <= H k, and the even rest is
    uncorrelated with the odd residual, so the loss is L(Gamma_eff) + E[even^2] >= L*(H k)."""
    cfg = Config(d=3, n=10, noise=0.5, heads=heads, key_size=key_size, init_scale=0.6)
    params = init_params(jax.random.PRNGKey(heads), cfg)
    gamma = probes.effective_gamma(params, cfg)
    sv = np.linalg.svd(gamma, compute_uv=False)
    r = heads * key_size
    assert sv[r - 1] > 1e-2 and np.all(sv[r:] < 1e-6 * sv[0])
    tasks = sample_tasks(jax.random.PRNGKey(9), distribution(cfg), TaskSpec.from_config(cfg), 2**16)
    plus = np.asarray(apply(params, tasks.x, tasks.y, tasks.x_query, cfg), np.float64)
    minus = np.asarray(apply(params, tasks.x, -tasks.y, tasks.x_query, cfg), np.float64)
    odd, even = (plus - minus) / 2, (plus + minus) / 2
    gd = np.asarray(theory.one_step_predict(tasks, jnp.asarray(gamma, jnp.float32)), np.float64)
    np.testing.assert_allclose(odd, gd, atol=2e-4 * np.abs(gd).max())
    assert np.abs(even).mean() > 1e-2  # the random weights do use the non-GD terms
    y_q = np.asarray(tasks.y_query, np.float64)
    cross = 2 * even * (odd - y_q)
    assert abs(cross.mean()) < 4 * cross.std() / np.sqrt(cross.size)
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    loss_gamma = theory.loss_of_gamma(gamma, sigma, omega, cfg.n, cfg.noise)
    assert loss_gamma >= lowrank.rank_r_optimum(sigma, omega, cfg.n, cfg.noise, r)[1]
    total = (plus - y_q) ** 2
    assert abs(total.mean() - loss_gamma - np.mean(even**2)) < 4 * total.std() / np.sqrt(total.size)
