"""Beyond the negation symmetry: the best one-layer predictor over every feature a ``full`` LSA reads.

Mahankali et al. 2023 (arXiv 2307.03576v2, Thm. 1-2) prove one GD step optimal among one-layer LSAs for
task laws symmetric under w -> -w. With a prior mean, w ~ N(mu, Omega_0) (``--prior_mean``), that
symmetry is gone. This module says what a one-layer model can then do better.

The features. With the conventions of ``icl_gd.model`` (tokens as rows z_i = [x_i, y_i], query
[x_q, 0] never a key, the 1/n factor, readout h), one layer predicts

    yhat = h^T z_q + (1/n) sum_heads sum_i (u^T z_i)(z_i^T B z_q) = x_q^T a + sum_{j,k,l} T_jkl C_jk x_{q,l},

with C = (1/n) sum_i z_i z_i^T ((d+1) x (d+1)), a = h_x (the readout reads the query's x directly),
u = W_V^T h, B = W_K^T W_Q and T_jkl = sum_heads u_j B_kl (l < d: the query's y entry is 0; this is
``model._gram_readout``'s ``coef``). The prediction is therefore LINEAR in the d + (d+1)^2 d features
x_q and C_jk x_{q,l}; C is symmetric, so only the (d+1)(d+2)/2 pairs j <= k matter (``feature_pairs``)
and the reduced coefficient of pair j < k is T_jkl + T_kjl. Grouped by block of C (Sigma_hat =
X^T X / n, g = X^T y / n, C_yy = y^T y / n):

    yhat = x_q^T [a + Gamma g + K(Sigma_hat) + b C_yy],   Gamma_lj = T_jdl + T_djl,
    K(Sigma_hat)_l = sum_{j,k<d} T_jkl Sigma_hat_jk,   b_l = T_ddl           (``split_coefficients``).

Only Gamma g is GD (the ``sparse`` form, Ahn et al. 2023, arXiv 2306.00297v2, eq. (2), has a, K, b = 0);
``probes`` reads the same blocks from trained weights.

The optimum (exact, derived here). For a linear target, w = mu + w' with w' ~ N(0, Omega_0) and noise
symmetric given x (every ``NOISE_DISTS`` law):

1. Centred prior (mu = 0): the law is invariant under (y, y_q, w) -> (-y, -y_q, -w). Then g and y_q change
   sign while x_q, Sigma_hat and C_yy do not, so the features x_q^T a, x_q^T K(Sigma_hat), x_q^T b C_yy are
   orthogonal to y_q and to x_q^T Gamma g: the span optimum has a, K, b = 0 and is one GD step,
   Gamma*(Omega_0) with loss L*(Omega_0) (``optima.gamma_star``; Mahankali et al.'s argument, Thm. 1-2,
   extended from Gamma to every feature of the full model).
2. Any mu: shifting the task by mu maps z_i -> A z_i, A = [[I, 0], [mu^T, 1]], so C -> A C A^T is an
   invertible linear map of the features onto themselves, and y_q -> y_q + x_q^T mu adds a feature. The
   span and its best loss are therefore the same at every mu, and the optimum is the centred one shifted:
   GD from the start w_0 = mu, yhat = x_q^T (mu + Gamma*(Omega_0) (g - Sigma_hat mu)), loss L*(Omega_0)
   whatever c = |mu| (``start_optimum``, ``start_coefficients``). The best GD step from 0 (the ``sparse``
   form) has L*(Omega_0 + mu mu^T) > L*(Omega_0): the full model's gain.
3. One head reaches it exactly (``start_head``: h_x = mu, u = [-mu, 1], B[:, :d] = [Gamma^T; 0]), so no
   multi-head model does better, and the full model's extra coefficients a = mu, K = -Gamma Sigma_hat mu
   carry the prior mean (``implied_start`` reads the start back from K).

``mc_full_optimum`` solves the Monte-Carlo normal equations over all the features (the style of
``optima.mc_gamma_star``) for any law ``data.sample_tasks`` draws: the check of 1-3, and the optimum where no
closed form exists. ``loss_from_start`` is the exact loss of GD from any start.

Why a quadratic target c (w^T x)^2 (with centred w) cannot be used the same way: the joint law of
(X, x_q, w, y) is invariant under (X, x_q, w) -> (-X, -x_q, -w) (y_i = w^T x_i + c (w^T x_i)^2 + eps_i
is unchanged; x symmetric, w centred Gaussian). Under it x_q^T Gamma g is invariant (g -> -g, x_q -> -x_q)
while x_q^T a, x_q^T K(Sigma_hat) and x_q^T b C_yy change sign and y_q does not: the odd features are
orthogonal to y_q and to the even ones, so the span optimum has a, K, b = 0 and is one GD step again
(tests/test_symmetry.py checks this by Monte Carlo). A prior mean breaks exactly this parity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.config import Config
from icl_gd.data import (
    Distribution,
    Tasks,
    TaskSpec,
    prior_covariance,
    prior_mean,
    sample_tasks,
)
from icl_gd.model import Params
from icl_gd.theory.optima import config_optimum, context_mean, gamma_star, loss_of_gamma, loss_star
from icl_gd.theory.probes import layer_blocks


# ---------------------------------------------------------------------------------------
# The features and their coefficients.
# ---------------------------------------------------------------------------------------
def feature_pairs(d: int) -> tuple[tuple[int, int], ...]:
    """The (j, k), j <= k < d+1, of the distinct entries of the symmetric C, row by row."""
    return tuple((j, k) for j in range(d + 1) for k in range(j, d + 1))


def num_features(d: int) -> int:
    """d (x_q itself) + (d+1)(d+2)/2 pairs times d query coordinates."""
    return d + len(feature_pairs(d)) * d


def full_features(tasks: Tasks) -> jax.Array:
    """phi [B, num_features(d)] = [x_q, (C_jk x_{q,l}) for (j, k) in ``feature_pairs``, l < d], C = Z^T Z / n."""
    x, y, xq = tasks.x, tasks.y, tasks.x_query
    d, n = x.shape[-1], x.shape[1]
    cols = [x[..., i] for i in range(d)] + [y]  # d+1 x [B, n]
    c = jnp.stack([jnp.sum(cols[j] * cols[k], axis=1) / n for j, k in feature_pairs(d)], axis=1)  # [B, P]
    return jnp.concatenate([xq, (c[:, :, None] * xq[:, None, :]).reshape(xq.shape[0], -1)], axis=1)


def full_feature_predict(tasks: Tasks, theta: jax.Array) -> jax.Array:
    """yhat = phi(tasks) . theta (``full_features``)."""
    return full_features(tasks) @ theta


def reduce_tensor(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """theta [num_features] of yhat = x_q^T a + sum_jkl T_jkl C_jk x_{q,l}: pair j < k gets T_jk. + T_kj."""
    t = np.asarray(t, np.float64)
    rows = [t[j, k] + (t[k, j] if j != k else 0.0) for j, k in feature_pairs(len(a))]
    return np.concatenate([np.asarray(a, np.float64), np.concatenate(rows)])


def split_coefficients(theta: np.ndarray, d: int) -> dict[str, np.ndarray]:
    """The blocks of yhat = x_q^T [a + Gamma g + K(Sigma_hat) + b C_yy] (module docstring).

    a [d]; gamma [d, d] (Gamma_lj: pair (j, d)); k_xx [d, d, d], symmetric in its first two indices
    (K(Sigma_hat)_l = sum_jk k_xx[j, k, l] Sigma_hat_jk; pair j < k carries 2 k_xx[j, k]); b [d] (pair (d, d)).
    """
    theta = np.asarray(theta, np.float64)
    rows = dict(zip(feature_pairs(d), theta[d:].reshape(-1, d)))
    k_xx = np.zeros((d, d, d))
    for j in range(d):
        for k in range(j, d):
            k_xx[j, k] = k_xx[k, j] = rows[j, k] / (1.0 if j == k else 2.0)
    return {"a": theta[:d], "gamma": np.stack([rows[j, d] for j in range(d)], axis=1), "k_xx": k_xx,
            "b": rows[d, d]}


def extra_coefficients(theta: np.ndarray, d: int) -> np.ndarray:
    """theta with its GD block (the pairs (j, d), j < d) zeroed: the coefficients GD says vanish."""
    out = np.array(theta, np.float64)
    for p, (j, k) in enumerate(feature_pairs(d)):
        if k == d and j < d:
            out[d + p * d: d + (p + 1) * d] = 0.0
    return out


def start_coefficients(w0: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """theta of GD from w_0: yhat = x_q^T (w_0 + Gamma (g - Sigma_hat w_0)), i.e. a = w_0, Gamma, and
    K(Sigma_hat)_l = -sum_jk Gamma_lj Sigma_hat_jk w0_k (T_jkl = -Gamma_lj w0_k), b = 0."""
    w0, gamma = np.asarray(w0, np.float64), np.asarray(gamma, np.float64)
    d = len(w0)
    t = np.zeros((d + 1, d + 1, d))
    t[:d, :d] = -np.einsum("lj,k->jkl", gamma, w0)
    t[:d, d] = gamma.T  # T_jdl = Gamma_lj (u_x = e_j-part of the C_xy term)
    return reduce_tensor(w0, t)


def start_head(w0: np.ndarray, gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One head (a, u, M) computing GD from w_0 exactly: a = h_x = w_0, u = [-w_0, 1], M = B[:, :d] = [Gamma^T; 0].

    Then T = u (x) M gives T_djl = Gamma_lj (the step) and T_jkl = -w0_j Gamma_lk for j, k < d, whose
    symmetrised sum is -(Gamma Sigma_hat w_0)_l: ``start_coefficients``."""
    w0, gamma = np.asarray(w0, np.float64), np.asarray(gamma, np.float64)
    d = len(w0)
    m = np.zeros((d + 1, d))
    m[:d] = gamma.T
    return w0.copy(), np.concatenate([-w0, [1.0]]), m


