"""Random regression tasks: pure functions of a PRNG key, vmapped over tasks.

One task is n context pairs (x_i, y_i) and one query pair (x_q, y_q), all drawn from

    x ~ P_x with E[x x^T] = Sigma,   w ~ N(mu, Omega_0),   y = f_w(x) + eps,   eps ~ N(0, sigma^2),

with the noise on every pair, the query included (so the Bayes floor of any predictor is
sigma^2). Omega = I ("identity" prior), Omega = Sigma^-1 ("inverse" prior, the setting of
Mahankali et al. 2023, Thm. 2, where one *preconditioned* GD step is optimal) or Omega of a given
spectrum ("eigenvalues" prior, ``prior_eigenvalues``, rotated like Sigma's).

The distribution's numbers (Sigma^1/2, Omega^1/2, sigma) travel as a ``Distribution`` pytree of
arrays, so members of a sweep that differ only in them share one compiled program (vmap over
members); the shape-changing choices (d, n, law of x, target family) are a static ``TaskSpec``.

Speed: sampling is the floor of every training step, and on CPU JAX lowers the threefry hash
as a rolled loop that XLA cannot fuse (~4x slower than the hash itself). ``normal`` below
computes the very same bits (the partitionable threefry2x32 of ``jax.random.bits``, unrolled,
so XLA fuses hash -> uniform -> erfinv into one loop) and the same floats as
``jax.random.normal``. Every array is drawn flat and the covariates feature-major
([d, B (n+1)], mapped by Sigma^1/2 as d unrolled rows) before they become tokens
[B, n+1, d]: XLA:CPU does not vectorise loops over a minor axis of d elements, and runs the
[B (n+1), d] @ [d, d] GEMM several times slower than its arithmetic (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.config import Config
from icl_gd.fusion import barrier


class Tasks(NamedTuple):
    """A batch of B tasks: x [B, n, d], y [B, n], x_query [B, d], y_query [B]."""

    x: jax.Array
    y: jax.Array
    x_query: jax.Array
    y_query: jax.Array


# Every Config field the tasks depend on, the seed and held-out size included: two runs that agree on
# these draw the same training and held-out tasks (their baselines and references are shared).
DISTRIBUTION_FIELDS = ("d", "n", "covariance", "cond", "eigenvalues", "rotate", "rotation_seed", "x_dist", "dof",
                       "weight_prior", "prior_eigenvalues", "prior_mean", "noise", "noise_dist", "x_scale", "w_scale",
                       "target", "relu_width", "seed", "eval_tasks")


class Distribution(NamedTuple):
    """The numeric part of a task distribution (a pytree; vmap it over sweep members)."""

    sigma_sqrt: jax.Array  # [d, d] symmetric square root of Sigma = E[x x^T]
    prior_sqrt: jax.Array  # [d, d] symmetric square root of Omega_0 = Cov(w)
    noise: jax.Array  # [] label-noise std sigma
    prior_mean: jax.Array  # [d] mean of w (zeros unless --prior_mean)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The static (shape- and code-path-changing) part of a task distribution."""

    d: int
    n: int
    x_dist: str = "gaussian"
    dof: float = 5.0
    target: str = "linear"
    relu_width: int = 16
    noise_dist: str = "gaussian"

    @classmethod
    def from_config(cls, cfg: Config) -> TaskSpec:
        return cls(cfg.d, cfg.n, cfg.x_dist, cfg.dof, cfg.target, cfg.relu_width, cfg.noise_dist)


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
    """Sigma = x_scale^2 U diag(lambda) U^T, the covariance of x (float64, [d, d])."""
    return cfg.x_scale**2 * _from_eig(eigenbasis(cfg), spectrum(cfg))


def _prior_spectrum(cfg: Config) -> np.ndarray:
    """Eigenvalues of Omega / w_scale^2: ones (identity prior), 1 / lambda (inverse prior, of the
    unstretched Sigma: --x_scale stretches x at a fixed law of w) or ``prior_eigenvalues``."""
    if cfg.weight_prior == "eigenvalues":
        return np.asarray(cfg.prior_eigenvalues, dtype=np.float64)
    return np.ones(cfg.d) if cfg.weight_prior == "identity" else 1.0 / spectrum(cfg)


def prior_eigenbasis(cfg: Config) -> np.ndarray:
    """Eigenvectors of Omega (columns): Sigma's (``eigenbasis``), except that an explicit prior spectrum
    is rotated by the ``rotation_seed`` rotation whenever ``rotate`` is on, also when Sigma is isotropic
    (then Omega alone is anisotropic). With an anisotropic rotated Sigma both share that rotation."""
    if cfg.weight_prior == "eigenvalues":
        return random_orthogonal(cfg.d, cfg.rotation_seed) if cfg.rotate else np.eye(cfg.d)
    return eigenbasis(cfg)


