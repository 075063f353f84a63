"""Linear self-attention (LSA) stacks as pure functions over a named parameter pytree.

Conventions (used everywhere in icl-gd, stated once here):

* Tokens are rows. Context token i is z_i = [x_i, y_i] in R^{d+1}; the query token is
  z_q = [x_q, 0]. A batch is Z of shape [B, n+1, d+1] with the query last.
* Weights act on column vectors: q = W_Q z, k = W_K z, v = W_V z, with W_K, W_Q of shape
  [k, d+1] and W_V of shape [d+1, d+1] (a leading head axis [H, ...] when heads > 1).
  The score of query row j on key i is k_i^T q_j = z_i^T (W_K^T W_Q) z_j.
* Only the n context tokens are keys and values (the query is never a key). Each layer is
  residual with a 1/n factor (Ahn et al. 2023, eq. (2); Mahankali et al. 2023, eq. (2.2)):

      z_j <- z_j + (1/n) sum_{i<=n} (z_i^T W_K^T W_Q z_j) W_V z_i      (every row j)

* The prediction is read from the query row's final state through the head h:
  yhat = h^T z_q^(L). Ahn et al.'s readout -Z_L[d+1, n+1] is h = -e_{d+1}.

With one layer, u = W_V^T h and B = W_K^T W_Q, the prediction is

      yhat = h^T z_q + (1/n) sum_i (u^T z_i)(z_i^T B z_q),

whose GD part is (1/n) x_q^T Gamma X^T y with Gamma = u_y B_xx^T + B_yx^T u_x^T (see ``analysis``).

Parameterisations: ``full`` learns every entry (Mahankali et al.'s model); ``block`` is Ahn et
al.'s general form (2023, Sec. 6): keys and queries read x only, so W_K^T W_Q = [[A_l, 0], [0, 0]]
(A_l as the product of the learned x blocks: their code learns Q_l directly, but Adam on a single
matrix must move A_l = a_l Sigma^-1's entries, ~16 |a_l| for a rotated Sigma of condition 16, one
lr-sized step at a time, and stalled there; the product grows them multiplicatively), W_V =
[[B_l, 0], [0, 1]] with B_l learned, and the fixed readout h = -e_{d+1}; each layer moves every x
token by B_l Sigma_hat_l A_l x_j and every y entry by one preconditioned GD step in the
re-conditioned x. ``sparse`` is the
Ahn et al. form, enforced by fixed masks applied in the forward pass: W_K and W_Q read only
the x block (so B = [[A, 0], [0, 0]]), W_V maps only y to y, and the readout is Ahn et al.'s
fixed -Z_L[d+1, n+1], i.e. h = -e_{d+1} is a constant, not learned. Why it matters: a learned
output scale c = -h_y makes the class c x (L-step PGD), whose loss has a spurious valley with
c -> 0 while one step -> -inf and c times it stays finite; the remaining L-1 steps are then real
roots of a polynomial whose optimum has complex ones. With d=3, n=10, L=3, Adam settled there
(held-out loss 0.253 vs 0.162 for tuned 3-step PGD); with the fixed readout it reaches 0.162.

Computation. Linear attention is associative, so a layer never forms the (n+1) x n score
matrix: written for row tokens, every token (the query included) moves by the same per-task
(d+1) x (d+1) matrix,

    z_j^T <- z_j^T R_l,   R_l = I + (1/n) sum_heads W_Q^T W_K G_l W_V^T,   G_l = Z_c^T Z_c,

so the context's Gram matrix evolves as G_{l+1} = R_l^T G_l R_l and the readout is
yhat = h^T z_q + (1/n) sum_heads u^T G_L a with u = W_V^T h, a = W_K^T W_Q z_q. ``apply``
therefore touches the n tokens once (G_0, O(n (d+1)^2) per task, no gradient needed) and runs
every layer on (d+1) x (d+1) matrices: O((d+1)^3) per task, head and layer, independent of n.
The layers' arrays are tiled, [B/16, d+1, d+1, 16]: 16 tasks in the minor axis (one AVX-512
vector, one cache line), so 16 tasks' matrices lie in one 2.3 KB block that a fused loop reads from
L1, where feature-major [d+1, d+1, B] rows put a product's 12 operand streams 16 KB apart (B=4096)
(per-task products 3x faster, the L=4 step 23% faster). Each per-task product is unrolled over one
index (XLA:CPU runs batched tiny dots, and the reductions autodiff makes of broadcasts, several
times slower than fused elementwise loops), the layer's VJP is written by hand (``_gram_step``),
and each product is materialised once (``_barrier``) because XLA:CPU would fuse chains of them and
recompute every inner product for each element that reads it. G_0 is computed on tiles too
(``_gram_tiles``; beyond ``_UNROLL_N`` tokens feature-major, then tiled); the readout stays
feature-major, where its products are GEMMs over the batch. The sparse form never moves an x
entry, so its layers reduce to L steps of preconditioned GD on G's y column (``_sparse_apply``,
O(d^2) per task and layer).
docs/BENCHMARKS.md has the numbers.
``apply_naive`` keeps the score-matrix form as the oracle.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.config import Config
from icl_gd.fusion import barrier as _barrier

Params = dict[str, Any]  # {'layers': [{'W_K', 'W_Q', 'W_V'}, ...], 'h': [d+1]}


def num_param_layers(cfg: Config) -> int:
    """Stored layer entries: one when weights are tied, else ``depth``."""
    return 1 if cfg.tie_weights else cfg.depth


def _shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    head = (cfg.heads,) if cfg.heads > 1 else ()
    return {
        "W_K": (*head, cfg.k, cfg.d + 1),
        "W_Q": (*head, cfg.k, cfg.d + 1),
        "W_V": (*head, cfg.d + 1, cfg.d + 1),
    }


def masks(cfg: Config) -> Params:
    """0/1 arrays of the param shapes marking the entries a parameterisation may use."""
    shapes = _shapes(cfg)
    d = cfg.d
    layer = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
    h = np.ones(d + 1, np.float32)
    if cfg.parameterization == "sparse":
        layer["W_K"][..., d] = 0.0  # keys read x only
        layer["W_Q"][..., d] = 0.0  # queries read x only
        layer["W_V"][...] = 0.0
        layer["W_V"][..., d, d] = 1.0  # value: y -> y
        h[:] = 0.0  # the readout is fixed (``fixed_values``)
    elif cfg.parameterization == "block":
        layer["W_K"][..., d] = 0.0  # keys and queries read x only: A_l = (W_K^T W_Q)[:d, :d]
        layer["W_Q"][..., d] = 0.0
        layer["W_V"][...] = 0.0
        layer["W_V"][..., :d, :d] = 1.0  # B_l (x -> x); the y -> y entry is fixed at 1
        h[:] = 0.0
    return {"layers": [dict(layer) for _ in range(num_param_layers(cfg))], "h": h}


def fixed_values(cfg: Config) -> Params:
    """Constants of the entries ``masks`` leaves out: zero, except the readout h = -e_{d+1} of the
    sparse and block forms (Ahn et al. 2023, eq. (2): the prediction is -Z_L[d+1, n+1]) and, for
    block, the value's y -> y entry 1 (their P_l = [[B_l, 0], [0, 1]], Sec. 6)."""
    m = masks(cfg)
    out = jax.tree.map(np.zeros_like, m)
    d = cfg.d
    if cfg.parameterization in ("sparse", "block"):
        out["h"][d] = -1.0
    if cfg.parameterization == "block":
        for layer in out["layers"]:
            layer["W_V"][..., d, d] = 1.0
    return out


