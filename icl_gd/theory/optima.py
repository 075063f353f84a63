"""What the theory says a trained LSA should compute, and how well it can do.

Setting: x = Sigma^1/2 z with white z (E[z z^T] = I) of a law ``x_dist`` (Gaussian, uniform i.i.d.
coordinates, uniform on the sphere, Student-t: ``data._directions``), w ~ N(mu, Omega_0) with
Omega = E[w w^T], y = x^T w + eps on every pair. The one-layer predictor is
yhat = (1/n) x_q^T Gamma X^T y = x_q^T Gamma g with g = (1/n) X^T y.

* Closed forms (float64 NumPy, exact; label noise Gaussian, Laplace or heteroscedastic via
  ``noise_dist``, see ``noise_moment``; covariates of any law with finite fourth moments via
  ``x_dist`` / ``dof``, see ``fourth_moment``): ``second_moment``, ``loss_of_gamma``, ``gamma_star``,
  ``loss_star``, ``best_scale`` and the special cases ``eta_star``, ``isotropic_loss_star``,
  ``inverse_prior_gamma_star``, ``ahn_preconditioner``.
* Monte Carlo, for any distribution ``data.sample_tasks`` can draw (Student-t x with dof <= 4,
  nonlinear targets) where no closed form exists: ``mc_gamma_star`` (normal equations over
  vec(Gamma), with batch-means standard errors) and ``mc_loss``.
* Multi-step references: ``pgd_predict`` (k steps of preconditioned GD) and
  ``optimal_step_sizes`` (one step size per step, tuned by L-BFGS on a fixed MC sample).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.config import Config
from icl_gd.data import Distribution, Tasks, TaskSpec, covariance_matrix, prior_covariance, sample_tasks

# ---------------------------------------------------------------------------------------
# Fourth moments of the covariates: the only place the law of x enters the one-layer optimum.
# ---------------------------------------------------------------------------------------
UNIFORM_M4 = 9 / 5  # E z^4 of z uniform on [-sqrt 3, sqrt 3] (variance 1): 3^2 / 5


def symmetric_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root Sigma^1/2 (by eigh). It is unique, so it is the ``sigma_sqrt`` of
    ``data.distribution`` (x = z Sigma^1/2, x_scale included) up to rounding."""
    lam, u = np.linalg.eigh((sigma + sigma.T) / 2)
    return (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T


def covariate_moments(x_dist: str, d: int, dof: float | None = None) -> tuple[float, float]:
    """(kappa, e) with E[z_i z_j z_k z_l] = kappa (d_ij d_kl + d_ik d_jl + d_il d_jk) + e d_ijkl for the
    white z of each law of ``data._directions`` (d_ijkl = 1 iff i = j = k = l):

    * gaussian: (1, 0) (Isserlis).
    * uniform: i.i.d. coordinates of variance 1 and E z^4 = m4 = 9/5, so every pairing term is 1 and
      only the all-equal index adds m4 - 3: (1, m4 - 3) = (1, -6/5).
    * sphere (z uniform on the sphere of radius sqrt d): rotation invariant, so the tensor is kappa times
      the pairings; contracting i = j, k = l gives E|z|^4 = d^2 = kappa d (d + 2): (d / (d + 2), 0).
    * student_t (z = g sqrt((nu - 2) / chi^2_nu), one chi^2 per point): E[z z z z] = (nu - 2)^2
      E[chi^-4] E[g g g g] and E[1/chi^4_nu] = 1/((nu - 2)(nu - 4)) (inverse-chi^2 moments):
      ((nu - 2) / (nu - 4), 0) for nu > 4; infinite for nu <= 4 (ValueError: no closed form).
    """
    if x_dist == "gaussian":
        return 1.0, 0.0
    if x_dist == "uniform":
        return 1.0, UNIFORM_M4 - 3.0
    if x_dist == "sphere":
        return d / (d + 2.0), 0.0
    if x_dist == "student_t":
        if dof is None or not dof > 4:
            raise ValueError(f"x_dist=student_t needs dof > 4 for finite fourth moments (got dof={dof})")
        return (dof - 2.0) / (dof - 4.0), 0.0
    raise ValueError(f"unknown x_dist {x_dist!r}")


def fourth_moment(a: np.ndarray, sigma: np.ndarray, x_dist: str = "gaussian", dof: float | None = None) -> np.ndarray:
    """E[x x^T A x x^T] for x = Sigma^1/2 z, z of law ``x_dist`` (``covariate_moments``: kappa, e).

    With R = Sigma^1/2 (symmetric, ``symmetric_sqrt``) and B = R A R, E[x x^T A x x^T] = R E[z z^T B z z^T] R
    and, from E[z_i z_j z_k z_l] = kappa (pairings) + e d_ijkl,
    E[z z^T B z z^T]_il = sum_jk E[z_i z_j z_k z_l] B_jk = kappa (B_il + B_li + d_il tr B) + e d_il B_ii, so

        E[x x^T A x x^T] = kappa (Sigma A Sigma + Sigma A^T Sigma + tr(A Sigma) Sigma) + e R Diag(R A R) R

    (Diag: the diagonal part). Gaussian (kappa = 1, e = 0): Isserlis' 2 Sigma A Sigma + tr(A Sigma) Sigma for
    symmetric A (Mahankali et al. 2023, proof of Thm. 2; Ahn et al. 2023, Lemma 6). The rotation-invariant
    laws (sphere, Student-t) scale it by kappa; the uniform law's e-term is not rotation equivariant:
    it reads A in the coordinates of z, which is why the symmetric root (the one ``data`` uses) matters.
    """
    kappa, e = covariate_moments(x_dist, sigma.shape[0], dof)
    out = kappa * (sigma @ a @ sigma + sigma @ a.T @ sigma + np.trace(a @ sigma) * sigma)
    if e:
        r = symmetric_sqrt(sigma)
        out = out + e * r @ np.diag(np.diag(r @ a @ r)) @ r
    return out


# ---------------------------------------------------------------------------------------
# Exact closed forms (linear target, covariates of finite fourth moment).
# ---------------------------------------------------------------------------------------
def noise_moment(sigma: np.ndarray, noise: float, noise_dist: str = "gaussian", x_dist: str = "gaussian",
                 dof: float | None = None) -> np.ndarray:
    """E[eps^2 x x^T] for one pair (x, eps): the label noise's share of n S (``second_moment``).

    Noise independent of x ("gaussian", "laplace": mean 0, variance sigma^2): sigma^2 Sigma, for any law of x.
    "heteroscedastic" (``data._unit_noise``: Var(eps | x) = sigma^2 |x|^2 / tr(Sigma), E eps^2 =
    sigma^2 overall): E[eps^2 x x^T] = sigma^2 / tr(Sigma) E[x x^T I x x^T] = sigma^2 / tr(Sigma)
    ``fourth_moment``(I); for Gaussian x (Isserlis, A = I) that is

        sigma^2 / tr(Sigma) (2 Sigma^2 + tr(Sigma) Sigma) = sigma^2 (Sigma + 2 Sigma^2 / tr(Sigma)),

    and the other laws replace it by their own fourth moment (so heteroscedastic noise keeps a closed
    form with every law of x whose fourth moments are finite). The noise grows along |x|, so it weighs
    the large-variance directions of Sigma more.
    """
    if noise_dist == "heteroscedastic":
        return noise**2 / np.trace(sigma) * fourth_moment(np.eye(sigma.shape[0]), sigma, x_dist, dof)
    return noise**2 * sigma


def second_moment(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float, noise_dist: str = "gaussian",
                  x_dist: str = "gaussian", dof: float | None = None) -> np.ndarray:
    """S = E[g g^T] for g = (1/n) X^T y.

    The signal part is (1/n^2) sum_{i,j} E[x_i x_i^T w w^T x_j x_j^T] with w independent of X: the
    n(n-1) pairs i != j (independent points) give Sigma Omega Sigma each, the n terms i = j give
    M(Omega) = E[x x^T Omega x x^T] (``fourth_moment``, the law of x enters only here); the noise
    adds (1/n) ``noise_moment``:

        S = (n-1)/n Sigma Omega Sigma + (1/n) M(Omega) + (1/n) E[eps^2 x x^T].

    Gaussian x (Isserlis, M(Omega) = 2 Sigma Omega Sigma + tr(Omega Sigma) Sigma):
    S = (n+1)/n Sigma Omega Sigma + (tr(Omega Sigma) + sigma^2)/n Sigma
    (Mahankali et al. 2023, proof of Thm. 2 / Lemma D.2; Ahn et al. 2023, Lemma 6). Rotation-invariant
    laws of kurtosis factor kappa (sphere d/(d+2), Student-t (nu-2)/(nu-4)):
    S = (n-1+2 kappa)/n Sigma Omega Sigma + kappa tr(Omega Sigma)/n Sigma + noise: kappa scales only the
    i = j terms, not the (n-1)/n cross terms. Uniform coordinates add (m4-3)/n R Diag(R Omega R) R.

    The noise term is (1/n^2) sum_i E[eps_i^2 x_i x_i^T] = (1/n) ``noise_moment`` for any noise
    with E[eps_i | X, w] = 0, independent across pairs (the cross terms with the signal
    (1/n) X^T X w and between pairs vanish). Only Omega = E[w w^T] enters (w independent of X).
    """
    m = fourth_moment(omega, sigma, x_dist, dof)
    return ((n - 1) / n * sigma @ omega @ sigma + m / n
            + noise_moment(sigma, noise, noise_dist, x_dist, dof) / n)


def loss_of_gamma(gamma: np.ndarray, sigma: np.ndarray, omega: np.ndarray, n: int, noise: float,
                  noise_dist: str = "gaussian", x_dist: str = "gaussian", dof: float | None = None) -> float:
    """Exact E[(yhat - y_q)^2] of yhat = x_q^T Gamma g, for ANY Gamma:

        L(Gamma) = tr(Sigma Gamma S Gamma^T) - 2 tr(Sigma Gamma Sigma Omega) + tr(Sigma Omega) + sigma^2,

    using E[g w^T] = Sigma Omega and x_q independent of (g, w) (Mahankali et al. 2023, eq. (4.1)).
    Only S depends on the noise law and on the law of x (``second_moment``): E[g w^T] = Sigma Omega
    and E[x_q x_q^T] = Sigma for every law, the query's noise has E[eps_q | x_q] = 0 (no cross term)
    and E eps_q^2 = sigma^2 for every law here (heteroscedastic: sigma^2 E|x_q|^2 / tr(Sigma) =
    sigma^2). The predictor is linear in the noise, so only these second moments enter: Laplace noise
    gives exactly the Gaussian L(Gamma).
    """
    s = second_moment(sigma, omega, n, noise, noise_dist, x_dist, dof)
    return float(np.trace(sigma @ gamma @ s @ gamma.T) - 2 * np.trace(sigma @ gamma @ sigma @ omega)
                 + np.trace(sigma @ omega) + noise**2)


def gamma_star(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float, noise_dist: str = "gaussian",
               x_dist: str = "gaussian", dof: float | None = None) -> np.ndarray:
    """The minimiser of ``loss_of_gamma``: Sigma Gamma S = Sigma Omega Sigma => Gamma* = Omega Sigma S^-1.

    (Setting d L / d Gamma = 2 Sigma Gamma S - 2 Sigma Omega Sigma to zero; L is strictly convex
    in Gamma since Sigma, S > 0. Mahankali et al. 2023, Thm. 2 for Omega = Sigma^-1.) Any noise
    law and any law of x enter through S alone. For Sigma = Omega = I and heteroscedastic noise
    (Gaussian x) Gamma* = n / (n + d + 1 + sigma^2 (d+2)/d) I: the noise acts as sigma^2 (1 + 2/d) on the
    step. For Sigma = Omega = I and other laws of x see ``eta_star``.
    """
    s = second_moment(sigma, omega, n, noise, noise_dist, x_dist, dof)
    return np.linalg.solve(s.T, (omega @ sigma).T).T


def loss_star(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float, noise_dist: str = "gaussian",
              x_dist: str = "gaussian", dof: float | None = None) -> float:
    """L* = L(Gamma*), the best loss of any one-layer LSA (Mahankali et al. 2023, Thm. 1-2)."""
    return loss_of_gamma(gamma_star(sigma, omega, n, noise, noise_dist, x_dist, dof), sigma, omega, n, noise,
                         noise_dist, x_dist, dof)


def best_scale(precond: np.ndarray, sigma: np.ndarray, omega: np.ndarray, n: int, noise: float,
               noise_dist: str = "gaussian", x_dist: str = "gaussian", dof: float | None = None) -> float:
    """argmin_c L(c P) = tr(Sigma P Sigma Omega) / tr(Sigma P S P^T): the tuned step of one GD step
    with preconditioner P (L(cP) is the quadratic c^2 tr(Sigma P S P^T) - 2c tr(Sigma P Sigma Omega) + const,
    from eq. (4.1) of Mahankali et al. 2023 as in ``loss_of_gamma``)."""
    s = second_moment(sigma, omega, n, noise, noise_dist, x_dist, dof)
    return float(np.trace(sigma @ precond @ sigma @ omega) / np.trace(sigma @ precond @ s @ precond.T))


def eta_star(n: int, d: int, noise: float, x_dist: str = "gaussian", dof: float | None = None) -> float:
    """Optimal GD step for Sigma = Omega = I (label noise independent of x):

        eta* = n / (n - 1 + kappa (d + 2) + e + sigma^2)      (``covariate_moments``: kappa, e),

    since S = (n - 1 + kappa (d + 2) + e + sigma^2)/n I there (``second_moment`` with
    ``fourth_moment``(I) = (kappa (d + 2) + e) I). Gaussian x: n / (n + d + 1 + sigma^2) (Mahankali et al.,
    Thm. 1); uniform coordinates (e = m4 - 3 = -6/5): n / (n + d + 1 + (m4 - 3) + sigma^2) =
    n / (n + d - 0.2 + sigma^2); sphere (kappa (d + 2) = d): n / (n + d - 1 + sigma^2); Student-t:
    n / (n - 1 + (nu - 2)(d + 2)/(nu - 4) + sigma^2)."""
    kappa, e = covariate_moments(x_dist, d, dof)
    return n / (n - 1 + kappa * (d + 2) + e + noise**2)


def isotropic_loss_star(n: int, d: int, noise: float) -> float:
    """L* = sigma^2 + d (d + 1 + sigma^2) / (n + d + 1 + sigma^2) for Sigma = Omega = I (Gaussian x).

    Also L* for Omega = Sigma^-1 and any Sigma: there Gamma* = eta* Sigma^-1 (see
    ``inverse_prior_gamma_star``) and L(c Sigma^-1) = c^2 d (n+d+1+sigma^2)/n - 2cd + d + sigma^2.
    """
    return noise**2 + d * (d + 1 + noise**2) / (n + d + 1 + noise**2)


def inverse_prior_gamma_star(sigma: np.ndarray, n: int, noise: float) -> np.ndarray:
    """Gamma* = n / (n + d + 1 + sigma^2) Sigma^-1 for Omega = Sigma^-1 (Mahankali et al. 2023, Thm. 2):
    S = (n + 1 + d + sigma^2)/n Sigma there, so Gamma* = Omega Sigma S^-1 = S^-1 (Gaussian x)."""
    d = sigma.shape[0]
    return eta_star(n, d, noise) * np.linalg.inv(sigma)


def ahn_preconditioner(sigma: np.ndarray, n: int) -> np.ndarray:
    """Ahn et al. 2023, Thm. 1 (Omega = I, noise 0, Gaussian x): Gamma* = ((n+1)/n Sigma + tr(Sigma)/n I)^-1."""
    d = sigma.shape[0]
    return np.linalg.inv((n + 1) / n * sigma + np.trace(sigma) / n * np.eye(d))


def has_closed_form(cfg: Config) -> bool:
    """Whether the closed forms give the exact one-layer optimum of ``cfg``'s distribution: linear
    targets and covariates of finite fourth moments (Gaussian, uniform, sphere, Student-t with dof > 4:
    ``covariate_moments``); any Sigma, any prior, any noise law in ``NOISE_DISTS`` (one independent of
    x enters only through sigma^2, so Laplace is Gaussian's; heteroscedastic noise changes S,
    ``noise_moment``, with every such law of x). Callers pass ``cfg.noise_dist``, ``cfg.x_dist`` and
    ``cfg.dof`` to the closed forms."""
    finite = cfg.x_dist in ("gaussian", "uniform", "sphere") or (cfg.x_dist == "student_t" and cfg.dof > 4)
    return finite and cfg.target == "linear"


def config_optimum(cfg: Config) -> tuple[np.ndarray, float] | None:
    """(Gamma*, L*) for a run's distribution (its noise law and law of x included), or None where no
    closed form applies."""
    if not has_closed_form(cfg):
        return None
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    law = (cfg.noise_dist, cfg.x_dist, cfg.dof)
    return gamma_star(sigma, omega, cfg.n, cfg.noise, *law), loss_star(sigma, omega, cfg.n, cfg.noise, *law)


# ---------------------------------------------------------------------------------------
# Monte Carlo: the optimal one-layer Gamma for any task distribution.
# ---------------------------------------------------------------------------------------
class MCEstimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error (same shape)."""

    value: np.ndarray
    stderr: np.ndarray


def context_mean(tasks: Tasks) -> jax.Array:
    """g = (1/n) X^T y per task, [B, d]: the only statistic a one-layer GD-form LSA reads."""
    return jnp.einsum("bnd,bn->bd", tasks.x, tasks.y) / tasks.x.shape[1]


@functools.partial(jax.jit, static_argnames=("spec", "num_chunks", "chunk"))
def _normal_equation_sums(key: jax.Array, dist: Distribution, spec: TaskSpec, num_chunks: int,
                          chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per chunk: sum phi phi^T [d^2, d^2], sum phi y_q [d^2] and sum y_q^2, phi = vec(x_q g^T)."""

    def one(j):
        tasks = sample_tasks(jax.random.fold_in(key, j), dist, spec, chunk)
        phi = (tasks.x_query[:, :, None] * context_mean(tasks)[:, None, :]).reshape(chunk, -1)
        return phi.T @ phi, phi.T @ tasks.y_query, jnp.sum(tasks.y_query**2)

    return jax.lax.map(one, jnp.arange(num_chunks))


def mc_gamma_star(key: jax.Array, dist: Distribution, spec: TaskSpec, num_tasks: int = 2**17,
                  num_batches: int = 16) -> MCEstimate:
    """The loss-minimising one-layer Gamma for any task law, by Monte-Carlo normal equations.

    The predictor is linear in Gamma: yhat = x_q^T Gamma g = <Gamma, x_q g^T>_F, so
    min_Gamma E[(y_q - <Gamma, phi>)^2] with phi = x_q g^T is least squares over vec(Gamma):
    E[vec(phi) vec(phi)^T] vec(Gamma*) = E[vec(phi) y_q]. Sums are accumulated per batch in JAX
    and solved in float64; the standard error is by batch means (the spread of the per-batch
    solutions / sqrt(num_batches)). For Gaussian linear tasks this converges to ``gamma_star``.
    """
    if num_batches < 2 or num_tasks % num_batches:
        raise ValueError(f"num_tasks={num_tasks} must split into num_batches={num_batches} >= 2 equal batches")
    d = spec.d
    a, c, _ = (np.asarray(v, np.float64) for v in _normal_equation_sums(key, dist, spec, num_batches,
                                                                         num_tasks // num_batches))
    pooled = np.linalg.solve(a.sum(0), c.sum(0)).reshape(d, d)
    per_batch = np.stack([np.linalg.solve(ab, cb) for ab, cb in zip(a, c)]).reshape(num_batches, d, d)
    stderr = per_batch.std(0, ddof=1) / np.sqrt(num_batches)
    return MCEstimate(pooled, stderr)


@functools.partial(jax.jit, static_argnames=("predict", "spec", "num_chunks", "chunk"))
def _squared_errors(predict: Callable, args, key: jax.Array, dist: Distribution, spec: TaskSpec,
                    num_chunks: int, chunk: int) -> jax.Array:
    def one(j):
        tasks = sample_tasks(jax.random.fold_in(key, j), dist, spec, chunk)
        return (predict(tasks, *args) - tasks.y_query) ** 2

    return jax.lax.map(one, jnp.arange(num_chunks)).reshape(-1)


def mc_loss(predict: Callable, args: tuple, key: jax.Array, dist: Distribution, spec: TaskSpec,
            num_tasks: int = 2**16, chunk: int = 4096) -> MCEstimate:
    """E[(predict(tasks, *args) - y_q)^2] with its standard error, on tasks drawn from ``key``.

    ``predict`` must be a hashable, module-level function (it is a static jit argument); the
    numbers it depends on travel in ``args`` so new values do not recompile.
    """
    chunk = min(chunk, num_tasks)
    sq = np.asarray(_squared_errors(predict, tuple(args), key, dist, spec, -(-num_tasks // chunk), chunk),
                    np.float64)
    return MCEstimate(np.float64(sq.mean()), np.float64(sq.std(ddof=1) / np.sqrt(sq.size)))


def one_step_predict(tasks: Tasks, gamma: jax.Array) -> jax.Array:
    """yhat = x_q^T Gamma g: one preconditioned GD step from w_0 = 0 (``model.gd_params``, depth 1)."""
    return jnp.einsum("bd,de,be->b", tasks.x_query, gamma, context_mean(tasks))


# ---------------------------------------------------------------------------------------
# Multi-step references: k steps of (preconditioned) GD with tuned step sizes.
# ---------------------------------------------------------------------------------------
def pgd_weights(x: jax.Array, y: jax.Array, gammas: jax.Array) -> jax.Array:
    """w_k of k preconditioned GD steps from w_0 = 0 on (1/2n)||X w - y||^2 (``model.gd_params``):

        w_{l+1} = w_l + (1/n) Gamma_l X^T (y - X w_l),   gammas [k, d, d],   x [B, n, d] -> [B, d].
    """
    n = x.shape[1]
    w = jnp.zeros(x.shape[::2], x.dtype)
    for gamma in gammas:  # k is small and static: unrolled, no scan to compile
        grad = jnp.einsum("bnd,bn->bd", x, y - jnp.einsum("bnd,bd->bn", x, w)) / n
        w = w + grad @ gamma.T
    return w


def pgd_predict(tasks: Tasks, gammas: jax.Array) -> jax.Array:
    """yhat = x_q^T w_k of ``pgd_weights``."""
    return jnp.einsum("bd,bd->b", tasks.x_query, pgd_weights(tasks.x, tasks.y, gammas))


def step_gammas(etas: jax.Array, precond: jax.Array) -> jax.Array:
    """Gamma_l = eta_l P for every step l: [k] x [d, d] -> [k, d, d]."""
    return etas[:, None, None] * precond[None]


def scaled_pgd_predict(tasks: Tasks, etas: jax.Array, precond: jax.Array) -> jax.Array:
    """k steps of GD with step sizes eta_l and a fixed preconditioner P (P = I: plain GD)."""
    return pgd_predict(tasks, step_gammas(etas, precond))


def krylov_features(tasks: Tasks, precond: jax.Array, num: int) -> jax.Array:
    """f_j = x_q^T H^j P g for j < num, with H = P X^T X / n: [B, num].

    k preconditioned GD steps Gamma_l = eta_l P from w_0 = 0 give w_k = q(H) P g with the
    polynomial q(t) = (1 - prod_l (1 - eta_l t)) / t (induction on w_{l+1} = (I - eta_l H) w_l
    + eta_l P g), so yhat = sum_j q_j f_j is linear in these features.
    """
    x, n = tasks.x, tasks.x.shape[1]
    v = context_mean(tasks) @ precond.T
    feats = []
    for _ in range(num):
        feats.append(jnp.einsum("bd,bd->b", tasks.x_query, v))
        v = (jnp.einsum("bnd,bn->bd", x, jnp.einsum("bnd,bd->bn", x, v)) / n) @ precond.T
    return jnp.stack(feats, axis=-1)


def step_polynomial(etas: jax.Array) -> jax.Array:
    """Coefficients q_0..q_{k-1} of q(t) = (1 - prod_l (1 - eta_l t)) / t (see ``krylov_features``)."""
    prod = jnp.ones(1, etas.dtype)
    for l in range(etas.shape[0]):
        prod = jnp.convolve(prod, jnp.stack([jnp.ones_like(etas[l]), -etas[l]]))
    return -prod[1:]


@functools.partial(jax.jit, static_argnames=("spec", "num_tasks", "num"))
def _krylov_moments(key: jax.Array, dist: Distribution, spec: TaskSpec, precond: jax.Array, num_tasks: int,
                    num: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(E f f^T [num, num], E f y_q [num], E y_q^2) of ``krylov_features`` over one fixed sample."""
    tasks = sample_tasks(key, dist, spec, num_tasks)
    f = krylov_features(tasks, precond, num)
    return f.T @ f / num_tasks, f.T @ tasks.y_query / num_tasks, jnp.mean(tasks.y_query**2)


def _polynomial_loss(etas: np.ndarray, gram: np.ndarray, cross: np.ndarray, y2: float) -> tuple[float, np.ndarray]:
    """Sample loss q^T G q - 2 q^T b + E y^2 of the steps ``etas`` and its gradient (float64).

    q = -coef[1:] of p(t) = prod_l (1 - eta_l t) (``step_polynomial``); d p / d eta_l = -t prod_{m != l}.
    """
    def poly(es):
        out = np.ones(1)
        for e in es:
            out = np.convolve(out, [1.0, -e])
        return out

    k = len(etas)
    q = -poly(etas)[1:]
    r = 2 * (gram[:k, :k] @ q - cross[:k])  # d loss / d q
    grad = np.empty(k)
    for l in range(k):
        dp = -np.convolve([0.0, 1.0], poly(np.delete(etas, l)))  # d p / d eta_l, degree k
        grad[l] = r @ (-dp[1:])
    return float(q @ gram[:k, :k] @ q - 2 * q @ cross[:k] + y2), grad


def optimal_step_sizes(key: jax.Array, dist: Distribution, spec: TaskSpec, precond: np.ndarray, k: int,
                       max_steps: int | None = None, num_tasks: int = 2**15) -> np.ndarray:
    """The k step sizes eta_l minimising the MC loss of k steps of GD with preconditioner P.

    Fit on one fixed sample of ``num_tasks`` tasks from ``key`` (evaluate the result on fresh
    tasks, e.g. with ``mc_loss``). The sample enters only through the max_steps x max_steps
    moments of ``krylov_features`` (one compiled program for every k <= max_steps), and the
    polynomial loss is minimised by BFGS in float64. Returns a length-``max_steps`` vector, zero
    beyond k (a zero step is no step). The start is a spread of stable steps around
    1/lambda_max(P Sigma): equal starting steps would stay equal under the symmetric objective.
    """
    from scipy.optimize import minimize  # scipy ships with jax

    max_steps = max_steps or k
    if not 1 <= k <= max_steps:
        raise ValueError(f"need 1 <= k={k} <= max_steps={max_steps}")
    sigma_sqrt = np.asarray(dist.sigma_sqrt, np.float64)
    p = np.asarray(precond, np.float64)
    lam = float(np.max(np.linalg.eigvals(p @ sigma_sqrt @ sigma_sqrt).real))
    gram, cross, y2 = (np.asarray(v, np.float64) for v in
                       _krylov_moments(key, dist, spec, jnp.asarray(p, jnp.float32), num_tasks, max_steps))
    init = np.linspace(1.0, 0.5, k) / lam
    res = minimize(_polynomial_loss, init, args=(gram, cross, float(y2)), jac=True, method="BFGS",
                   options={"gtol": 1e-10, "maxiter": 500})
    out = np.zeros(max_steps)
    out[:k] = np.sort(res.x)[::-1]  # the loss is symmetric in the steps; report them largest first
    return out


def oracle_preconditioner(cfg: Config) -> np.ndarray:
    """Sigma^-1: the preconditioner that whitens the covariates (exact Gamma* shape for Omega = Sigma^-1)."""
    return np.linalg.inv(covariance_matrix(cfg))
