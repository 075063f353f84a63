"""The best one-layer predictor of rank at most r: what H heads of key size k < d can reach.

Setting and loss (Mahankali et al. 2023, arXiv 2307.03576v2, eq. (4.1); ``optima.loss_of_gamma``): the
one-layer predictor yhat = x_q^T Gamma g, g = (1/n) X^T y, has

    L(Gamma) = tr(Sigma Gamma S Gamma^T) - 2 tr(Sigma Gamma Sigma Omega) + tr(Sigma Omega) + sigma^2,

S = E[g g^T] (``optima.second_moment``), Sigma, Omega, S symmetric positive definite.

Derivation (completing the square). Put A = Sigma^1/2 Gamma S^1/2 and T = Sigma^1/2 Omega Sigma S^-1/2. Then

    tr(Sigma Gamma S Gamma^T) = tr(Sigma^1/2 Gamma S^1/2 S^1/2 Gamma^T Sigma^1/2) = ||A||_F^2,
    tr(Sigma Gamma Sigma Omega) = tr(Sigma^1/2 Gamma S^1/2 . S^-1/2 Sigma Omega Sigma^1/2) = <A, T>_F

(the second factor is T^T), so L(Gamma) = ||A - T||_F^2 + L* with L* = tr(Sigma Omega) + sigma^2 - ||T||_F^2,
the full-rank optimum (A = T gives Gamma* = Omega Sigma S^-1, ``optima.gamma_star``). Sigma^1/2 and S^1/2 are
invertible, so rank A = rank Gamma and the constraint rank Gamma <= r is rank A <= r. By Eckart-Young-Mirsky
(Frobenius norm) the best rank-r A is the truncated SVD [T]_r of T itself (the truncation acts on T, the
whitened target, not on Gamma* or Omega Sigma), hence

    L*(r) = L* + sum_{i>r} s_i(T)^2,    Gamma_r = Sigma^-1/2 [T]_r S^-1/2.

Where s_r(T) = s_{r+1}(T) the optimum is not unique (``nearest_rank_r_optimum``). Isotropic case Sigma = Omega
= I, Gaussian noise: S = (n+d+1+sigma^2)/n I, T = sqrt(n/(n+d+1+sigma^2)) I, so every rank-r orthogonal
projector P gives an optimum Gamma_r = eta* P (eta* = n/(n+d+1+sigma^2), Mahankali et al. Thm. 1) and

    L*(r) = sigma^2 + d - r n/(n+d+1+sigma^2)     (``isotropic_rank_r_loss``).

Why H heads of key size k give rank <= H k (``icl_gd.model``, ``probes.effective_gamma``): a head's GD term is
Gamma_h = u_y B_xx^T + B_yx^T u_x^T with B = W_K^T W_Q, i.e. Gamma_h = W_Q[:, :d]^T (u_y W_K[:, :d] + W_K[:, d]
u_x^T), a product through k rows, so rank Gamma_eff = rank sum_h Gamma_h <= min(d, H k). The ``full`` form's
other terms (h_x^T x_q, x_q^T B_xx^T Sigma_hat u_x, u_y (y^T y / n) x_q^T B_yx^T) are even under (w, eps) ->
(-w, -eps), which leaves X, x_q and the task law unchanged (w ~ N(0, Omega), symmetric noise) and flips y and
y_q, while x_q^T Gamma g - y_q is odd; the cross term of the two parts has mean 0, so a one-layer model's loss
is L(Gamma_eff) + E[even part^2] >= L*(rank Gamma_eff). This needs E w = 0 (--prior_mean breaks it: h_x^T x_q
then predicts x_q^T E w).
"""

from __future__ import annotations

import numpy as np

from icl_gd.theory.optima import loss_of_gamma, loss_star, second_moment


def _sym_power(m: np.ndarray, p: float) -> np.ndarray:
    """M^p of a symmetric positive-definite matrix (eigendecomposition, float64)."""
    lam, u = np.linalg.eigh((m + m.T) / 2)
    if lam.min() <= 0:
        raise ValueError("matrix must be positive definite")
    return (u * lam**p) @ u.T