def prior_mean(cfg: Config) -> np.ndarray:
    """mu = E[w] = w_scale c u: c = ``prior_mean``, u the first column of ``prior_eigenbasis`` (float64, [d])."""
    return cfg.w_scale * cfg.prior_mean * prior_eigenbasis(cfg)[:, 0]


def prior_covariance(cfg: Config) -> np.ndarray:
    """Omega = E[w w^T] (the second moment, which is all the closed forms read) = Omega_0 + mu mu^T with
    Omega_0 = Cov(w) = w_scale^2 I (identity prior), w_scale^2 Sigma_0^-1 (inverse prior), with Sigma_0 the
    covariance before --x_scale, or w_scale^2 U diag(prior_eigenvalues) U^T (eigenvalues prior), and mu
    = ``prior_mean`` (0 unless --prior_mean)."""
    mu = prior_mean(cfg)
    return cfg.w_scale**2 * _from_eig(prior_eigenbasis(cfg), _prior_spectrum(cfg)) + np.outer(mu, mu)


def distribution(cfg: Config) -> Distribution:
    """The ``Distribution`` arrays (float32) for a config."""
    u, lam = eigenbasis(cfg), spectrum(cfg)
    return Distribution(
        sigma_sqrt=jnp.asarray(cfg.x_scale * _from_eig(u, np.sqrt(lam)), jnp.float32),
        prior_sqrt=jnp.asarray(cfg.w_scale * _from_eig(prior_eigenbasis(cfg), np.sqrt(_prior_spectrum(cfg))),
                               jnp.float32),
        noise=jnp.asarray(cfg.noise, jnp.float32),
        prior_mean=jnp.asarray(prior_mean(cfg), jnp.float32),
    )


# ---------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds), unrolled: the hash of ``jax.random`` as plain fusible ops."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _raw_threefry_key(key: jax.Array) -> jax.Array | None:
    """The uint32[2] threefry key data, or None when ``key`` is not a threefry key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if "threefry" not in str(jax.random.key_impl(key)):
            return None
        key = jax.random.key_data(key)
    elif jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key if key.shape == (2,) and key.dtype == jnp.uint32 else None


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 N(0, 1) draws, bit-identical to ``jax.random.normal(key, shape)``, but fused.

    Same algorithm as jax (partitionable threefry: word i is the XOR of the two outputs of
    the hash of counter (0, i); 23 mantissa bits -> uniform on (-1, 1) -> sqrt(2) erfinv).
    Falls back to ``jax.random.normal`` for other PRNG implementations or settings.
    """
    raw = _raw_threefry_key(key)
    size = int(np.prod(shape))
    if raw is None or not jax.config.jax_threefry_partitionable or size >= 2**32 - 8:
        return jax.random.normal(key, shape)
    # Drawn flat (word i is element i in row-major order, as in jax) and materialised before the
    # reshape: fused into a [.., d] output, the loop runs over a minor axis of d elements that
    # XLA:CPU does not vectorise (3.2 vs 0.5-1.1 ms for the 107,520 draws of x at B=1024). The
    # flat length is padded to a multiple of 8: an odd one ran 8x slower (25.8 vs 2.2-3.4 ms
    # for ~430,000 draws); the extra draws are dropped, the others are unchanged.
    padded = -(-size // 8) * 8
    counts = jax.lax.iota(jnp.uint32, padded)
    b0, b1 = _threefry2x32(raw[0], raw[1], jnp.zeros_like(counts), counts)
    bits = ((b0 ^ b1) >> np.uint32(9)) | np.uint32(0x3F800000)
    unit = jax.lax.bitcast_convert_type(bits, jnp.float32) - np.float32(1.0)  # [0, 1)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jax.lax.max(lo, unit * (np.float32(1.0) - lo) + lo)
    return barrier(np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u))[:size].reshape(shape)


def _directions(key: jax.Array, spec: TaskSpec, size: int) -> jax.Array:
    """``size`` white covariates z with E[z z^T] = I in the requested law, feature-major [d, size]."""
    kz, kr = jax.random.split(key)
    if spec.x_dist == "uniform":
        # i.i.d. coordinates uniform on [-sqrt 3, sqrt 3]: variance 1, E z^4 = 9/5 (Gaussian: 3), not
        # rotation-invariant: the one-layer optimum reads the fourth moments (theory.second_moment).
        return jax.random.uniform(kz, (spec.d, size), minval=-np.sqrt(3.0), maxval=np.sqrt(3.0))
    z = normal(kz, (spec.d, size))
    if spec.x_dist == "sphere":
        # Uniform on the sphere of radius sqrt(d): E[z z^T] = I.
        return z * jnp.sqrt(spec.d) / jnp.linalg.norm(z, axis=0, keepdims=True)
    if spec.x_dist == "student_t":
        # Multivariate t with nu dof: z / sqrt(chi2_nu / nu) has covariance nu/(nu-2) I,
        # so rescale by sqrt((nu-2)/nu). Rotation-invariant, heavy-tailed radius.
        nu = spec.dof
        chi2 = 2.0 * jax.random.gamma(kr, nu / 2.0, (1, size))
        return z * jnp.sqrt((nu - 2.0) / chi2)
    return z


