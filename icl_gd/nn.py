"""Flax NNX modules over icl-gd's LSA, so a trained stack drops into a larger Flax model.

The modules hold the icl-gd params pytree as ``nnx.Param`` variables under the same names
(``layers[l].W_K``, ``W_Q``, ``W_V`` and ``h``) and compute nothing themselves: the forward
gathers the variables into a ``Params`` pytree and calls ``icl_gd.model`` (``apply``, or its
per-layer functions), so the masks of ``sparse``/``block``, heads, tied layers, softmax and the
1/n factor (n = ``cfg.n``) are exactly those of training. Each layer is the residual update of
Ahn et al. 2023 (arXiv 2306.00297), eq. (2), Z <- Z + (1/n) P Z M (Z^T Q Z), in the row-token
form of ``icl_gd.model``.

``LSA.from_params(params, cfg)`` / ``params_to_state`` go from a pytree (e.g. ``run.params``) to
the module / its ``nnx.State``; ``LSA.to_params`` / ``state_to_params`` come back, bit-exact,
so fine-tuned weights go straight back into icl-gd's analysis (``icl_gd.theory``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from icl_gd import model
from icl_gd.config import Config
from icl_gd.model import Params

_LAYER_NAMES = ("W_K", "W_Q", "W_V")


def _check(params: Params, cfg: Config) -> None:
    """Refuse a pytree that does not fit ``cfg`` (e.g. a run's params with another config)."""
    chex.assert_trees_all_equal_shapes(
        {"layers": list(params["layers"]), "h": params["h"]}, model.masks(cfg), custom_message=
        "params do not fit this config (layer count, heads, key_size or d)")


class LSALayer(nnx.Module):
    """One residual LSA layer: ``W_K``, ``W_Q`` [(H,) k, d+1], ``W_V`` [(H,) d+1, d+1] as
    ``nnx.Param``s. Call it on tokens to interleave other Flax blocks between LSA layers."""

    def __init__(self, layer: Params, cfg: Config):
        self.cfg = cfg
        self.W_K = nnx.Param(jnp.asarray(layer["W_K"]))
        self.W_Q = nnx.Param(jnp.asarray(layer["W_Q"]))
        self.W_V = nnx.Param(jnp.asarray(layer["W_V"]))

    def to_params(self) -> Params:
        """This layer's entry of the pytree: {'W_K', 'W_Q', 'W_V'} as stored (masks not applied)."""
        return {name: getattr(self, name)[...] for name in _LAYER_NAMES}

    def effective(self) -> Params:
        """The weights the forward pass uses (``model.effective_params``: sparse/block masks and
        their fixed entries), computed by the model's own function on a one-layer stack."""
        one = dataclasses.replace(self.cfg, depth=1, tie_weights=False)
        stack = {"layers": [self.to_params()], "h": jnp.zeros(self.cfg.d + 1, self.W_K.dtype)}
        return model.effective_params(stack, one)["layers"][0]

    def __call__(self, z: jax.Array) -> jax.Array:
        """Tokens z [B, n+1, d+1] (context rows, then the query row; n = ``cfg.n``, the 1/n
        factor) -> every token after the layer, z_j <- z_j + (1/n) sum_i (z_i^T W_K^T W_Q z_j) W_V z_i
        (Ahn et al. 2023, eq. (2); softmax attention with ``cfg.attention='softmax'``)."""
        chex.assert_shape(z, (None, self.cfg.n + 1, self.cfg.d + 1))
        layer_fn = model._linear_layer if self.cfg.attention == "linear" else model._softmax_layer
        return layer_fn(z, self.effective(), self.cfg, query_only=False)


class LSA(nnx.Module):
    """The LSA stack of ``cfg`` with its readout ``h``; ``module(x, y, x_query)`` equals
    ``model.apply(module.to_params(), x, y, x_query, cfg)`` and ``Run.predict``.

    ``layers`` holds ``num_param_layers(cfg)`` ``LSALayer``s (one when ``cfg.tie_weights``: it is
    then applied ``cfg.depth`` times, as in training).
    """

    def __init__(self, cfg: Config, params: Params | None = None, *, rngs: nnx.Rngs | None = None):
        """From ``params`` (e.g. ``run.params``), or freshly initialised as icl-gd does
        (``model.init_params``, masked entries at their fixed values) from ``rngs.params()``."""
        if params is None:
            if rngs is None:
                raise ValueError("LSA needs params or rngs")
            params = model.init_params(rngs.params(), cfg)
        _check(params, cfg)
        self.cfg = cfg
        self.layers = nnx.List([LSALayer(layer, cfg) for layer in params["layers"]])
        self.h = nnx.Param(jnp.asarray(params["h"]))

    @classmethod
    def from_params(cls, params: Params, cfg: Config) -> LSA:
        """The module holding ``params`` (e.g. ``run.params``), checked against ``cfg``'s shapes."""
        return cls(cfg, params)

    def to_params(self) -> Params:
        """The icl-gd pytree ``{'layers': [{'W_K', 'W_Q', 'W_V'}, ...], 'h'}`` of the current values."""
        return {"layers": [layer.to_params() for layer in self.layers], "h": self.h[...]}

    def __call__(self, x: jax.Array, y: jax.Array, x_query: jax.Array) -> jax.Array:
        """Predictions [B] for x [B, n, d], y [B, n], x_query [B, d] through ``model.apply`` (its
        Gram-matrix path: O((d+1)^4) per task and layer, independent of n)."""
        return model.apply(self.to_params(), jnp.asarray(x), jnp.asarray(y), jnp.asarray(x_query), self.cfg)

    def tokens(self, x: jax.Array, y: jax.Array, x_query: jax.Array) -> jax.Array:
        """Every token after the stack, [B, n+1, d+1] (query row last), through the layers one at a
        time: the hidden state to feed other Flax blocks; ``readout(out[:, -1])`` is the prediction."""
        z = model.tokens(jnp.asarray(x), jnp.asarray(y), jnp.asarray(x_query))
        for layer in ([self.layers[0]] * self.cfg.depth if self.cfg.tie_weights else self.layers):
            z = layer(z)
        return z

    def readout(self, z_query: jax.Array) -> jax.Array:
        """yhat = h^T z_q for query rows [..., d+1] (h = -e_{d+1} fixed for sparse/block: Ahn et al.
        2023, eq. (2), the prediction is -Z_L[d+1, n+1])."""
        return z_query @ model.effective_params(self.to_params(), self.cfg)["h"]


def params_to_state(params: Params, cfg: Config) -> nnx.State:
    """The ``nnx.State`` of ``nnx.Param``s an ``LSA`` of ``cfg`` holding ``params`` has (for
    ``nnx.update(module, state)`` or ``nnx.merge``)."""
    return nnx.state(LSA(cfg, params), nnx.Param)


def state_to_params(state: nnx.State | LSA | Any) -> Params:
    """The icl-gd pytree of an ``LSA``, its ``nnx.state`` or that state's ``nnx.to_pure_dict``."""
    if isinstance(state, LSA):
        return state.to_params()
    if isinstance(state, nnx.State):
        state = nnx.to_pure_dict(state)
    layers = state["layers"]
    layers = [layers[i] for i in sorted(layers)] if isinstance(layers, Mapping) else list(layers)
    return {"layers": [{name: layer[name] for name in _LAYER_NAMES} for layer in layers], "h": state["h"]}
