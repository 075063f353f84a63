"""Random regression tasks: pure functions of a PRNG key, vmapped over tasks.

One task is n context pairs (x_i, y_i) and one query pair (x_q, y_q), all drawn from

    x ~ P_x with E[x x^T] = Sigma,   w ~ N(0, Omega),   y = f_w(x) + eps,   eps ~ N(0, sigma^2),

with the noise on every pair, the query included (so the Bayes floor of any predictor is
sigma^2). Omega = I ("identity" prior) or Omega = Sigma^-1 ("inverse" prior, the setting of
Mahankali et al. 2023, Thm. 2, where one *preconditioned* GD step is optimal).

The distribution's numbers (Sigma^1/2, Omega^1/2, sigma) travel as a ``Distribution`` pytree of
arrays, so members of a sweep that differ only in them share one compiled program (vmap over
members); the shape-changing choices (d, n, law of x, target family) are a static ``TaskSpec``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.config import Config


class Tasks(NamedTuple):
    """A batch of B tasks: x [B, n, d], y [B, n], x_query [B, d], y_query [B]."""

    x: jax.Array
    y: jax.Array
    x_query: jax.Array
    y_query: jax.Array


class Distribution(NamedTuple):
    """The numeric part of a task distribution (a pytree; vmap it over sweep members)."""

    sigma_sqrt: jax.Array  # [d, d] symmetric square root of Sigma = E[x x^T]
    prior_sqrt: jax.Array  # [d, d] symmetric square root of Omega = E[w w^T]
    noise: jax.Array  # [] label-noise std sigma


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The static (shape- and code-path-changing) part of a task distribution."""

    d: int
    n: int
    x_dist: str = "gaussian"
    dof: float = 5.0
    target: str = "linear"
    relu_width: int = 16

    @classmethod
    def from_config(cls, cfg: Config) -> TaskSpec:
        return cls(cfg.d, cfg.n, cfg.x_dist, cfg.dof, cfg.target, cfg.relu_width)