def effective_params(params: Params, cfg: Config) -> Params:
    """The weights the forward pass uses: learned entries where ``masks`` allows, else ``fixed_values``.

    Stored params of a sparse model already hold these values from ``init_params`` (gradients
    never reach the other entries); the forward pass re-applies them so that nothing stored
    there, e.g. weight decay acting on a fixed entry, can change the model.
    """
    if cfg.parameterization == "full":
        return params
    return jax.tree.map(lambda p, m, f: p * m + f, params, masks(cfg), fixed_values(cfg))


def init_params(key: jax.Array, cfg: Config) -> Params:
    """Gaussian init with std ``init_scale`` of the learned entries; the others hold ``fixed_values``."""
    m = masks(cfg)
    leaves, treedef = jax.tree.flatten(m)
    keys = jax.random.split(key, len(leaves))
    out = [cfg.init_scale * jax.random.normal(k, mk.shape) * mk for k, mk in zip(keys, leaves)]
    return jax.tree.map(lambda p, f: p + f, jax.tree.unflatten(treedef, out), fixed_values(cfg))


def _per_head(w: jax.Array, cfg: Config) -> jax.Array:
    return w if cfg.heads > 1 else w[None]


def tokens(x: jax.Array, y: jax.Array, x_query: jax.Array) -> jax.Array:
    """Z [B, n+1, d+1]: rows [x_i, y_i] then the query row [x_q, 0]."""
    ctx = jnp.concatenate([x, y[..., None]], axis=-1)
    query = jnp.concatenate([x_query, jnp.zeros_like(x_query[..., :1])], axis=-1)
    return jnp.concatenate([ctx, query[:, None]], axis=1)


