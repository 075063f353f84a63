"""Sample moments of the task distributions against their stated laws.

Tolerances come from the sample itself: each entry of a sample second moment is a mean of
N products, so its standard error is std(product)/sqrt(N); we allow 5 standard errors.
"""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from icl_gd.config import Config, ConfigError
from icl_gd.data import (
    TaskSpec,
    covariance_matrix,
    distribution,
    normal,
    prior_covariance,
    random_orthogonal,
    sample_tasks,
    sample_weights,
)

N = 40_000
SPECTRA = [
    dict(covariance="isotropic"),
    dict(covariance="cond", cond=20.0, rotation_seed=3),
    dict(covariance="cond", cond=5.0, rotate=False),
    dict(covariance="eigenvalues", eigenvalues=(3.0, 1.0, 0.5, 0.1)),
    dict(covariance="eigenvalues", eigenvalues=(2.0, 2.0, 1.0, 0.25), rotate=False),
]


def _check_second_moment(samples: np.ndarray, expected: np.ndarray, k: float = 5.0) -> None:
    prods = samples[:, :, None] * samples[:, None, :]
    mean = prods.mean(0)
    se = prods.std(0) / np.sqrt(len(samples))
    assert np.all(np.abs(mean - expected) <= k * se + 1e-6), (mean, expected, se)


def _draw(cfg: Config, batch: int = N // 4):
    spec, dist = TaskSpec.from_config(cfg), distribution(cfg)
    key = jax.random.PRNGKey(11)
    tasks = sample_tasks(key, dist, spec, batch)
    w = sample_weights(key, dist, spec, batch)
    return tasks, np.asarray(w, np.float64)


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("x_dist", ["gaussian", "sphere", "student_t"])
def test_covariate_second_moment_is_sigma(spectrum, x_dist):
    cfg = Config(d=4, n=3, x_dist=x_dist, dof=7.0, **spectrum)
    tasks, _ = _draw(cfg)
    x = np.concatenate([np.asarray(tasks.x).reshape(-1, cfg.d), np.asarray(tasks.x_query)], 0).astype(np.float64)
    _check_second_moment(x, covariance_matrix(cfg))


@pytest.mark.parametrize("spectrum", SPECTRA[1:4])
@pytest.mark.parametrize("prior", ["identity", "inverse"])
def test_weight_prior_covariance(spectrum, prior):
    cfg = Config(d=4, n=2, weight_prior=prior, **spectrum)
    _, w = _draw(cfg, batch=N)
    _check_second_moment(w, prior_covariance(cfg))
    if prior == "inverse":
        np.testing.assert_allclose(prior_covariance(cfg) @ covariance_matrix(cfg), np.eye(4), atol=1e-10)


@pytest.mark.parametrize("spectrum", [SPECTRA[0], SPECTRA[1], SPECTRA[2]])
@pytest.mark.parametrize("rotate", [True, False])
def test_eigenvalues_prior_covariance(spectrum, rotate):
    """--weight_prior=eigenvalues: E[w w^T] = U diag(prior_eigenvalues) U^T, U the rotation_seed rotation when
    rotate is on (also for isotropic Sigma, which it leaves alone), else I; Sigma's own basis when rotated."""
    pev = (4.0, 2.0, 1.0, 0.25)
    cfg = Config(d=4, n=2, weight_prior="eigenvalues", prior_eigenvalues=pev, **{**spectrum, "rotate": rotate})
    _, w = _draw(cfg, batch=N)
    omega = prior_covariance(cfg)
    _check_second_moment(w, omega)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(omega))[::-1], pev, rtol=1e-10)
    u = random_orthogonal(4, cfg.rotation_seed) if rotate else np.eye(4)
    np.testing.assert_allclose(omega, (u * pev) @ u.T, atol=1e-12)
    np.testing.assert_allclose(covariance_matrix(cfg), covariance_matrix(dataclasses.replace(
        cfg, weight_prior="identity", prior_eigenvalues=())), atol=0)
    if spectrum["covariance"] != "isotropic" and rotate:  # one eigenbasis: Sigma and Omega commute
        sigma = covariance_matrix(cfg)
        np.testing.assert_allclose(sigma @ omega, omega @ sigma, atol=1e-10)


