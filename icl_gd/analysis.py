"""Reading what a trained model computes: the effective one-step preconditioner."""

from __future__ import annotations

import numpy as np

from icl_gd.config import Config
from icl_gd.model import Params, masks


def _heads(w: np.ndarray, cfg: Config) -> np.ndarray:
    return w if cfg.heads > 1 else w[None]


def effective_gamma(params: Params, cfg: Config, layer: int = 0) -> np.ndarray:
    """Gamma_eff of one linear-attention layer: sum_h u_{h,y} (B_h)_xx^T.

    With B = W_K^T W_Q and u = W_V^T h, the layer's GD term is
    (1/n) sum_i u_y y_i x_i^T B_xx x_q = (1/n) x_q^T (u_y B_xx^T) X^T y (``icl_gd.model``).
    For depth > 1 this reads layer ``layer`` through the final head h.
    """
    d = cfg.d
    m = masks(cfg)
    lay = {k: np.asarray(v, np.float64) * m["layers"][0][k] for k, v in params["layers"][layer].items()}
    h = np.asarray(params["h"], np.float64) * m["h"]
    wk, wq, wv = (_heads(lay[k], cfg) for k in ("W_K", "W_Q", "W_V"))
    gamma = np.zeros((d, d))
    for hk, hq, hv in zip(wk, wq, wv):
        b = hk.T @ hq
        u = hv.T @ h
        gamma += u[d] * b[:d, :d].T
    return gamma


def effective_eta(params: Params, cfg: Config) -> float:
    """Best scalar fit eta = argmin ||Gamma_eff - eta I||_F = tr(Gamma_eff) / d."""
    return float(np.trace(effective_gamma(params, cfg)) / cfg.d)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||_F / ||b||_F."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
