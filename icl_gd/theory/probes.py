"""Reading what a trained model computes, and measuring its distance to the theory.

Notation of ``icl_gd.model``: B = W_K^T W_Q ((d+1) x (d+1)), u = W_V^T h, blocks _xx (first d
rows/columns), _yx (row d, columns < d), and so on. A one-layer model predicts

    yhat = h_x^T x_q + (1/n) sum_i (u_x^T x_i + u_y y_i)(x_i^T B_xx x_q + y_i B_yx x_q)
         = x_q^T [Gamma g + h_x + B_xx^T Sigma_hat u_x + u_y (y^T y / n) B_yx^T],

with g = X^T y / n, Sigma_hat = X^T X / n and Gamma = u_y B_xx^T + B_yx^T u_x^T (summed over
heads). The rank-one part B_yx^T u_x^T is linear in g too, so it belongs to the GD step: a
single head rarely uses it (u_x and B_yx also feed the non-GD terms), but with several heads one
head can carry it alone. Only Gamma g is GD; ``one_layer_terms`` reports the others. (The
query's y-entry is 0, so B_xy, B_yy and h_y's direct term never reach the prediction.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.config import Config
from icl_gd.data import Tasks
from icl_gd.model import Params, effective_params
from icl_gd.theory.optima import config_optimum, one_step_predict


def _heads(w: np.ndarray, cfg: Config) -> np.ndarray:
    return w if cfg.heads > 1 else w[None]


def layer_blocks(params: Params, cfg: Config, layer: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B [H, d+1, d+1], W_V [H, d+1, d+1], h [d+1]) of one stored layer, as the forward pass uses it
    (``model.effective_params``: parameterisation masks and fixed entries applied)."""
    eff = jax.tree.map(lambda v: np.asarray(v, np.float64), effective_params(params, cfg))
    lay, h = eff["layers"][layer], eff["h"]
    wk, wq, wv = (_heads(lay[k], cfg) for k in ("W_K", "W_Q", "W_V"))
    return np.einsum("hki,hkj->hij", wk, wq), wv, h


def effective_gamma(params: Params, cfg: Config, layer: int = 0) -> np.ndarray:
    """Gamma_eff of one linear-attention layer: sum_h (u_{h,y} (B_h)_xx^T + (B_h)_yx^T u_{h,x}^T).

    With B = W_K^T W_Q and u = W_V^T h, the layer's terms linear in g = X^T y / n are
    (1/n) sum_i [u_y y_i x_i^T B_xx x_q + (u_x^T x_i) y_i B_yx x_q] = x_q^T (u_y B_xx^T + B_yx^T u_x^T) g
    (module docstring; ``icl_gd.model``). For depth > 1 this reads layer ``layer`` through the final head h.
    """
    d = cfg.d
    b, wv, h = layer_blocks(params, cfg, layer)
    u = np.einsum("hrc,r->hc", wv, h)
    return np.einsum("h,hij->ji", u[:, d], b[:, :d, :d]) + np.einsum("hi,hj->ij", b[:, d, :d], u[:, :d])


def effective_eta(params: Params, cfg: Config) -> float:
    """Best scalar fit eta = argmin ||Gamma_eff - eta I||_F = tr(Gamma_eff) / d."""
    return float(np.trace(effective_gamma(params, cfg)) / cfg.d)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||_F / ||b||_F."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def one_layer_terms(params: Params, cfg: Config, layer: int = 0) -> dict[str, float]:
    """Frobenius sizes of the pieces of a one-layer prediction (module docstring) that GD says vanish.

    h_x: a constant linear read of x_q; Bxx_T_ux: B_xx^T u_x (x_q read against Sigma_hat, no y);
    uy_Byx: |u_y| ||B_yx|| (reads y^T y / n); plus, for reference, ux_Byx = ||u_x|| ||B_yx|| (the
    rank-one GD part of Gamma, not an error), the raw blocks u_x, B_yx and ||Gamma||. Summed over
    heads where heads add.
    """
    d = cfg.d
    b, wv, h = layer_blocks(params, cfg, layer)
    u = np.einsum("hrc,r->hc", wv, h)
    bxx_ux = np.einsum("hij,hi->j", b[:, :d, :d], u[:, :d])
    return {
        "gamma": float(np.linalg.norm(effective_gamma(params, cfg, layer))),
        "h_x": float(np.linalg.norm(h[:d])),
        "u_x": float(np.linalg.norm(u[:, :d])),
        "B_yx": float(np.linalg.norm(b[:, d, :d])),
        "Bxx_T_ux": float(np.linalg.norm(bxx_ux)),
        "ux_Byx": float(sum(np.linalg.norm(u[i, :d]) * np.linalg.norm(b[i, d, :d]) for i in range(len(b)))),
        "uy_Byx": float(sum(abs(u[i, d]) * np.linalg.norm(b[i, d, :d]) for i in range(len(b)))),
    }


