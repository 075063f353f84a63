"""Ahn et al.'s general form (``--parameterization=block``) against a direct transcription of their
equation, and the (a, b) theory against the forward pass and the one-layer closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import model, theory
from icl_gd.config import Config
from icl_gd.data import TaskSpec, covariance_matrix, distribution, sample_tasks
from icl_gd.model import gd_params, init_params
from icl_gd.theory import general_form, probes
from icl_gd.theory.probes import sym_sqrt

apply = jax.jit(model.apply, static_argnames="cfg")


def _tasks(cfg: Config, batch: int, seed: int = 0):
    return sample_tasks(jax.random.PRNGKey(seed), distribution(cfg), TaskSpec.from_config(cfg), batch)


def _ahn_transcription(a_mats, b_mats, x, y, xq):
    """Ahn et al. 2023, eq. (2) with Sec. 6's P_l, Q_l, literally: Z is (d+1) x (n+1) with tokens as
    columns, Z <- Z + (1/n) P_l Z M (Z^T Q_l Z), M = diag(1, ..., 1, 0), prediction -Z[d+1, n+1]."""
    batch, n, d = x.shape
    out = np.empty(batch)
    mask = np.diag(np.r_[np.ones(n), 0.0])
    for t in range(batch):
        z = np.zeros((d + 1, n + 1))
        z[:d, :n], z[d, :n], z[:d, n] = x[t].T, y[t], xq[t]
        for a, b in zip(a_mats, b_mats):
            p = np.zeros((d + 1, d + 1))
            p[:d, :d], p[d, d] = b, 1.0
            q = np.zeros((d + 1, d + 1))
            q[:d, :d] = a
            z = z + p @ z @ mask @ (z.T @ q @ z) / n
        out[t] = -z[d, n]
    return out


@pytest.mark.parametrize("depth", [1, 3])
def test_block_forward_is_ahn_equation(depth):
    cfg = Config(d=3, n=7, depth=depth, parameterization="block", init_scale=0.4)
    params = init_params(jax.random.PRNGKey(depth), cfg)
    # junk in every entry the form fixes: the forward pass must ignore it
    params = jax.tree.map(lambda p: p + 0.3 * jnp.ones_like(p), params)
    eff = model.effective_params(params, cfg)
    a_mats = [np.asarray(lay["W_K"], np.float64).T @ np.asarray(lay["W_Q"], np.float64) for lay in eff["layers"]]
    b_mats = [np.asarray(lay["W_V"], np.float64)[:3, :3] for lay in eff["layers"]]
    for lay in eff["layers"]:  # the block structure itself: Q_l = [[A_l, 0], [0, 0]], P_l = [[B_l, 0], [0, 1]]
        assert float(lay["W_V"][3, 3]) == 1.0 and not np.any(np.asarray(lay["W_V"])[3, :3])
        assert not np.any(np.asarray(lay["W_V"])[:3, 3]) and not np.any(np.asarray(lay["W_Q"])[:, 3])
        assert not np.any(np.asarray(lay["W_K"])[:, 3]) and np.any(np.asarray(lay["W_K"])[:, :3])
    assert np.array_equal(np.asarray(eff["h"]), [0, 0, 0, -1])
    t = _tasks(cfg, 6)
    x, y, xq = (np.asarray(v, np.float64) for v in (t.x, t.y, t.x_query))
    expected = _ahn_transcription([a[:3, :3] for a in a_mats], b_mats, x, y, xq)
    np.testing.assert_allclose(apply(params, t.x, t.y, t.x_query, cfg=cfg), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_polynomial_reduction_matches_forward_pass(noise):
    """yhat = x_q'^T q_L(S) g' (general_form docstring) against the transformer with A_l = a_l Sigma^-1,
    B_l = b_l I, both in float64, on rotated anisotropic tasks with w ~ N(0, Sigma^-1)."""
    cfg = Config(d=4, n=9, depth=3, parameterization="block", covariance="cond", cond=6.0,
                 weight_prior="inverse", noise=noise)
    a, b = np.array([-0.4, -1.3, -2.1]), np.array([0.8, -0.3, 0.5])
    sigma = covariance_matrix(cfg)
    sigma_inv = np.linalg.inv(sigma)
    t = _tasks(cfg, 64)
    with jax.enable_x64(True):
        p64 = gd_params(cfg, [-a_l * sigma_inv for a_l in a], [b_l for b_l in b])
        args = [jnp.asarray(v, jnp.float64) for v in (t.x, t.y, t.x_query)]
        assert p64['h'].dtype == jnp.float64
        got = np.asarray(model.apply(p64, *args, cfg))
    x, y, xq = (np.asarray(v, np.float64) for v in (t.x, t.y, t.x_query))
    white = np.linalg.inv(sym_sqrt(sigma))
    xw, xqw = x @ white, xq @ white
    s = np.einsum("bni,bnj->bij", xw, xw) / cfg.n
    lam, vecs = np.linalg.eigh(s)
    _, q = general_form.residual_polynomials(lam, a, a * b)
    g = np.einsum("bni,bn->bi", xw, y) / cfg.n
    expected = np.einsum("bi,bik,bk,bjk,bj->b", xqw, vecs, q, vecs, g)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_b_zero_is_gd_polynomial():
    lam = np.linspace(0.1, 3.0, 7)
    a = np.array([-0.5, -1.1])
    p, q = general_form.residual_polynomials(lam, a, np.zeros(2))
    np.testing.assert_allclose(p, (1 - 0.5 * lam) * (1 - 1.1 * lam))
    np.testing.assert_allclose(1 - p, lam * q)


def test_chunked_objective_is_the_mean_loss_for_any_number_of_spectra():
    """The fit's objective (full chunks in a scan plus a remainder) equals the mean of ``prompt_losses``,
    also when the number of spectra is not a multiple of the chunk."""
    lam = general_form.wishart_eigenvalues(4, 12, 2 * general_form._CHUNK + 37, seed=3)
    a, c = np.array([-0.6, -1.1]), np.array([0.2, 0.1])
    with jax.enable_x64(True):
        for num in (len(lam), general_form._CHUNK, 37):
            full = num // general_form._CHUNK * general_form._CHUNK
            v, g = general_form._value_and_grad(
                jnp.asarray(np.r_[a, c]), jnp.asarray(lam[:full].reshape(-1, general_form._CHUNK, 4)),
                jnp.asarray(lam[full:num]), jnp.asarray(0.4), jnp.asarray(12.0), 2, True)
            ref = general_form.prompt_losses(lam[:num], a, c, 12, 0.4).mean()
            np.testing.assert_allclose(float(v), ref, rtol=1e-12)
            sample = jnp.asarray(lam[:num])
            direct = jax.grad(lambda th, lm: jnp.mean(general_form.prompt_losses(lm, th[:2], th[2:], 12, 0.4)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(direct(jnp.asarray(np.r_[a, c]), sample)), rtol=1e-10)

@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_one_layer_optimum_is_the_closed_form(noise):
    """L = 1: the family's optimum is one GD step, a_1 = -eta*, loss L* (Mahankali et al. 2023, Thm. 1)."""
    opt = general_form.general_form_optimum(3, 10, 1, noise, num_prompts=2**16, restarts=2)
    assert abs(opt.loss - theory.isotropic_loss_star(10, 3, noise)) <= 4 * opt.loss_stderr
    assert opt.a[0] == pytest.approx(-theory.eta_star(10, 3, noise), rel=0.02)
    assert opt.gd_loss == pytest.approx(opt.loss, rel=1e-9)