# ---------------------------------------------------------------------------------------
# Sigma and Omega, in float64 NumPy: deterministic functions of the config.
# ---------------------------------------------------------------------------------------
def random_orthogonal(d: int, seed: int) -> np.ndarray:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian matrix, signs fixed by diag R)."""
    a = np.random.default_rng(seed).standard_normal((d, d))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))


def spectrum(cfg: Config) -> np.ndarray:
    """Eigenvalues of Sigma: ones, geometric 1 .. 1/cond, or the explicit list."""
    if cfg.covariance == "isotropic":
        return np.ones(cfg.d)
    if cfg.covariance == "cond":
        if cfg.d == 1:
            return np.ones(1)
        return cfg.cond ** (-np.arange(cfg.d) / (cfg.d - 1))
    return np.asarray(cfg.eigenvalues, dtype=np.float64)


def eigenbasis(cfg: Config) -> np.ndarray:
    """Eigenvectors of Sigma (columns): identity, or a rotation seeded by ``rotation_seed``."""
    if cfg.covariance == "isotropic" or not cfg.rotate:
        return np.eye(cfg.d)
    return random_orthogonal(cfg.d, cfg.rotation_seed)


def _from_eig(u: np.ndarray, lam: np.ndarray) -> np.ndarray:
    m = (u * lam) @ u.T
    return (m + m.T) / 2


def covariance_matrix(cfg: Config) -> np.ndarray:
    """Sigma = U diag(lambda) U^T, the covariance of x (float64, [d, d])."""
    return _from_eig(eigenbasis(cfg), spectrum(cfg))


def prior_covariance(cfg: Config) -> np.ndarray:
    """Omega = E[w w^T]: I for the identity prior, Sigma^-1 for the inverse prior."""
    if cfg.weight_prior == "identity":
        return np.eye(cfg.d)
    return _from_eig(eigenbasis(cfg), 1.0 / spectrum(cfg))


def distribution(cfg: Config) -> Distribution:
    """The ``Distribution`` arrays (float32) for a config."""
    u, lam = eigenbasis(cfg), spectrum(cfg)
    prior_lam = np.ones(cfg.d) if cfg.weight_prior == "identity" else 1.0 / lam
    return Distribution(
        sigma_sqrt=jnp.asarray(_from_eig(u, np.sqrt(lam)), jnp.float32),
        prior_sqrt=jnp.asarray(_from_eig(u, np.sqrt(prior_lam)), jnp.float32),
        noise=jnp.asarray(cfg.noise, jnp.float32),
    )


# ---------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------
def _directions(key: jax.Array, spec: TaskSpec, shape: tuple[int, ...]) -> jax.Array:
    """White covariates z with E[z z^T] = I, in the requested law."""
    kz, kr = jax.random.split(key)
    z = jax.random.normal(kz, (*shape, spec.d))
    if spec.x_dist == "sphere":
        # Uniform on the sphere of radius sqrt(d): E[z z^T] = I.
        return z * jnp.sqrt(spec.d) / jnp.linalg.norm(z, axis=-1, keepdims=True)
    if spec.x_dist == "student_t":
        # Multivariate t with nu dof: z / sqrt(chi2_nu / nu) has covariance nu/(nu-2) I,
        # so rescale by sqrt((nu-2)/nu). Rotation-invariant, heavy-tailed radius.
        nu = spec.dof
        chi2 = 2.0 * jax.random.gamma(kr, nu / 2.0, (*shape, 1))
        return z * jnp.sqrt((nu - 2.0) / chi2)
    return z


def _targets(key: jax.Array, spec: TaskSpec, x: jax.Array, w: jax.Array,
             prior_sqrt: jax.Array) -> jax.Array:
    """f_w(x) for x [B, N, d], w [B, d] -> [B, N]. Every family is negation-symmetric."""
    s = x @ w[..., None]
    s = s[..., 0]
    if spec.target == "linear":
        return s
    if spec.target == "tanh":
        # Single-index, odd link; c tanh(s / c) with c = sqrt(d) is linear near 0 with the
        # same scale as the linear target.
        c = jnp.sqrt(spec.d)
        return c * jnp.tanh(s / c)
    # Random two-layer ReLU net f(x) = sqrt(2/m) sum_j a_j relu(v_j^T x), v_j ~ N(0, Omega),
    # a_j ~ N(0, 1): a -> -a makes the family negation-symmetric, and E f^2 = tr(Sigma Omega)
    # matches the linear target's scale.
    kv, ka = jax.random.split(key)
    b, m = w.shape[0], spec.relu_width
    v = jax.random.normal(kv, (b, m, spec.d)) @ prior_sqrt
    a = jax.random.normal(ka, (b, m))
    hidden = jax.nn.relu(jnp.einsum("bnd,bmd->bnm", x, v))
    return jnp.sqrt(2.0 / m) * jnp.einsum("bnm,bm->bn", hidden, a)


def sample_tasks(key: jax.Array, dist: Distribution, spec: TaskSpec, batch: int) -> Tasks:
    """Draw ``batch`` independent tasks (n context pairs + one query each)."""
    chex.assert_shape([dist.sigma_sqrt, dist.prior_sqrt], (spec.d, spec.d))
    kx, kw, kf, ke = jax.random.split(key, 4)
    n = spec.n
    x = _directions(kx, spec, (batch, n + 1)) @ dist.sigma_sqrt
    w = jax.random.normal(kw, (batch, spec.d)) @ dist.prior_sqrt
    y = _targets(kf, spec, x, w, dist.prior_sqrt)
    y = y + dist.noise * jax.random.normal(ke, (batch, n + 1))
    tasks = Tasks(x=x[:, :n], y=y[:, :n], x_query=x[:, n], y_query=y[:, n])
    chex.assert_shape(tasks.x, (batch, n, spec.d))
    chex.assert_shape(tasks.y_query, (batch,))
    return tasks


def sample_weights(key: jax.Array, dist: Distribution, spec: TaskSpec, batch: int) -> jax.Array:
    """The w of ``sample_tasks(key, ...)`` for the same key (for moment tests and oracles)."""
    _, kw, _, _ = jax.random.split(key, 4)
    return jax.random.normal(kw, (batch, spec.d)) @ dist.prior_sqrt