def relative_output_distance(theta: np.ndarray, ref: np.ndarray, gram: np.ndarray) -> float:
    """RMS(phi . theta - phi . ref) / RMS(phi . ref) over tasks with E[phi phi^T] = ``gram``: the distance of two
    predictors in the feature span measured on their outputs, sqrt((theta - ref)^T G (theta - ref) / ref^T G ref)
    (E[(phi . v)^2] = v^T G v). Scale-free like ||Gamma - Gamma*|| / ||Gamma*||, but weighting each coefficient by
    its feature's size (C_yy x_q is larger than Sigma_hat_jk x_q); with theta* optimal, (theta - theta*)^T G
    (theta - theta*) is exactly theta's excess loss over theta*'s (least squares)."""
    diff = np.asarray(theta, np.float64) - np.asarray(ref, np.float64)
    return float(np.sqrt(diff @ gram @ diff / (ref @ gram @ ref)))


def implied_start(theta: np.ndarray, d: int) -> tuple[np.ndarray, float]:
    """(w_0, residual): the start whose GD term -Gamma Sigma_hat w_0 best matches theta's Sigma_hat block K.

    With Gamma from theta's own GD block, GD from w_0 has K_sym[j, k, l] = -(Gamma_lj w0_k + Gamma_lk w0_j) / 2
    (``start_coefficients``, symmetrised): linear in w_0, solved by least squares over the d^3 entries.
    residual = ||K - K(w_0)|| / ||K|| (0 when the Sigma_hat block is exactly a GD start; NaN when K = 0).
    """
    blocks = split_coefficients(theta, d)
    gamma, k_xx = blocks["gamma"], blocks["k_xx"]
    eye = np.eye(d)
    # design[j, k, l, m] = d K_sym[j, k, l] / d w0_m
    design = -(np.einsum("lj,km->jklm", gamma, eye) + np.einsum("lk,jm->jklm", gamma, eye)) / 2
    w0 = np.linalg.lstsq(design.reshape(-1, d), k_xx.ravel(), rcond=None)[0]
    norm = np.linalg.norm(k_xx)
    res = np.linalg.norm(design.reshape(-1, d) @ w0 - k_xx.ravel()) / norm if norm > 0 else float("nan")
    return w0, float(res)