_GRAM_MAX = 17  # the Gram path up to this d+1 (its unrolled loops and (d+1)^4 GEMM grow with d)


@jax.custom_vjp
def _materialized(x: jax.Array) -> jax.Array:
    """``_barrier`` on the value and on its cotangent."""
    return _barrier(x)


_materialized.defvjp(lambda x: (_barrier(x), None), lambda _, g: (_barrier(g),))


_UNROLL_N = 64  # G_0's outer products unrolled into one tiled loop up to this n (``_gram`` above)


def _gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """G_0 = Z_c^T Z_c per task, feature-major [d+1, d+1, B], for contexts longer than
    ``_UNROLL_N`` (``_gram_tiles`` below it): one reduction over the long minor axis n of [B, n]
    rows per distinct entry (summed over axis 0 of transposed rows, XLA copied one transpose per
    entry, 21 x ~150 us at n=80, B=1061); the (d+1)(d+2)/2 entries are stacked flat and copied
    into place."""
    dim = x.shape[-1] + 1
    features = [x[..., i] for i in range(dim - 1)] + [y]  # d+1 x [B, n]
    pairs = [(i, j) for i in range(dim) for j in range(i, dim)]
    packed = jnp.stack([jnp.sum(features[i] * features[j], axis=1) for i, j in pairs])
    where = {p: k for k, p in enumerate(pairs)}
    idx = np.asarray([where[min(i, j), max(i, j)] for i in range(dim) for j in range(dim)])
    return packed[idx].reshape(dim, dim, -1)


_TILE = 16  # tasks per tile of the layers' arrays: one AVX-512 vector, one 64-byte cache line


def _tiled(a: jax.Array, axis: int = -1) -> jax.Array:
    """The batch axis ``axis`` of ``a`` split into tiles: [..., B, ...] -> [B/_TILE, ..., _TILE] (the
    other axes in order), the batch padded with zero tasks (a zero Gram matrix and query stay zero
    through every layer)."""
    a = jnp.moveaxis(a, axis, -1)
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, (-a.shape[-1]) % _TILE)])
    return jnp.moveaxis(a.reshape(*a.shape[:-1], -1, _TILE), -2, 0)


def _to_tiles(a: jax.Array) -> jax.Array:
    """Feature-major [..., B] -> tiled [B/_TILE, ..., _TILE], materialised."""
    return _materialized(_tiled(a))


def _gram_tiles(x: jax.Array, y: jax.Array) -> jax.Array:
    """G_0 on tiles, [B/_TILE, d+1, d+1, _TILE], for the layers: the tokens tiled once ([P, n, d+1, T],
    the batch padded with zero tasks), then one fused loop of n per-task outer products whose
    operands (a tile's tokens, 7.7 KB at d=5, n=20) stay in L1. The tiled tokens are not
    materialised: XLA fuses the transpose into the loop (a barrier there cost one more 1.6 MB copy,
    ~0.13 ms at d=5, n=20, B=4096). Beyond ``_UNROLL_N`` tokens it tiles the feature-major
    ``_gram``: one tiled loop of 80 outer products ran 4.1 us per task against 2.8, and chunks of
    ``_UNROLL_N`` tokens in a loop over the tiles 5-50% slower at n=80-4096 (batches of 20-1061
    tasks pad up to 60% of a tile)."""
    if x.shape[1] > _UNROLL_N:
        return _to_tiles(_gram(x, y))
    z = jnp.concatenate([_tiled(x, axis=0), _tiled(y, axis=0)[:, :, None]], axis=2)  # [P, n, d+1, T]
    return _materialized(sum(z[:, t, :, None] * z[:, t, None, :] for t in range(x.shape[1])))