def test_spectrum_construction():
    cfg = Config(d=4, covariance="cond", cond=8.0, rotation_seed=5)
    ev = np.sort(np.linalg.eigvalsh(covariance_matrix(cfg)))[::-1]
    np.testing.assert_allclose(ev, 8.0 ** (-np.arange(4) / 3), rtol=1e-10)
    u = random_orthogonal(6, 2)
    np.testing.assert_allclose(u @ u.T, np.eye(6), atol=1e-12)
    assert not np.allclose(covariance_matrix(cfg), np.diag(np.diag(covariance_matrix(cfg))))
    unrotated = dataclasses.replace(cfg, rotate=False)
    np.testing.assert_allclose(covariance_matrix(unrotated), np.diag(8.0 ** (-np.arange(4) / 3)))


@pytest.mark.parametrize("noise", [0.0, 0.5, 2.0])
def test_noise_variance_and_linear_target(noise):
    cfg = Config(d=3, n=5, noise=noise, covariance="cond", cond=4.0)
    tasks, w = _draw(cfg)
    x = np.asarray(tasks.x, np.float64)
    resid = np.asarray(tasks.y, np.float64) - np.einsum("bnd,bd->bn", x, w)
    resid_q = np.asarray(tasks.y_query, np.float64) - np.einsum("bd,bd->b", np.asarray(tasks.x_query, np.float64), w)
    r = np.concatenate([resid.ravel(), resid_q])
    se = np.sqrt(2.0 / r.size) * max(noise**2, 1e-12)  # var of a chi^2_1 * sigma^2 sample mean
    assert abs(np.mean(r**2) - noise**2) <= 5 * se + 1e-8
    assert abs(np.mean(r)) <= 5 * noise / np.sqrt(r.size) + 1e-6


@pytest.mark.parametrize("target", ["tanh", "relu_net"])
def test_nonlinear_targets_are_negation_symmetric_with_linear_scale(target):
    cfg = Config(d=4, n=7, target=target)
    tasks, _ = _draw(cfg)
    y = np.asarray(tasks.y, np.float64).ravel()
    se = y.std() / np.sqrt(y.size)
    assert abs(y.mean()) < 5 * se  # f and -f equally likely => E y = 0
    # E y^2: tr(Sigma Omega) = d for relu_net. For tanh, given w, s = w^T x ~ N(0, |w|^2) with
    # |w|^2 ~ chi^2_d, so E y^2 = d E[tanh(|w| Z / sqrt(d))^2]: Gauss-Hermite in Z, and an
    # independent 3e5-draw average over |w| (its error is far below the test's).
    if target == "relu_net":
        expected = cfg.d
    else:
        t, wts = np.polynomial.hermite_e.hermegauss(60)
        r = np.sqrt(np.random.default_rng(0).chisquare(cfg.d, 300_000))
        inner = np.tanh(np.outer(r, t) / np.sqrt(cfg.d)) ** 2 @ wts / np.sqrt(2 * np.pi)
        expected = cfg.d * inner.mean()
    assert abs(np.mean(y**2) - expected) < 5 * np.std(y**2) / np.sqrt(y.size)


def test_same_key_same_tasks_and_fresh_keys_differ():
    cfg = Config(d=3, n=4)
    spec, dist = TaskSpec.from_config(cfg), distribution(cfg)
    a = sample_tasks(jax.random.PRNGKey(0), dist, spec, 8)
    b = sample_tasks(jax.random.PRNGKey(0), dist, spec, 8)
    c = sample_tasks(jax.random.PRNGKey(1), dist, spec, 8)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.allclose(a.x, c.x)


@pytest.mark.parametrize("noise_dist", ["laplace", "heteroscedastic"])
def test_non_gaussian_label_noise_has_variance_sigma_squared(noise_dist):
    cfg = Config(d=3, n=5, noise=0.7, noise_dist=noise_dist, covariance="cond", cond=4.0)
    tasks, w = _draw(cfg)
    x = np.concatenate([np.asarray(tasks.x, np.float64), np.asarray(tasks.x_query, np.float64)[:, None]], 1)
    y = np.concatenate([np.asarray(tasks.y, np.float64), np.asarray(tasks.y_query, np.float64)[:, None]], 1)
    r = (y - np.einsum("bnd,bd->bn", x, w)).ravel()
    r2 = r**2
    assert abs(r2.mean() - 0.49) <= 5 * r2.std() / np.sqrt(r.size)
    kurtosis = np.mean(r**4) / np.mean(r2) ** 2
    if noise_dist == "laplace":  # Laplace kurtosis is 6 (Gaussian 3), independent of x
        assert 5.4 < kurtosis < 6.6
        assert abs(np.corrcoef(r2, (x**2).sum(-1).ravel())[0, 1]) < 0.02
    else:  # the variance follows |x|^2 / tr(Sigma)
        slope = np.mean(r2 * (x**2).sum(-1).ravel()) / np.mean((x**2).sum(-1) ** 2)
        assert abs(slope * np.trace(covariance_matrix(cfg)) - 0.49) < 0.03