def model_coefficients(params: Params, cfg: Config) -> np.ndarray:
    """theta of a trained one-layer linear-attention model (heads summed): a = h_x, T_jkl = sum_h u_hj B_hkl
    with u_h = W_V,h^T h and B_h = W_K,h^T W_Q,h, as the forward pass uses them (``probes.layer_blocks``)."""
    if cfg.depth != 1 or cfg.attention != "linear":
        raise ValueError("model_coefficients reads one linear-attention layer")
    b, wv, h = layer_blocks(params, cfg)
    u = np.einsum("hrc,r->hc", wv, h)
    return reduce_tensor(h[:cfg.d], np.einsum("hj,hkl->jkl", u, b[:, :, :cfg.d]))


# ---------------------------------------------------------------------------------------
# Monte Carlo: the best predictor in the span of the features.
# ---------------------------------------------------------------------------------------
class FullOptimum(NamedTuple):
    """The span optimum: theta (and its batch-means standard error), its in-sample MC loss with a
    batch-means standard error, and the pooled moments (E phi phi^T, E phi y_q, E y_q^2) it solved."""

    theta: np.ndarray
    theta_stderr: np.ndarray
    loss: float
    loss_stderr: float
    gram: np.ndarray
    cross: np.ndarray
    y2: float


@functools.partial(jax.jit, static_argnames=("sampler", "spec", "num_chunks", "chunk"))
def _feature_sums(sampler: Callable, key: jax.Array, dist: Distribution, spec: TaskSpec, num_chunks: int,
                  chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per chunk: sum phi phi^T, sum phi y_q and sum y_q^2 over ``chunk`` tasks of ``sampler``."""

    def one(j):
        tasks = sampler(jax.random.fold_in(key, j), dist, spec, chunk)
        phi = full_features(tasks)
        return phi.T @ phi, phi.T @ tasks.y_query, jnp.sum(tasks.y_query**2)

    return jax.lax.map(one, jnp.arange(num_chunks))


def _quadratic_loss(theta: np.ndarray, gram: np.ndarray, cross: np.ndarray, y2: float) -> float:
    """E[(phi . theta - y_q)^2] = theta^T E[phi phi^T] theta - 2 theta^T E[phi y_q] + E[y_q^2]."""
    return float(theta @ gram @ theta - 2 * theta @ cross + y2)


def mc_full_optimum(key: jax.Array, dist: Distribution, spec: TaskSpec, num_tasks: int = 2**17,
                    num_batches: int = 16, sampler: Callable = sample_tasks) -> FullOptimum:
    """argmin_theta E[(phi . theta - y_q)^2] over ``full_features`` by Monte-Carlo normal equations.

    Least squares: E[phi phi^T] theta* = E[phi y_q] (the predictor is linear in theta). Sums are accumulated
    per batch in JAX (float32) and solved in float64; standard errors by batch means (the spread of the
    per-batch solutions, and of the pooled theta's per-batch losses, / sqrt(num_batches)), as in
    ``optima.mc_gamma_star``. ``sampler(key, dist, spec, batch) -> Tasks`` must be a module-level function
    (a static jit argument). The loss is in-sample (optimistic by about num_features / num_tasks of itself);
    score theta on fresh tasks (``full_feature_predict``) for an unbiased loss.
    """
    if num_batches < 2 or num_tasks % num_batches:
        raise ValueError(f"num_tasks={num_tasks} must split into num_batches={num_batches} >= 2 equal batches")
    chunk = num_tasks // num_batches
    a, c, y2 = (np.asarray(v, np.float64) for v in _feature_sums(sampler, key, dist, spec, num_batches, chunk))
    gram, cross, yy = a.sum(0) / num_tasks, c.sum(0) / num_tasks, float(y2.sum() / num_tasks)
    theta = np.linalg.solve(gram, cross)
    per_batch = np.stack([np.linalg.solve(ab, cb) for ab, cb in zip(a, c)])
    losses = np.array([_quadratic_loss(theta, ab / chunk, cb / chunk, yb / chunk) for ab, cb, yb in zip(a, c, y2)])
    sqrt_b = np.sqrt(num_batches)
    return FullOptimum(theta, per_batch.std(0, ddof=1) / sqrt_b, _quadratic_loss(theta, gram, cross, yy),
                       float(losses.std(ddof=1) / sqrt_b), gram, cross, yy)


# ---------------------------------------------------------------------------------------
# Closed form: one GD step from a fixed start w_0.
# ---------------------------------------------------------------------------------------
def start_predict(tasks: Tasks, w0: jax.Array, gamma: jax.Array) -> jax.Array:
    """yhat = x_q^T (w_0 + Gamma (g - Sigma_hat w_0)): one preconditioned GD step on (1/2n)||Xw - y||^2 from w_0."""
    n = tasks.x.shape[1]
    sigma_hat_w0 = jnp.einsum("bnd,bn->bd", tasks.x, tasks.x @ w0) / n
    w1 = w0 + (context_mean(tasks) - sigma_hat_w0) @ gamma.T
    return jnp.einsum("bd,bd->b", tasks.x_query, w1)


def loss_from_start(w0: np.ndarray, gamma: np.ndarray, sigma: np.ndarray, omega0: np.ndarray, mu: np.ndarray,
                    n: int, noise: float, noise_dist: str = "gaussian", **law: Any) -> float:
    """Exact loss of ``start_predict`` for w ~ N(mu, Omega_0), y = x^T w + eps (any law of x and noise
    ``optima.loss_of_gamma`` covers; ``law`` is passed on to it):

        L(w_0, Gamma) = L(Gamma; Omega_0 + delta delta^T),   delta = mu - w_0,

    with L(Gamma; Omega) the loss of one step from 0 (``optima.loss_of_gamma``, Mahankali et al. 2023,
    eq. (4.1)). Derivation: with w' = w - w_0 and y'_i = y_i - x_i^T w_0 = x_i^T w' + eps_i, g - Sigma_hat w_0 =
    X^T y' / n, so the predictor is w_0 + one step from 0 on the task (X, y') and yhat - y_q = x_q^T (w_1' - w')
    - eps_q with w_1' = Gamma X^T y' / n: one step from 0 on tasks with weights w' ~ N(delta, Omega_0). Its
    loss is quadratic in (w', eps) with x independent of w' and E[eps | X, w] = 0, so only E[w' w'^T] =
    Omega_0 + delta delta^T enters (the cross terms between w' and eps vanish whatever E[w'] is).
    """
    delta = np.asarray(mu, np.float64) - np.asarray(w0, np.float64)
    return loss_of_gamma(gamma, sigma, omega0 + np.outer(delta, delta), n, noise, noise_dist, **law)


def start_optimum(sigma: np.ndarray, omega0: np.ndarray, mu: np.ndarray, n: int, noise: float,
                  noise_dist: str = "gaussian", **law: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(w_0*, Gamma*, L) = (mu, Gamma*(Omega_0), L*(Omega_0)): the best GD step from a fixed start.

    From ``loss_from_start``: L(Gamma; Omega) is affine in Omega (``optima.loss_of_gamma``: S is affine in
    Omega), so L(w_0, Gamma) = L(Gamma; Omega_0) + E[delta^T (I - Gamma Sigma_hat)^T Sigma (I - Gamma Sigma_hat)
    delta] >= L(Gamma; Omega_0) >= L*(Omega_0), with equality at delta = 0 and Gamma = Gamma*(Omega_0)
    (``optima.gamma_star``). The start removes the mean entirely: the loss is that of the centred prior, and
    (module docstring, 2) no predictor in the span of the full model's features does better.
    """
    return (np.asarray(mu, np.float64).copy(), gamma_star(sigma, omega0, n, noise, noise_dist, **law),
            loss_star(sigma, omega0, n, noise, noise_dist, **law))


def centred_prior(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(Omega_0 = Cov(w), mu = E[w]) of a config: ``data.prior_covariance`` is the second moment Omega_0 + mu mu^T."""
    mu = prior_mean(cfg)
    return prior_covariance(cfg) - np.outer(mu, mu), mu


def config_start_optimum(cfg: Config) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``start_optimum`` of a run's distribution: (mu, Gamma*, L*) of the same config with the prior centred
    (``optima.config_optimum`` at --prior_mean=0, whose second moment is Omega_0), or None where no closed form
    applies."""
    optimum = config_optimum(dataclasses.replace(cfg, prior_mean=0.0))
    if optimum is None:
        return None
    return prior_mean(cfg), optimum[0], optimum[1]