def _from_tiles(a: jax.Array, batch: int) -> jax.Array:
    """Tiled [P, ..., _TILE] -> feature-major [..., batch] (the padding tasks dropped)."""
    return _materialized(jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], -1)[..., :batch])


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-task a @ b on tiles, a [P, I, J, T], b [P, J, K, T] -> [P, I, K, T]: J fused
    multiply-adds per entry (no dot, no reduction)."""
    return sum(a[:, :, j, None, :] * b[:, None, j, :, :] for j in range(a.shape[2]))


def _left(w: jax.Array, a: jax.Array) -> jax.Array:
    """w @ a per task for a weight matrix w [I, J] shared by all tasks; a [P, J, K, T]."""
    return sum(w[None, :, j, None, None] * a[:, None, j, :, :] for j in range(a.shape[1]))


def _right(a: jax.Array, w: jax.Array) -> jax.Array:
    """a @ w per task for a shared weight matrix w [J, K]; a [P, I, J, T]."""
    return sum(a[:, :, j, None, :] * w[None, None, j, :, None] for j in range(a.shape[2]))


def _sum_abt(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum over tasks of a b^T -> [I, K]; a [P, I, J, T], b [P, K, J, T]. The per-task products first
    (one fused loop), then one reduction: XLA:CPU ran the contraction as a dot 2x slower, after
    copying both operands into its layout."""
    prods = sum(a[:, :, None, j, :] * b[:, None, :, j, :] for j in range(a.shape[2]))
    return jnp.sum(_barrier(prods), axis=(0, 3))


