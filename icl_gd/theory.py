"""Closed forms for the one-layer (one-step) predictor yhat = (1/n) x_q^T Gamma X^T y.

Setting: x ~ N(0, Sigma), w ~ N(0, Omega), y = x^T w + eps, eps ~ N(0, sigma^2) on every pair.
Write g = (1/n) X^T y. Everything below is exact (float64 NumPy), no Monte Carlo.
"""

from __future__ import annotations

import numpy as np

from icl_gd.config import Config
from icl_gd.data import covariance_matrix, prior_covariance


def second_moment(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float) -> np.ndarray:
    """S = E[g g^T] for g = (1/n) X^T y.

    With X^T X = sum_i x_i x_i^T and Isserlis' theorem E[x x^T A x x^T] = 2 Sigma A Sigma +
    tr(A Sigma) Sigma, E[X^T X Omega X^T X] = n(n+1) Sigma Omega Sigma + n tr(Omega Sigma) Sigma,
    and the noise adds (sigma^2 / n) Sigma:

        S = (n+1)/n Sigma Omega Sigma + (tr(Omega Sigma) + sigma^2)/n Sigma.
    """
    tr = float(np.trace(omega @ sigma))
    return (n + 1) / n * sigma @ omega @ sigma + (tr + noise**2) / n * sigma


def loss_of_gamma(gamma: np.ndarray, sigma: np.ndarray, omega: np.ndarray, n: int, noise: float) -> float:
    """Exact E[(yhat - y_q)^2] of yhat = x_q^T Gamma g, for ANY Gamma:

        L(Gamma) = tr(Sigma Gamma S Gamma^T) - 2 tr(Sigma Gamma Sigma Omega) + tr(Sigma Omega) + sigma^2,

    using E[g w^T] = Sigma Omega and x_q independent of (g, w) (Mahankali et al. 2023, eq. (4.1)).
    """
    s = second_moment(sigma, omega, n, noise)
    return float(np.trace(sigma @ gamma @ s @ gamma.T) - 2 * np.trace(sigma @ gamma @ sigma @ omega)
                 + np.trace(sigma @ omega) + noise**2)


def gamma_star(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float) -> np.ndarray:
    """The minimiser of ``loss_of_gamma``: Sigma Gamma S = Sigma Omega Sigma => Gamma* = Omega Sigma S^-1."""
    s = second_moment(sigma, omega, n, noise)
    return np.linalg.solve(s.T, (omega @ sigma).T).T


def loss_star(sigma: np.ndarray, omega: np.ndarray, n: int, noise: float) -> float:
    """L* = L(Gamma*), the best loss of any one-layer LSA (Mahankali et al. 2023, Thm. 1-2)."""
    return loss_of_gamma(gamma_star(sigma, omega, n, noise), sigma, omega, n, noise)


def eta_star(n: int, d: int, noise: float) -> float:
    """Optimal GD step for Sigma = Omega = I: eta* = n / (n + d + 1 + sigma^2) (Mahankali et al., Thm. 1)."""
    return n / (n + d + 1 + noise**2)


def isotropic_loss_star(n: int, d: int, noise: float) -> float:
    """L* = sigma^2 + d (d + 1 + sigma^2) / (n + d + 1 + sigma^2) for Sigma = Omega = I."""
    return noise**2 + d * (d + 1 + noise**2) / (n + d + 1 + noise**2)


def ahn_preconditioner(sigma: np.ndarray, n: int) -> np.ndarray:
    """Ahn et al. 2023, Thm. 1 (Omega = I, noise 0): Gamma* = ((n+1)/n Sigma + tr(Sigma)/n I)^-1."""
    d = sigma.shape[0]
    return np.linalg.inv((n + 1) / n * sigma + np.trace(sigma) / n * np.eye(d))


def has_closed_form(cfg: Config) -> bool:
    """The closed forms hold for Gaussian x and linear targets (any Sigma, either prior, any noise)."""
    return cfg.x_dist == "gaussian" and cfg.target == "linear"


def config_optimum(cfg: Config) -> tuple[np.ndarray, float] | None:
    """(Gamma*, L*) for a run's distribution, or None where no closed form applies."""
    if not has_closed_form(cfg):
        return None
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    return gamma_star(sigma, omega, cfg.n, cfg.noise), loss_star(sigma, omega, cfg.n, cfg.noise)
