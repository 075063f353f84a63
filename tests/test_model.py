"""The associative LSA against the naive score-matrix oracle, and the exact GD-step weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import model
from icl_gd.config import Config
from icl_gd.data import TaskSpec, distribution, sample_tasks
from icl_gd.fusion import barrier
from icl_gd.model import gd_params, init_params, masks

# One compile per config instead of eager op-by-op dispatch (Config is hashable).
apply = jax.jit(model.apply, static_argnames="cfg")
apply_naive = jax.jit(model.apply_naive, static_argnames="cfg")
_sample = jax.jit(sample_tasks, static_argnums=(2, 3))


def _tasks(cfg: Config, batch: int = 16, seed: int = 0):
    return _sample(jax.random.PRNGKey(seed), distribution(cfg), TaskSpec.from_config(cfg), batch)


@pytest.mark.parametrize("parameterization", ["full", "sparse", "block"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("heads,key_size,tie", [(1, 0, False), (2, 3, False), (1, 0, True)])
def test_associative_matches_naive(parameterization, depth, heads, key_size, tie):
    cfg = Config(d=4, n=9, depth=depth, heads=heads, key_size=key_size, tie_weights=tie,
                 parameterization=parameterization, init_scale=0.3)
    params = init_params(jax.random.PRNGKey(depth), cfg)
    t = _tasks(cfg)
    fast = apply(params, t.x, t.y, t.x_query, cfg=cfg)
    slow = apply_naive(params, t.x, t.y, t.x_query, cfg=cfg)
    assert fast.shape == (16,)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parameterization", ["full", "sparse", "block"])
@pytest.mark.parametrize("heads,key_size", [(1, 0), (2, 3)])
def test_gradients_match_naive(parameterization, heads, key_size):
    """The Gram path's hand-written VJP against autodiff of the score-matrix oracle, in float64:
    gradients of the weights and of the inputs (x, y, x_q) at depth 3."""
    with jax.enable_x64(True):
        cfg = Config(d=3, n=6, depth=3, heads=heads, key_size=key_size, parameterization=parameterization,
                     init_scale=0.4)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(jax.random.PRNGKey(3), cfg))
        t = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _tasks(cfg, batch=5))

        # A loss with well-conditioned derivatives at predictions of ~1e5: sin(yhat) there would turn
        # 1e-15 relative rounding of yhat into 1e-10 of its cosine.
        c = jnp.asarray(np.random.default_rng(0).normal(size=5))
        scale = float(jnp.max(jnp.abs(model.apply_naive(params, t.x, t.y, t.x_query, cfg))))

        def grads(fn):
            def loss(p, x, y, xq):
                pred = fn(p, x, y, xq, cfg)
                return jnp.sum(c * pred) + jnp.sum(pred**2) / (2 * scale)

            return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, t.x, t.y, t.x_query)

        fast, slow = grads(model.apply), grads(model.apply_naive)
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
            # Entries are sums of terms up to max|b| (~1e4 here): float64 rounding is relative to that.
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13 * float(np.max(np.abs(b))))


def test_tiles_pad_the_batch_without_mixing_tasks():
    """The layers work on tiles of ``model._TILE`` tasks; a batch that is not a multiple is padded
    with zero tasks. Each prediction matches the oracle and does not depend on the rest of the batch."""
    cfg = Config(d=3, n=5, depth=3, init_scale=0.3)
    params = init_params(jax.random.PRNGKey(1), cfg)
    t = _tasks(cfg, batch=model._TILE + 3)
    whole = apply(params, t.x, t.y, t.x_query, cfg=cfg)
    np.testing.assert_allclose(whole, apply_naive(params, t.x, t.y, t.x_query, cfg=cfg), rtol=1e-4, atol=1e-5)
    part = apply(params, t.x[:3], t.y[:3], t.x_query[:3], cfg=cfg)
    np.testing.assert_allclose(part, whole[:3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parameterization", ["full", "sparse"])
def test_long_contexts_match_naive(parameterization):
    """Beyond ``_UNROLL_N`` tokens G_0 is computed feature-major and then tiled; the layers agree
    with the oracle there too."""
    cfg = Config(d=2, n=model._UNROLL_N + 3, depth=2, parameterization=parameterization, init_scale=0.3)
    params = init_params(jax.random.PRNGKey(2), cfg)
    t = _tasks(cfg, batch=5)
    np.testing.assert_allclose(apply(params, t.x, t.y, t.x_query, cfg=cfg),
                               apply_naive(params, t.x, t.y, t.x_query, cfg=cfg), rtol=1e-4, atol=1e-4)


def test_wide_features_fall_back_to_the_token_path():
    """d + 1 > _GRAM_MAX runs the token-by-token layers; they agree with the oracle too."""
    cfg = Config(d=model._GRAM_MAX, n=4, depth=2, init_scale=0.2)
    params = init_params(jax.random.PRNGKey(0), cfg)
    t = _tasks(cfg, batch=3)
    np.testing.assert_allclose(apply(params, t.x, t.y, t.x_query, cfg=cfg),
                               apply_naive(params, t.x, t.y, t.x_query, cfg=cfg), rtol=1e-4, atol=1e-5)


def _compiled_step_hlo(cfg: Config) -> str:
    """The optimised HLO of the training step (two steps per call) as ``train`` compiles it."""
    from icl_gd.keys import run_keys
    from icl_gd.optim import make_optimizer
    from icl_gd.train import init_state, make_train_chunk

    opt = make_optimizer(cfg)
    chunk = jax.jit(make_train_chunk(cfg, opt), static_argnames="length")
    return chunk.lower(init_state(cfg, opt), distribution(cfg), run_keys(0)["train"], length=2).compile().as_text()


@pytest.mark.parametrize("parameterization", ["full", "sparse", "block"])
def test_training_step_has_no_batched_dot(parameterization):
    """XLA:CPU runs per-task tiny matmuls (dots with batch dimensions) slowly: the compiled
    training step of a 3-layer model must have none (its dots are GEMMs over the batch)."""
    hlo = _compiled_step_hlo(Config(d=4, n=8, depth=3, batch_size=32, parameterization=parameterization))
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots, "expected GEMMs in the step"
    assert not [line for line in dots if "lhs_batch_dims" in line]


def test_training_step_never_chains_per_task_products():
    """Each fused loop of the compiled 4-layer training step computes at most two per-task
    (d+1) x (d+1) products (d+1 multiplies each of the layers' tiled [P, d+1, d+1, 16] arrays, one
    more for a rank-one term): XLA:CPU would otherwise fuse chains of them and recompute the inner
    products for every element that reads them ((d+1)^2 multiplies for a chain of two; 22 in one
    loop before ``fusion.barrier``, and a 3x slower gradient at L=4)."""
    import re

    # Block runs the same layer code. G_0's loop (``_gram_tiles``) makes n outer products of the
    # same shape: n=8 keeps it under the bound.
    cfg = Config(d=4, n=8, depth=4, batch_size=32)
    hlo = _compiled_step_hlo(cfg)
    dim, tiles = cfg.d + 1, cfg.batch_size // model._TILE
    per_fusion = [len(re.findall(rf"= f32\[{tiles},{dim},{dim},{model._TILE}\]\{{[0-9,]*\}} multiply\(", comp))
                  for comp in re.split(r"\n(?=%|ENTRY)", hlo)]
    assert dim <= max(per_fusion) <= 2 * dim + 1


def test_barrier_is_the_identity():
    """``fusion.barrier`` (and ``model._materialized``, its cotangent too) changes no value: not inf or
    NaN in the first entry (the predicate it reads), not under vmap or grad."""
    x = jnp.asarray([[jnp.inf, -1.0], [jnp.nan, 2.0]])
    for first in (jnp.inf, -jnp.inf, jnp.nan, 3.0):
        v = x.at[0, 0].set(first)
        np.testing.assert_array_equal(jax.jit(barrier)(v), v)
        np.testing.assert_array_equal(jax.jit(jax.vmap(barrier))(v), v)
    w = jnp.asarray([[0.5, -1.0], [2.0, 3.0]])
    g = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(model._materialized(a)) * w)))(w)
    np.testing.assert_allclose(g, jnp.cos(w) * w, rtol=1e-6)
    gv = jax.jit(jax.vmap(jax.grad(lambda a: jnp.sum(model._materialized(a) ** 2))))(w)
    np.testing.assert_allclose(gv, 2 * w, rtol=1e-6)


def test_gram_above_the_unrolled_length():
    """G_0 on tiles by the unrolled outer products (n <= _UNROLL_N) and by ``_gram``'s one reduction
    per entry (n > _UNROLL_N) agree with numpy."""
    rng = np.random.default_rng(0)
    for n in (model._UNROLL_N, model._UNROLL_N + 7):
        x, y = rng.normal(size=(3, n, 2)).astype(np.float32), rng.normal(size=(3, n)).astype(np.float32)
        z = np.concatenate([x, y[..., None]], -1).astype(np.float64)
        g = jax.jit(lambda a, b: model._from_tiles(model._gram_tiles(a, b), 3))(x, y)
        np.testing.assert_allclose(g, np.einsum("bni,bnj->ijb", z, z), rtol=1e-4, atol=1e-4)


def test_param_names_shapes_and_sparse_structure():
    cfg = Config(d=3, n=5, depth=2, parameterization="sparse")
    params = init_params(jax.random.PRNGKey(0), cfg)
    assert set(params) == {"layers", "h"} and len(params["layers"]) == 2
    layer = params["layers"][0]
    assert {k: v.shape for k, v in layer.items()} == {"W_K": (4, 4), "W_Q": (4, 4), "W_V": (4, 4)}
    assert params["h"].shape == (4,)
    # Sparse: keys/queries read x only, value maps y -> y only, readout fixed at -e_{d+1} (Ahn et al.).
    assert np.all(layer["W_K"][:, 3] == 0) and np.all(layer["W_Q"][:, 3] == 0)
    assert np.count_nonzero(layer["W_V"]) == 1 and layer["W_V"][3, 3] != 0
    np.testing.assert_array_equal(params["h"], [0, 0, 0, -1])
    # Structure is enforced in the forward pass: noise in masked or fixed entries changes nothing.
    m = masks(cfg)
    assert not np.any(m["h"])
    noisy = jax.tree.map(lambda p, mk: p + (1 - mk) * 7.0, params, m)
    t = _tasks(cfg)
    np.testing.assert_allclose(apply(noisy, t.x, t.y, t.x_query, cfg=cfg), apply(params, t.x, t.y, t.x_query, cfg=cfg))
    # ...and gradients never reach masked entries.
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, t.x, t.y, t.x_query, cfg=cfg) ** 2)))(params)
    for gl, ml in zip(jax.tree.leaves(g), jax.tree.leaves(m)):
        assert np.all(np.asarray(gl)[ml == 0] == 0)


def test_heads_axis():
    cfg = Config(d=3, n=5, heads=3, key_size=2)
    layer = init_params(jax.random.PRNGKey(0), cfg)["layers"][0]
    assert layer["W_K"].shape == (3, 2, 4) and layer["W_V"].shape == (3, 4, 4)


@pytest.mark.parametrize("parameterization", ["full", "sparse", "block"])
def test_gd_step_constructor_is_exact(parameterization):
    cfg = Config(d=4, n=11, noise=0.3, parameterization=parameterization)
    t = _tasks(cfg, batch=32)
    x, y, xq = (np.asarray(a, np.float64) for a in (t.x, t.y, t.x_query))
    eta = 0.37
    expected = eta / cfg.n * np.einsum("bn,bnd,bd->b", y, x, xq)  # (eta/n) sum_i y_i x_i^T x_q
    got = apply(gd_params(cfg, eta), t.x, t.y, t.x_query, cfg=cfg)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    gamma = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (4, 4)), np.float64)
    expected = np.einsum("bd,de,bne,bn->b", xq, gamma, x, y) / cfg.n  # (1/n) x_q^T Gamma X^T y
    got = apply(gd_params(cfg, gamma), t.x, t.y, t.x_query, cfg=cfg)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parameterization", ["full", "block"])
@pytest.mark.parametrize("depth", [2, 3])
def test_multilayer_constructor_is_k_steps_of_preconditioned_gd(depth, parameterization):
    cfg = Config(d=3, n=8, depth=depth, covariance="cond", cond=3.0, parameterization=parameterization)
    t = _tasks(cfg, batch=8)
    x, y, xq = (np.asarray(a, np.float64) for a in (t.x, t.y, t.x_query))
    rng = np.random.default_rng(0)
    gammas = [0.3 * np.eye(3) + 0.05 * rng.standard_normal((3, 3)) for _ in range(depth)]
    w = np.zeros((8, 3))
    for g in gammas:  # w <- w + (1/n) Gamma X^T (y - X w)
        resid = y - np.einsum("bnd,bd->bn", x, w)
        w = w + np.einsum("de,bne,bn->bd", g, x, resid) / cfg.n
    expected = np.einsum("bd,bd->b", xq, w)
    got = apply(gd_params(cfg, gammas), t.x, t.y, t.x_query, cfg=cfg)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    tied = dataclasses.replace(cfg, tie_weights=True)
    got = apply(gd_params(tied, gammas[0]), t.x, t.y, t.x_query, cfg=tied)
    with pytest.raises(ValueError):
        gd_params(tied, gammas)
    w = np.zeros((8, 3))
    for _ in range(depth):
        resid = y - np.einsum("bnd,bd->bn", x, w)
        w = w + np.einsum("de,bne,bn->bd", gammas[0], x, resid) / cfg.n
    np.testing.assert_allclose(got, np.einsum("bd,bd->b", xq, w), rtol=1e-4, atol=1e-4)


def test_softmax_attention_runs():
    cfg = Config(d=3, n=6, attention="softmax", depth=2)
    params = init_params(jax.random.PRNGKey(1), cfg)
    t = _tasks(cfg, batch=4)
    out = apply(params, t.x, t.y, t.x_query, cfg=cfg)
    assert out.shape == (4,) and np.all(np.isfinite(out))
    g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, t.x, t.y, t.x_query, cfg) ** 2)))(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_query_is_not_a_key():
    # With the query among the keys, a 1-layer LSA would gain terms cubic in x_q
    # ((z_q^T B z_q)(u^T z_q)); without it the prediction is linear in x_q.
    cfg = Config(d=3, n=6, init_scale=0.7)
    p = init_params(jax.random.PRNGKey(2), cfg)
    t = _tasks(cfg, batch=4)
    one = apply(p, t.x, t.y, t.x_query, cfg=cfg)
    three = apply(p, t.x, t.y, 3.0 * t.x_query, cfg=cfg)
    np.testing.assert_allclose(three, 3.0 * one, rtol=1e-5, atol=1e-5)