def _gram_layer(g: jax.Array, zq: jax.Array, layer: Params, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """One residual LSA layer on tiled (G, z_q): R = I + (1/n) sum_h W_Q^T W_K G W_V^T,
    G <- R^T G R, z_q^T <- z_q^T R. g [P, d+1, d+1, T], zq [P, d+1, T]."""
    wk, wq, wv = (_per_head(layer[k], cfg) for k in ("W_K", "W_Q", "W_V"))
    return _gram_step(g, zq, jnp.einsum("hkr,hki->hri", wq, wk) / cfg.n, wv)


@jax.custom_vjp
def _gram_step(g: jax.Array, zq: jax.Array, a: jax.Array, wv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(G, z_q) -> (R^T G R, z_q^T R) with R = I + sum_h A_h G W_V,h^T, A_h = W_Q,h^T W_K,h / n.
    Its VJP is written by hand (``_gram_step_bwd``) because G is symmetric: the backward needs
    three per-task products, not autodiff's four, and no reductions of broadcasts."""
    return _gram_step_fwd(g, zq, a, wv)[0]


def _gram_step_fwd(g: jax.Array, zq: jax.Array, a: jax.Array, wv: jax.Array) -> tuple[tuple[jax.Array, ...], tuple]:
    dim = g.shape[1]
    xs = [_barrier(_left(a[h], g)) for h in range(a.shape[0])]  # X_h = A_h G
    m = sum(_right(x, wv[h].T) for h, x in enumerate(xs))
    r = _barrier(m + jnp.eye(dim, dtype=g.dtype)[None, :, :, None])
    gr = _barrier(_mm(g, r))
    out = _barrier(_mm(jnp.swapaxes(r, 1, 2), gr)), _barrier(_mm(zq[:, None], r)[:, 0])
    return out, (g, zq, a, wv, xs, r, gr)


def _gram_step_bwd(res: tuple, cotangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
    # G' = R^T G R with G = G^T: dR = G R (dG' + dG'^T) + z_q dz_q'^T, dz_q = R dz_q';
    # dG = R dG' R^T + sum_h A_h^T dX_h with dX_h = dR W_V,h; dA_h = sum_tasks dX_h G (G symmetric)
    # and dW_V,h = sum_tasks dR^T X_h.
    g, zq, a, wv, xs, r, gr = res
    dg_out, dzq_out = cotangents
    sym = _barrier(dg_out + jnp.swapaxes(dg_out, 1, 2))
    dr = _barrier(_mm(gr, sym) + zq[:, :, None, :] * dzq_out[:, None, :, :])
    dg = _mm(r, _barrier(_mm(dg_out, jnp.swapaxes(r, 1, 2))))
    da, dwv = [], []
    for h, x in enumerate(xs):
        dx = _barrier(_right(dr, wv[h]))
        dg = dg + _left(a[h].T, dx)
        da.append(_sum_abt(dx, g))
        dwv.append(_sum_abt(jnp.swapaxes(dr, 1, 2), jnp.swapaxes(x, 1, 2)))
    dzq = _barrier(_mm(r, dzq_out[:, :, None])[:, :, 0])
    return _barrier(dg), dzq, jnp.stack(da), jnp.stack(dwv)


_gram_step.defvjp(_gram_step_fwd, _gram_step_bwd)


@jax.custom_vjp
def _matvec(a: jax.Array, v: jax.Array) -> jax.Array:
    """a @ v per task on tiles: v [P, J, T] and a [P, I, J, T] (per task) or [I, J] (shared weights)
    -> [P, I, T], unrolled over J into one fused loop. Its VJP is unrolled too (autodiff of the
    broadcasts makes one small reduction per column); a shared a's gradient is one contraction
    over (tile, task)."""
    return _matvec_fwd(a, v)[0]


def _product(a: jax.Array, v: jax.Array) -> jax.Array:
    """a @ v on a one-column tile: ``_mm`` for per-task a, ``_left`` for shared weights."""
    return (_mm(a, v[:, :, None]) if a.ndim == 4 else _left(a, v[:, :, None]))[:, :, 0]


def _matvec_fwd(a: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _barrier(_product(a, v)), (a, v)


def _matvec_bwd(res: tuple[jax.Array, jax.Array], dout: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, v = res
    dv = _barrier(_product(jnp.swapaxes(a, -3, -2) if a.ndim == 4 else a.T, dout))
    if a.ndim == 4:
        return dout[:, :, None] * v[:, None], dv
    return jnp.einsum("pit,pjt->ij", dout, v), dv


_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def _gram_readout(g: jax.Array, zq: jax.Array, layer: Params, h: jax.Array, cfg: Config) -> jax.Array:
    """yhat [B] = h^T z_q + (1/n) sum_h u_h^T G a_h, u_h = W_V^T h, a_h = W_K^T W_Q z_q: the last
    layer's query row read out through h (the context rows after it are never needed)."""
    dim, n = cfg.d + 1, cfg.n
    wk, wq, wv = (_per_head(layer[k], cfg) for k in ("W_K", "W_Q", "W_V"))
    # coef[(i, j), r] = sum_h u_h[i] (W_K^T W_Q)_h[j, r]: yhat = h.zq + (1/n) sum_ij G_ij (coef zq)_ij
    coef = jnp.einsum("hli,l,hkj,hkr->ijr", wv, h, wk, wq).reshape(dim * dim, dim)
    weighted = g.reshape(dim * dim, -1) * (coef @ zq)
    return h @ zq + jnp.ones((dim * dim,), g.dtype) @ weighted / n


def _gram_apply(g: jax.Array, x_query: jax.Array, layers: list[Params], h: jax.Array, cfg: Config) -> jax.Array:
    """yhat [B] from the tiled G_0 [P, d+1, d+1, T] and x_query [B, d]: the non-final layers on
    tiles, the last one's query row feature-major (``_gram_readout``: its products are GEMMs over
    the batch, 0.1 ms faster at d=5, n=20, B=4096 than on tiles even after the untiling)."""
    zq = _to_tiles(jnp.concatenate([x_query, jnp.zeros_like(x_query[:, :1])], axis=-1).T)  # [P, d+1, T]
    for layer in layers[:-1]:
        g, zq = _gram_layer(g, zq, layer, cfg)
    batch = x_query.shape[0]
    return _gram_readout(_from_tiles(g, batch), _from_tiles(zq, batch), layers[-1], h, cfg)


def _sparse_apply(g: jax.Array, x_query: jax.Array, layers: list[Params], h: jax.Array, cfg: Config) -> jax.Array:
    """yhat [B] of the sparse form from the tiled G_0 and x_query [B, d]: its L layers are L
    steps of preconditioned GD (Ahn et al. 2023, Lemma 1). Its keys and queries read x alone and
    its value maps y to y alone, so R_l = I + m_l e^T with m_l = A_l G_l e and A_l = sum_h v_h
    W_Q,h^T W_K,h / n nonzero in the x block only: no layer moves an x entry, G_xx = X^T X stays
    put, and only the y column g = G[:d, d] and the query's y move,

        m_l = A_l g_l,   g_{l+1} = g_l + G_xx m_l,   y_q <- y_q + x_q . m_l,

    (the x block of G_{l+1} = G_l + q e^T + e q^T + (m.q) e e^T with q = G_l m_l; G's yy entry
    feeds nothing). O(d^2) per task and layer, on tiles like ``_gram_step``."""
    d = cfg.d
    gxx, gy, xq = g[:, :d, :d], g[:, :d, d], _to_tiles(x_query.T)
    yq = jnp.zeros_like(gy[:, 0])
    for i, layer in enumerate(layers):
        wk, wq, wv = (_per_head(layer[k], cfg) for k in ("W_K", "W_Q", "W_V"))
        m = _matvec(jnp.einsum("hkr,hki,h->ri", wq[..., :d], wk[..., :d], wv[:, d, d]) / cfg.n, gy)
        yq = yq + sum(xq[:, j] * m[:, j] for j in range(d))
        if i < len(layers) - 1:
            gy = gy + _matvec(gxx, m)
    pred = sum(h[j] * xq[:, j] for j in range(d)) + h[d] * yq  # [P, T]
    return _from_tiles(pred[:, None], x_query.shape[0])[0]


def _linear_layer(z: jax.Array, layer: Params, cfg: Config, query_only: bool) -> jax.Array:
    """One residual LSA layer on the tokens, z [B, n+1, d+1] (the path for d+1 > _GRAM_MAX)."""
    n = cfg.n
    wk, wq, wv = (_per_head(layer[k], cfg) for k in ("W_K", "W_Q", "W_V"))
    zc = z[:, :n]
    c = jnp.einsum("bni,bnj->bij", zc, zc)  # Z_c^T Z_c, [B, d+1, d+1]
    # M = sum_h W_Q^T W_K C W_V^T: out_j = z_j^T M / n.
    kv = jnp.einsum("hki,bij,hlj->bhkl", wk, c, wv)  # W_K C W_V^T per head
    m = jnp.einsum("hkr,bhkl->brl", wq, kv)
    if query_only:
        return z[:, n] + jnp.einsum("br,brl->bl", z[:, n], m) / n
    return z + jnp.einsum("bjr,brl->bjl", z, m) / n


def _softmax_layer(z: jax.Array, layer: Params, cfg: Config, query_only: bool) -> jax.Array:
    """Residual softmax attention over the n context keys (no 1/n: softmax normalises)."""
    n = cfg.n
    wk, wq, wv = (_per_head(layer[k], cfg) for k in ("W_K", "W_Q", "W_V"))
    zc = z[:, :n]
    rows = z[:, n:] if query_only else z
    scores = jnp.einsum("bjr,hkr,hki,bni->bhjn", rows, wq, wk, zc)
    attn = jax.nn.softmax(scores, axis=-1)
    out = rows + jnp.einsum("bhjn,bni,hli->bjl", attn, zc, wv)
    return out[:, 0] if query_only else out


def _layers(params: Params, cfg: Config) -> list[Params]:
    stored = params["layers"]
    return [stored[0]] * cfg.depth if cfg.tie_weights else list(stored)


def apply(params: Params, x: jax.Array, y: jax.Array, x_query: jax.Array, cfg: Config) -> jax.Array:
    """Predictions yhat [B] for contexts x [B, n, d], y [B, n] and queries x_query [B, d]."""
    chex.assert_rank([x, y, x_query], [3, 2, 2])
    chex.assert_shape(x, (None, cfg.n, cfg.d))
    params = effective_params(params, cfg)
    layers = _layers(params, cfg)
    if cfg.attention == "linear" and cfg.d + 1 <= _GRAM_MAX:
        layers_fn = _sparse_apply if cfg.parameterization == "sparse" else _gram_apply
        pred = layers_fn(_gram_tiles(x, y), x_query, layers, params["h"], cfg)
    else:
        layer_fn = _linear_layer if cfg.attention == "linear" else _softmax_layer
        z = tokens(x, y, x_query)
        for i, layer in enumerate(layers):
            z = layer_fn(z, layer, cfg, query_only=i == len(layers) - 1)
        pred = z @ params["h"]
    chex.assert_shape(pred, (x.shape[0],))
    return pred


def apply_naive(params: Params, x: jax.Array, y: jax.Array, x_query: jax.Array, cfg: Config) -> jax.Array:
    """Test oracle: the same model through the explicit (n+1) x n score matrix."""
    if cfg.attention != "linear":
        return apply(params, x, y, x_query, cfg)
    params = effective_params(params, cfg)
    z = tokens(x, y, x_query)
    n = cfg.n
    for layer in _layers(params, cfg):
        wk, wq, wv = (_per_head(layer[k], cfg) for k in ("W_K", "W_Q", "W_V"))
        zc = z[:, :n]
        q = jnp.einsum("bjr,hkr->bhjk", z, wq)
        k = jnp.einsum("bir,hkr->bhik", zc, wk)
        v = jnp.einsum("bir,hlr->bhil", zc, wv)
        scores = jnp.einsum("bhjk,bhik->bhji", q, k)  # [B, H, n+1, n]
        z = z + jnp.einsum("bhji,bhil->bjl", scores, v) / n
    return z[:, n] @ params["h"]


def gd_params(cfg: Config, gammas: Any, x_maps: Any = None) -> Params:
    """Exact weights of k = depth steps of preconditioned GD from w_0 = 0 (and, with ``x_maps``,
    of Ahn et al.'s general form).

    Step l is w_{l+1} = w_l + (1/n) Gamma_l X^T (y - X w_l) (GD on (1/2n)||Xw - y||^2 with
    preconditioner Gamma_l; Gamma_l = eta I is plain GD), and the model predicts x_q^T w_L.
    For depth 1 this is yhat = (1/n) x_q^T Gamma X^T y. Construction (von Oswald et al. 2023,
    Prop. 1; Ahn et al. 2023, Lemma 1, in their signs): W_K = [I_d 0], W_Q = [-Gamma_l^T 0] (so
    Q_l = W_K^T W_Q = [[A_l, 0], [0, 0]] with A_l = -Gamma_l^T), W_V = e e^T (P_l's y -> y entry 1)
    and h = -e with e = e_{d+1}: each layer subtracts the step from every token's y entry, so
    context rows carry the residuals y_i - x_i^T w_l and the query row carries -x_q^T w_l.

    ``gammas``: a scalar step size, a [d, d] matrix, or a list of either (one per layer).
    ``x_maps``: the same for B_l, the x -> x block of W_V (Ahn et al. 2023, Sec. 6: P_l =
    [[B_l, 0], [0, 1]]); every x token then moves by x_j <- x_j + B_l Sigma_hat_l A_l x_j. None
    (B_l = 0) is L-step PGD; other B_l need --parameterization=full or block.
    Needs linear attention and key_size >= d.
    """
    d = cfg.d
    if cfg.attention != "linear":
        raise ValueError("gd_params needs --attention=linear")
    if cfg.k < d:
        raise ValueError(f"gd_params needs key_size >= d={d}, got {cfg.k}")
    mats = _per_layer(cfg, gammas, "preconditioners")
    xmaps = _per_layer(cfg, 0.0 if x_maps is None else x_maps, "x maps")
    if x_maps is not None and cfg.parameterization == "sparse":
        raise ValueError("x_maps (B_l) need --parameterization=full or block; sparse fixes B_l = 0")
    layers = []
    for g, b in zip(mats[: num_param_layers(cfg)], xmaps):
        wk = np.zeros((cfg.k, d + 1))
        wk[:d, :d] = np.eye(d)
        wq = np.zeros((cfg.k, d + 1))
        wq[:d, :d] = -g.T
        wv = np.zeros((d + 1, d + 1))
        wv[d, d] = 1.0
        wv[:d, :d] = b
        layer = {"W_K": wk, "W_Q": wq, "W_V": wv}
        if cfg.heads > 1:  # the whole step in head 0, other heads silent (their A is 0)
            layer = {name: np.concatenate([w[None], np.zeros((cfg.heads - 1, *w.shape))]) for name, w in layer.items()}
        layers.append({name: jnp.asarray(w, float) for name, w in layer.items()})  # float32 (float64 under x64)
    h = np.zeros(d + 1)
    h[d] = -1.0
    return {"layers": layers, "h": jnp.asarray(h, float)}


def _per_layer(cfg: Config, values: Any, what: str) -> list[np.ndarray]:
    """One [d, d] matrix per layer from a scalar, a matrix, or a list of either."""
    if not isinstance(values, (list, tuple)):
        values = [values] * cfg.depth
    if len(values) != cfg.depth:
        raise ValueError(f"need {cfg.depth} {what}, got {len(values)}")
    mats = [np.asarray(g, np.float64) * (np.eye(cfg.d) if np.ndim(g) == 0 else 1.0) for g in values]
    if cfg.tie_weights and any(not np.allclose(m, mats[0]) for m in mats):
        raise ValueError(f"tied weights need the same {what} in every layer")
    return mats