def test_two_layer_optimum_beats_gd_and_is_stationary():
    opt = general_form.general_form_optimum(3, 10, 2, num_prompts=2**14, restarts=3)
    assert opt.loss < 0.5 * opt.gd_loss  # re-conditioning the x tokens beats 2 GD steps by far
    assert opt.loss_median < opt.loss  # heavy right tail: the mean sits above the median
    lam = general_form.wishart_eigenvalues(3, 10, 2**14)
    a, c = np.array(opt.a), np.array(opt.a) * np.array(opt.b)
    base = general_form.prompt_losses(lam, a, c, 10).mean()
    for i in range(2):  # a stationary point in a: no coordinate step lowers the loss by more than O(h^2)
        for h in (1e-3, -1e-3):
            da = a.copy()
            da[i] += h
            assert general_form.prompt_losses(lam, da, c, 10).mean() >= base - 1e-6


def test_probes_read_a_and_b_back_from_exact_weights():
    cfg = Config(d=3, n=8, depth=3, parameterization="block", covariance="cond", cond=5.0, weight_prior="inverse")
    sigma = covariance_matrix(cfg)
    a, b = [-0.4, -1.3, -2.1], [0.8, -0.3, 0.5]
    params = gd_params(cfg, [-a_l * np.linalg.inv(sigma) for a_l in a], b)
    g = probes.general_form_layers(params, cfg, sigma)
    np.testing.assert_allclose(g["a"], a, rtol=1e-5)
    np.testing.assert_allclose(g["b"], b, rtol=1e-6)
    assert max(g["a_distance"]) < 1e-5 and max(g["b_residual"]) < 1e-6


def test_recipe_fills_only_unset_fields():
    block = Config.create(parameterization="block")
    assert (block.lr, block.b2, block.clip_norm) == (0.1, 0.9, 1e-3)
    assert Config.create(parameterization="block", lr=1e-3).lr == 1e-3
    assert Config.create().lr == Config().lr  # full has no recipe