def _combine(m: jax.Array, rows: jax.Array) -> jax.Array:
    """m^T rows for feature-major rows [d, ...]: sum_i m[i, j] rows[i], unrolled into one
    elementwise loop (XLA:CPU runs a [B (n+1), d] @ [d, d] GEMM several times slower)."""
    return jnp.stack([sum(m[i, j] * rows[i] for i in range(m.shape[0])) for j in range(m.shape[1])])


def _targets(key: jax.Array, spec: TaskSpec, x: jax.Array, xf: jax.Array, w: jax.Array,
             prior_sqrt: jax.Array) -> jax.Array:
    """f_w(x) [B, N] for x [B, N, d] (feature-major too: xf [d, B, N]) and w [B, d]. Every family
    is negation-symmetric (w -> -w) when the prior is centred (--prior_mean=0)."""
    # Unrolled over the d features: a batched matvec (B tiny dots) or a small reduce is several
    # times slower on XLA:CPU than this one elementwise loop.
    s = sum(xf[i] * w[:, i, None] for i in range(spec.d))
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
    v = normal(kv, (b, m, spec.d)) @ prior_sqrt
    a = normal(ka, (b, m))
    hidden = jax.nn.relu(jnp.einsum("bnd,bmd->bnm", x, v))
    return jnp.sqrt(2.0 / m) * jnp.einsum("bnm,bm->bn", hidden, a)


def _unit_noise(key: jax.Array, spec: TaskSpec, xf: jax.Array, sigma_sqrt: jax.Array) -> jax.Array:
    """Label noise of unit variance, [B, n+1] (xf: the covariates feature-major [d, B, n+1]),
    scaled by sigma in ``sample_tasks``.

    gaussian: N(0, 1). laplace: Laplace(0, 1/sqrt(2)) (variance 2 b^2 = 1), heavier tails, same
    variance, independent of x — so the one-layer closed forms, which see the noise only
    through sigma^2, still hold. heteroscedastic: N(0, |x|^2 / tr(Sigma)): E eps^2 = 1 overall,
    but the noise grows with |x|, which the closed forms do not cover.
    """
    shape = xf.shape[1:]
    if spec.noise_dist == "laplace":
        return jax.random.laplace(key, shape) / jnp.sqrt(2.0)
    z = normal(key, shape)
    if spec.noise_dist == "heteroscedastic":
        return z * jnp.sqrt(sum(xf[i] ** 2 for i in range(spec.d)) / jnp.sum(sigma_sqrt**2))
    return z


def sample_tasks(key: jax.Array, dist: Distribution, spec: TaskSpec, batch: int) -> Tasks:
    """Draw ``batch`` independent tasks (n context pairs + one query each).

    The covariates are drawn and mapped by Sigma^1/2 feature-major ([d, B (n+1)] rows, every
    op an elementwise loop over B (n+1) elements) and only then laid out as tokens [B, n+1, d].
    """
    chex.assert_shape([dist.sigma_sqrt, dist.prior_sqrt], (spec.d, spec.d))
    kx, kw, kf, ke = jax.random.split(key, 4)
    n = spec.n
    xf = _combine(dist.sigma_sqrt, _directions(kx, spec, batch * (n + 1))).reshape(spec.d, batch, n + 1)
    x = jnp.transpose(xf, (1, 2, 0))
    w = normal(kw, (batch, spec.d)) @ dist.prior_sqrt + dist.prior_mean
    y = _targets(kf, spec, x, xf, w, dist.prior_sqrt)
    # sigma = 0 adds exactly 0 * N(0, 1) = 0: skip the draw then (a sixth of the random bits
    # at d=5). Under vmap (sweeps) the cond becomes a select and both sides run: same values.
    y = jax.lax.cond(dist.noise == 0, lambda: y,
                     lambda: y + dist.noise * _unit_noise(ke, spec, xf, dist.sigma_sqrt))
    tasks = Tasks(x=x[:, :n], y=y[:, :n], x_query=x[:, n], y_query=y[:, n])
    chex.assert_shape(tasks.x, (batch, n, spec.d))
    chex.assert_shape(tasks.y_query, (batch,))
    return tasks


def sample_weights(key: jax.Array, dist: Distribution, spec: TaskSpec, batch: int) -> jax.Array:
    """The w of ``sample_tasks(key, ...)`` for the same key (for moment tests and oracles)."""
    _, kw, _, _ = jax.random.split(key, 4)
    return normal(kw, (batch, spec.d)) @ dist.prior_sqrt + dist.prior_mean