def layer_preconditioners(params: Params, cfg: Config) -> tuple[np.ndarray, float]:
    """(Gamma_l for every layer [L, d, d], output scale c) of a sparse linear model: exactly
    yhat = c x_q^T w_L with w_{l+1} = w_l + (1/n) Gamma_l X^T (y - X w_l), w_0 = 0.

    Derivation: with B_l = [[A_l, 0], [0, 0]], W_V = p_l e e^T and h = h_y e (e = e_{d+1}), layer l
    changes only y-entries: r_j <- r_j + (p_l / n) sum_i r_i x_i^T A_l x_j for every row j. GD on
    the residuals r_j = y_j - x_j^T w_l moves them by -(1/n) sum_i r_i x_j^T Gamma_l x_i, and the
    query entry (starting at 0 = -x_q^T w_0) tracks -x_q^T w_l, so Gamma_l = -sum_heads p_l A_l^T
    and yhat = h_y (-x_q^T w_L): c = -h_y (Ahn et al. 2023, Lemma 1; ``model.gd_params`` has c = 1).
    Full models are read through the same blocks; ``off_sparse_norms`` says how much that leaves out.
    """
    d = cfg.d
    stored = [layer_blocks(params, cfg, i) for i in range(len(params["layers"]))]
    stored = stored * cfg.depth if cfg.tie_weights else stored
    gammas = np.stack([-np.einsum("h,hij->ji", wv[:, d, d], b[:, :d, :d]) for b, wv, _ in stored])
    return gammas, float(-stored[0][2][d])


def off_sparse_norms(params: Params, cfg: Config) -> list[dict[str, float]]:
    """Per stored layer: Frobenius norms of the weights outside the sparse (GD) form: B outside
    B_xx, W_V outside its (y, y) entry, and h_x (zero by construction for sparse models)."""
    d = cfg.d
    out = []
    for i in range(len(params["layers"])):
        b, wv, h = layer_blocks(params, cfg, i)
        b_off, wv_off = b.copy(), wv.copy()
        b_off[:, :d, :d] = 0.0
        wv_off[:, d, d] = 0.0
        out.append({"B_off": float(np.linalg.norm(b_off)), "W_V_off": float(np.linalg.norm(wv_off)),
                    "h_x": float(np.linalg.norm(h[:d]))})
    return out


def scalar_fit(gamma: np.ndarray) -> tuple[float, float]:
    """(eta, residual): eta = tr(Gamma)/d minimises ||Gamma - eta I||_F; residual ||Gamma - eta I|| / ||Gamma||."""
    eta = float(np.trace(gamma) / gamma.shape[0])
    return eta, float(np.linalg.norm(gamma - eta * np.eye(gamma.shape[0])) / np.linalg.norm(gamma))