def whitened_target(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float,
                    noise_dist: str = "gaussian") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, Sigma^-1/2, S^-1/2) with T = Sigma^1/2 Omega Sigma S^-1/2: L(Gamma) = ||Sigma^1/2 Gamma S^1/2 - T||_F^2
    + L* (module docstring, from Mahankali et al. 2023, eq. (4.1))."""
    sigma, omega = np.asarray(sigma, np.float64), np.asarray(omega, np.float64)
    s = second_moment(sigma, omega, n, noise, noise_dist)
    s_isqrt = _sym_power(s, -0.5)
    return _sym_power(sigma, 0.5) @ omega @ sigma @ s_isqrt, _sym_power(sigma, -0.5), s_isqrt


def _check_rank(r: int, d: int) -> None:
    if not 0 <= r <= d:
        raise ValueError(f"rank r={r} must be in 0..d={d}")


def rank_r_optimum(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float, r: int,
                   noise_dist: str = "gaussian") -> tuple[np.ndarray, float]:
    """(Gamma_r, L*(r)): the minimiser of L(Gamma) (Mahankali et al. 2023, eq. (4.1)) over rank Gamma <= r.

    Gamma_r = Sigma^-1/2 [T]_r S^-1/2 with [T]_r the rank-r truncated SVD of T = Sigma^1/2 Omega Sigma S^-1/2,
    L*(r) = L* + sum_{i>r} s_i(T)^2 (Eckart-Young; derivation in the module docstring). r = d gives Gamma* and
    L*; r = 0 the zero predictor, L = tr(Sigma Omega) + sigma^2. Where s_r(T) = s_{r+1}(T) (e.g. the isotropic
    case) this is one of several optima, the one numpy's SVD order picks.
    """
    t, sigma_isqrt, s_isqrt = whitened_target(sigma, omega, n, noise, noise_dist)
    _check_rank(r, len(t))
    u, sv, vt = np.linalg.svd(t)
    gamma = sigma_isqrt @ (u[:, :r] * sv[:r]) @ vt[:r] @ s_isqrt
    return gamma, loss_star(sigma, omega, n, noise, noise_dist) + float(np.sum(sv[r:] ** 2))


def rank_r_losses(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float,
                  noise_dist: str = "gaussian") -> np.ndarray:
    """L*(r) for r = 0..d, [d+1]: L* + sum_{i>r} s_i(T)^2 (``rank_r_optimum``), non-increasing in r."""
    t, _, _ = whitened_target(sigma, omega, n, noise, noise_dist)
    sv2 = np.linalg.svd(t, compute_uv=False) ** 2
    tail = np.concatenate([np.cumsum(sv2[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r} (0-based) = sum_{i>r} 1-based
    return loss_star(sigma, omega, n, noise, noise_dist) + tail


def isotropic_rank_r_loss(n: int, d: int, noise: float, r: int) -> float:
    """L*(r) = sigma^2 + d - r n / (n + d + 1 + sigma^2) for Sigma = Omega = I and noise independent of x:
    T = sqrt(eta*) I with eta* = n/(n+d+1+sigma^2), so each of the d - r dropped directions costs eta*
    (module docstring; r = d is Mahankali et al. 2023, Thm. 1's L*, ``optima.isotropic_loss_star``)."""
    _check_rank(r, d)
    return noise**2 + d - r * n / (n + d + 1 + noise**2)


def nearest_rank_r_optimum(gamma: np.ndarray, sigma: np.ndarray, omega: np.ndarray, n: int, noise: float, r: int,
                           noise_dist: str = "gaussian", rtol: float = 1e-6) -> np.ndarray:
    """The rank-r optimum closest to ``gamma`` in the whitened coordinates A = Sigma^1/2 Gamma S^1/2.

    The optima are the best rank-r approximations of T (module docstring). If s_r(T) > s_{r+1}(T) there is one,
    ``rank_r_optimum``. Otherwise let s_a..s_b (1-based, a <= r < b) be the singular values equal to s_r within
    ``rtol`` s_1, with singular vectors U_t, V_t: the optima are A = sum_{i<a} s_i u_i v_i^T + s_r U_t P V_t^T
    for every orthogonal projector P of rank r - a + 1 (the SVD is unique only up to U_t Q, V_t Q, Q orthogonal),
    and ||A_gamma - A||_F^2 = const - 2 s_r tr(P M), M = U_t^T A_gamma V_t, is smallest for P the projector onto
    the top r - a + 1 eigenvectors of (M + M^T)/2. Isotropic case: eta* P with P the top-r eigenprojector of
    gamma's symmetric part.
    """
    t, sigma_isqrt, s_isqrt = whitened_target(sigma, omega, n, noise, noise_dist)
    d = len(t)
    _check_rank(r, d)
    u, sv, vt = np.linalg.svd(t)
    if r in (0, d) or sv[r - 1] - sv[r] > rtol * sv[0] or sv[r - 1] <= rtol * sv[0]:
        return sigma_isqrt @ (u[:, :r] * sv[:r]) @ vt[:r] @ s_isqrt
    tie = np.flatnonzero(np.abs(sv - sv[r - 1]) <= rtol * sv[0])  # contiguous: sv is sorted
    a, b = int(tie[0]), int(tie[-1]) + 1
    ut, vtie = u[:, a:b], vt[a:b].T
    sigma_sqrt, s_sqrt = np.linalg.inv(sigma_isqrt), np.linalg.inv(s_isqrt)
    m = ut.T @ (sigma_sqrt @ np.asarray(gamma, np.float64) @ s_sqrt) @ vtie
    _, w = np.linalg.eigh((m + m.T) / 2)
    w = w[:, ::-1][:, : r - a]
    opt = (u[:, :a] * sv[:a]) @ vt[:a] + sv[r - 1] * ut @ w @ w.T @ vtie.T
    return sigma_isqrt @ opt @ s_isqrt


def subspace_sine(a: np.ndarray, b: np.ndarray, r: int) -> float:
    """sin of the largest principal angle between the spans of the top-r left singular vectors of a and of b
    (= ||(I - P_b) Q_a||_2 = ||P_a - P_b||_2 for orthogonal projectors of equal rank; Golub & Van Loan, Matrix
    Computations, 4th ed., Sec. 6.4.3 and Thm. 2.5.1). 0: the same subspace; 1: some direction of one is
    orthogonal to the other. Apply to a^T, b^T for the row spaces."""
    qa = np.linalg.svd(np.asarray(a, np.float64))[0][:, :r]
    qb = np.linalg.svd(np.asarray(b, np.float64))[0][:, :r]
    return float(np.linalg.norm(qa - qb @ (qb.T @ qa), 2)) if r else 0.0


def excess_loss(gamma: np.ndarray, sigma: np.ndarray, omega: np.ndarray, n: int, noise: float, r: int,
                noise_dist: str = "gaussian") -> float:
    """L(gamma) - L*(r) (exact, eq. (4.1)): >= 0 for every gamma of rank <= r."""
    return loss_of_gamma(gamma, sigma, omega, n, noise, noise_dist) - rank_r_optimum(sigma, omega, n, noise, r,
                                                                                     noise_dist)[1]