def _whitened_covariates(cfg: Config) -> np.ndarray:
    """z = x Sigma^-1/2 for every context and query point, [M, d] float64: the white draws of ``x_dist``."""
    tasks, _ = _draw(cfg)
    x = np.concatenate([np.asarray(tasks.x).reshape(-1, cfg.d), np.asarray(tasks.x_query)], 0).astype(np.float64)
    return x @ np.linalg.inv(np.asarray(distribution(cfg).sigma_sqrt, np.float64))


def _fourth_moment(z: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E (u^T z)^4 for each unit row u of ``directions`` and its standard error (points are independent)."""
    p = (z @ directions.T) ** 4
    return p.mean(0), p.std(0) / np.sqrt(len(z))


def _directions(d: int) -> np.ndarray:
    """The coordinate axes and two random unit vectors (the laws are rotation invariant)."""
    u = np.random.default_rng(1).standard_normal((2, d))
    return np.concatenate([np.eye(d), u / np.linalg.norm(u, axis=1, keepdims=True)])


def test_sphere_covariates_lie_on_the_sphere_with_its_kurtosis():
    """x = z Sigma^1/2 with z uniform on the sphere of radius sqrt(d): |z| = sqrt(d) for every draw, and
    E (u^T z)^4 = 3d / (d + 2) for any unit u (z / sqrt(d) = g / |g| is independent of |g| for Gaussian g,
    so 3 = E (u^T g)^4 = E |g|^4 E (u^T z)^4 / d^2 with E |g|^4 = d (d + 2)); a Gaussian z has 3 and a
    spread of radii."""
    cfg = Config(d=4, n=3, x_dist="sphere", covariance="cond", cond=5.0, rotation_seed=4)
    z = _whitened_covariates(cfg)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.sqrt(cfg.d), rtol=2e-5)
    m4, se = _fourth_moment(z, _directions(cfg.d))
    expected = 3 * cfg.d / (cfg.d + 2)
    assert np.all(np.abs(m4 - expected) <= 5 * se), (m4, expected, se)


@pytest.mark.parametrize("dof", [7.0, 12.0])
def test_student_t_covariates_follow_the_t_law_of_their_dof(dof):
    """z = g sqrt((nu - 2) / chi^2_nu), one chi^2 per point: a multivariate t scaled to E z z^T = I.

    Radius: |z|^2 nu / (d (nu - 2)) = (|g|^2 / d) / (chi^2_nu / nu) ~ F(d, nu) exactly (Kolmogorov-Smirnov;
    the Gaussian's chi^2_d / d is rejected). Kurtosis: u^T z = sqrt((nu - 2) / nu) t_nu for a unit u, so
    E (u^T z)^4 = 3 (nu - 2) / (nu - 4) (t_nu's kurtosis 3 + 6 / (nu - 4)); checked at nu = 12, where the
    eighth moment that the standard error needs is finite."""
    cfg = Config(d=4, n=15, x_dist="student_t", dof=dof, covariance="cond", cond=5.0, rotation_seed=4)
    z = _whitened_covariates(cfg)
    r = (z**2).sum(1) * dof / (cfg.d * (dof - 2))
    assert stats.kstest(r, stats.f(cfg.d, dof).cdf).pvalue > 1e-3
    assert stats.kstest(r * (dof - 2) / dof, stats.chi2(cfg.d, scale=1 / cfg.d).cdf).pvalue < 1e-6  # test has power
    if dof > 8:
        m4, se = _fourth_moment(z, _directions(cfg.d))
        expected = 3 * (dof - 2) / (dof - 4)
        assert np.all(np.abs(m4 - expected) <= 5 * se), (m4, expected, se)
        assert np.all(m4 - 3 > 8 * se)  # and a Gaussian's 3 is far outside


def test_fused_normal_is_bit_identical_to_jax_random_normal():
    """The claim in ``data.normal``'s docstring: the same float32 values as ``jax.random.normal``, under jit
    (as sampled), eagerly and under vmap, for raw and typed threefry keys, odd sizes included."""
    fused, plain = jax.jit(normal, static_argnums=1), jax.jit(jax.random.normal, static_argnums=1)
    keys = [jax.random.PRNGKey(0), jax.random.fold_in(jax.random.PRNGKey(3), 9)]
    for shape in [(), (7,), (2, 3, 4), (257, 3)]:
        for key in keys:
            ref = np.asarray(plain(key, shape))
            assert ref.dtype == np.float32 and ref.shape == shape
            np.testing.assert_array_equal(np.asarray(fused(key, shape)), ref)
    typed = jax.random.key(7)
    np.testing.assert_array_equal(np.asarray(fused(typed, (5, 3))), np.asarray(plain(typed, (5, 3))))
    np.testing.assert_array_equal(np.asarray(normal(keys[0], (3, 5))), np.asarray(jax.random.normal(keys[0], (3, 5))))
    batch = jax.random.split(jax.random.PRNGKey(5), 3)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda k: normal(k, (9, 2)))(batch)),
                                  np.asarray(jax.vmap(lambda k: jax.random.normal(k, (9, 2)))(batch)))


def test_prior_eigenvalues_validation():
    """Length d, finite, > 0; rejected unless --weight_prior=eigenvalues (like --eigenvalues without
    --covariance=eigenvalues)."""
    from icl_gd.config import ConfigError

    Config(d=3, weight_prior="eigenvalues", prior_eigenvalues=(4, 2, 1)).validate()
    for bad in ((4.0, 2.0), (4.0, 2.0, 0.0), (4.0, float("nan"), 1.0), (4.0, float("inf"), 1.0)):
        with pytest.raises(ConfigError, match="prior_eigenvalues"):
            Config(d=3, weight_prior="eigenvalues", prior_eigenvalues=bad).validate()
    with pytest.raises(ConfigError, match="prior_eigenvalues"):
        Config(d=3, weight_prior="identity", prior_eigenvalues=(4, 2, 1)).validate()
    with pytest.raises(ConfigError, match="prior_eigenvalues"):
        Config(d=3, weight_prior="eigenvalues").validate()
    cfg = Config(d=3, weight_prior="eigenvalues", prior_eigenvalues=[4, 2, 1])
    assert cfg.prior_eigenvalues == (4.0, 2.0, 1.0) and Config.from_dict(cfg.to_dict()) == cfg


def test_uniform_covariates_have_unit_variance_and_uniform_fourth_moment():
    """--x_dist=uniform: i.i.d. coordinates on [-sqrt 3, sqrt 3] (variance 1, E z^4 = 9/5) before Sigma^1/2."""
    cfg = Config(d=3, n=7, x_dist="uniform").validate()
    t = sample_tasks(jax.random.key(3), distribution(cfg), TaskSpec.from_config(cfg), 40000)
    z = np.asarray(t.x, np.float64).reshape(-1, 3)
    assert np.abs(z).max() <= np.sqrt(3.0) + 1e-6
    np.testing.assert_allclose(z.var(0), 1.0, atol=0.01)
    np.testing.assert_allclose((z**4).mean(0), 9 / 5, atol=0.02)  # a Gaussian sampler gives 3
    cov = covariance_matrix(Config(d=3, covariance="cond", cond=10.0, x_dist="uniform"))
    cfg = Config(d=3, n=7, covariance="cond", cond=10.0, x_dist="uniform").validate()
    t = sample_tasks(jax.random.key(4), distribution(cfg), TaskSpec.from_config(cfg), 40000)
    x = np.asarray(t.x, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(x.T @ x / len(x), cov, atol=0.015)


def test_prior_mean_shifts_w_and_enters_the_second_moment():
    """--prior_mean=c: E[w] = c u (u Omega_0's first eigenvector) and prior_covariance = Omega_0 + mu mu^T."""
    from icl_gd.data import prior_mean

    cfg = Config(d=3, n=5, weight_prior="eigenvalues", prior_eigenvalues=(2.0, 1.0, 0.5), prior_mean=1.5).validate()
    mu = prior_mean(cfg)
    np.testing.assert_allclose(np.linalg.norm(mu), 1.5)
    omega0 = prior_covariance(Config(d=3, n=5, weight_prior="eigenvalues", prior_eigenvalues=(2.0, 1.0, 0.5)))
    np.testing.assert_allclose(omega0 @ mu, 2.0 * mu, rtol=1e-12)  # the top eigenvector
    np.testing.assert_allclose(prior_covariance(cfg), omega0 + np.outer(mu, mu), rtol=1e-12)
    w = np.asarray(sample_weights(jax.random.key(5), distribution(cfg), TaskSpec.from_config(cfg), 60000), np.float64)
    np.testing.assert_allclose(w.mean(0), mu, atol=0.02)
    np.testing.assert_allclose(w.T @ w / len(w), prior_covariance(cfg), atol=0.05)
    with pytest.raises(ConfigError, match="prior_mean"):
        Config(d=3, prior_mean=-1.0).validate()