def shape_fit(gamma: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(c, residual): c = <Gamma, R>_F / ||R||^2 minimises ||Gamma - c R||_F; residual relative to ||Gamma||."""
    c = float(np.sum(gamma * ref) / np.sum(ref * ref))
    return c, float(np.linalg.norm(gamma - c * ref) / np.linalg.norm(gamma))


def sym_sqrt(m: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh((m + m.T) / 2)
    return (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T


def ahn_distance(gamma: np.ndarray, sigma: np.ndarray) -> float:
    """dist(M, I) = || M / ||M||_F - I / ||I||_F ||_F with M = Sigma^1/2 Gamma Sigma^1/2.

    The scale-free distance of Ahn et al. 2023 (Sec. 3 experiments): 0 iff Gamma ∝ Sigma^-1,
    i.e. the layer is GD preconditioned by the inverse covariance; at most 2.
    """
    s = sym_sqrt(sigma)
    m = s @ gamma @ s
    eye = np.eye(len(m))
    return float(np.linalg.norm(m / np.linalg.norm(m) - eye / np.linalg.norm(eye)))


def sensitivities(predict: Callable, args: tuple, tasks: Tasks) -> jax.Array:
    """d yhat / d x_q per task, [B, d] (tasks are independent, so the gradient of the sum is per task)."""

    def total(xq):
        return jnp.sum(predict(tasks._replace(x_query=xq), *args))

    return jax.grad(total)(tasks.x_query)


_jit_sensitivities = jax.jit(sensitivities, static_argnums=0)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cos(a_i, b_i)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def sensitivity_cosines(predict: Callable, args: tuple, references: dict[str, tuple[Callable, tuple]],
                        tasks: Tasks) -> dict[str, dict[str, float]]:
    """Mean and 5th percentile over tasks of cos(d yhat_model / d x_q, d yhat_ref / d x_q) per reference.

    A model that implements the reference predictor has cosine 1 on every task; the sensitivity
    (the model's implied weight vector w_hat(X, y)) is compared, not just the loss.
    """
    ours = np.asarray(_jit_sensitivities(predict, args, tasks))
    out = {}
    for name, (fn, fargs) in references.items():
        theirs = np.asarray(_jit_sensitivities(fn, fargs, tasks))
        cos = cosine_similarity(ours, theirs)
        out[name] = {"mean": float(cos.mean()), "p05": float(np.quantile(cos, 0.05))}
    return out


def gd_part_fraction(params: Params, cfg: Config, tasks: Tasks, predict: Callable, args: tuple) -> float:
    """RMS(yhat_model - x_q^T Gamma_eff g) / RMS(yhat_model) on ``tasks``: the share of a one-layer
    model's output that is NOT its GD term (0 for an exact GD layer)."""
    gamma = jnp.asarray(effective_gamma(params, cfg), jnp.float32)
    model = np.asarray(predict(tasks, *args), np.float64)
    gd = np.asarray(one_step_predict(tasks, gamma), np.float64)
    return float(np.sqrt(np.mean((model - gd) ** 2) / np.mean(model**2)))


def to_list(a: Any) -> Any:
    """JSON-friendly nested lists of floats."""
    return np.asarray(a, np.float64).tolist()


def one_step_summary(cfg: Config, params: Params) -> dict:
    """Learned vs theoretical one-step numbers for a 1-layer linear model (empty otherwise)."""
    out: dict[str, Any] = {}
    if cfg.depth != 1 or cfg.attention != "linear":
        return out
    gamma = effective_gamma(params, cfg)
    out["eta_learned"] = float(np.trace(gamma) / cfg.d)
    optimum = config_optimum(cfg)
    if optimum is not None:
        g_star, _ = optimum
        out["eta_star"] = float(np.trace(g_star) / cfg.d)
        out["gamma_rel_error"] = relative_error(gamma, g_star)
    return out


def general_form_layers(params: Params, cfg: Config, sigma: np.ndarray) -> dict[str, list[float]]:
    """Per layer of a block (or full) model, read as Ahn et al.'s general form (2023, Sec. 6):
    Q_l's x block A_l (through Gamma_l = -A_l^T, ``layer_preconditioners``) against a_l Sigma^-1,
    and W_V's x block B_l against b_l I.

    a_l = -shape_fit(Gamma_l, Sigma^-1)'s scale, ``a_distance`` = ahn_distance(Gamma_l, Sigma), b_l =
    tr(B_l)/d and ``b_residual`` = ||B_l - b_l I|| / ||B_l|| (``scalar_fit``). B_L of the last layer
    never reaches the prediction, so its numbers describe weights the loss does not train.
    """
    d = cfg.d
    gammas, _ = layer_preconditioners(params, cfg)
    precond = np.linalg.inv(sigma)
    stored = [layer_blocks(params, cfg, i)[1] for i in range(len(params["layers"]))]
    stored = stored * cfg.depth if cfg.tie_weights else stored
    b_mats = [wv.sum(0)[:d, :d] for wv in stored]
    b_fits = [scalar_fit(b) if np.linalg.norm(b) > 0 else (0.0, 0.0) for b in b_mats]
    return {"a": [-shape_fit(g, precond)[0] for g in gammas],
            "a_distance": [ahn_distance(g, sigma) for g in gammas],
            "b": [fit[0] for fit in b_fits], "b_residual": [fit[1] for fit in b_fits],
            "A": [to_list(-g.T) for g in gammas], "B": [to_list(b) for b in b_mats]}
