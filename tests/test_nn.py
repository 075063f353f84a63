"""The Flax NNX modules (icl_gd.nn): same predictions as model.apply and Run.predict, exact
pytree <-> nnx.State round trips, trainable inside a Flax model, and the README snippet runs."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import icl_gd
from icl_gd import model, nn
from icl_gd.config import Config
from icl_gd.data import TaskSpec, distribution, sample_tasks
from icl_gd.run import Run
from icl_gd.train import train

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_apply = jax.jit(model.apply, static_argnames="cfg")
_sample = jax.jit(sample_tasks, static_argnums=(2, 3))


@nnx.jit
def _call(module, x, y, x_query):
    return module(x, y, x_query)


@nnx.jit
def _via_tokens(module, x, y, x_query):
    return module.readout(module.tokens(x, y, x_query)[:, -1])


def _tasks(cfg: Config, batch: int = 8, seed: int = 1):
    return _sample(jax.random.PRNGKey(seed), distribution(cfg), TaskSpec.from_config(cfg), batch)


def _assert_same_tree(a, b):
    """Same structure, dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


VARIANTS = {
    "full": dict(),
    "sparse": dict(parameterization="sparse", depth=2),
    "block": dict(parameterization="block", depth=2),
    "heads": dict(heads=2, key_size=3),
    "softmax": dict(attention="softmax", depth=2),
    "tied": dict(tie_weights=True, depth=3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_module_matches_apply_and_predict(name):
    cfg = Config(d=3, n=6, init_scale=0.4, **VARIANTS[name])
    params = model.init_params(jax.random.PRNGKey(0), cfg)
    run = Run("", cfg, params, 0, [])
    module = run.flax_module()
    t = _tasks(cfg)
    out = _call(module, t.x, t.y, t.x_query)
    assert out.shape == (8,)
    np.testing.assert_allclose(out, run.predict(t.x, t.y, t.x_query), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, _apply(params, t.x, t.y, t.x_query, cfg=cfg), rtol=1e-6, atol=1e-7)
    # The layer-by-layer token path (model's per-layer functions) reaches the same prediction.
    # Another float32 summation order (as test_model's naive oracle): tolerance on the output's scale.
    scale = float(np.abs(out).max())
    np.testing.assert_allclose(_via_tokens(module, t.x, t.y, t.x_query), out, rtol=1e-5, atol=1e-5 * scale)
    assert len(module.layers) == model.num_param_layers(cfg)
    # pytree -> module -> pytree and pytree -> nnx.State -> pytree are bit-exact.
    _assert_same_tree(module.to_params(), params)
    state = nn.params_to_state(params, cfg)
    _assert_same_tree(nn.state_to_params(state), params)
    _assert_same_tree(nn.state_to_params(nnx.to_pure_dict(state)), params)
    fresh = nn.LSA(cfg, rngs=nnx.Rngs(5))
    nnx.update(fresh, state)
    _assert_same_tree(fresh.to_params(), params)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> str:
    """A real checkpoint (a few steps of icl_gd.train) at <tmp>/runs/default, the README's path."""
    workdir = tmp_path_factory.mktemp("nn") / "runs" / "default"
    cfg = Config(d=3, n=5, batch_size=32, steps=20, log_every=20, checkpoint_every=20, eval_tasks=64)
    train(cfg, str(workdir))
    return str(workdir)


def test_checkpointed_run(trained_run):
    run = icl_gd.load(trained_run)
    module = run.flax_module()
    t = _tasks(run.config, seed=3)
    out = _call(module, t.x, t.y, t.x_query)
    np.testing.assert_allclose(out, run.predict(t.x, t.y, t.x_query), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, _apply(run.params, t.x, t.y, t.x_query, cfg=run.config), rtol=1e-6, atol=1e-7)
    _assert_same_tree(nn.state_to_params(nnx.state(module, nnx.Param)), run.params)
    assert set(nnx.to_pure_dict(nnx.state(module, nnx.Param))["layers"][0]) == {"W_K", "W_Q", "W_V"}


def test_params_of_another_config_are_refused():
    cfg = Config(d=3, n=6, depth=2)
    params = model.init_params(jax.random.PRNGKey(0), Config(d=3, n=6, depth=1))
    with pytest.raises(AssertionError, match="do not fit"):
        nn.LSA.from_params(params, cfg)


class _LSAWithHead(nnx.Module):
    def __init__(self, lsa: nn.LSA, rngs: nnx.Rngs):
        self.lsa = lsa
        self.head = nnx.Linear(lsa.cfg.d + 1, 1, rngs=rngs)

    def __call__(self, x, y, x_query):
        z_query = self.lsa.tokens(x, y, x_query)[:, -1]
        return self.lsa.readout(z_query) + self.head(z_query)[:, 0]


def test_trainable_inside_a_flax_model():
    cfg = Config(d=3, n=6, depth=2, parameterization="sparse")
    net = _LSAWithHead(nn.LSA(cfg, rngs=nnx.Rngs(0)), nnx.Rngs(1))
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
    t = _tasks(cfg, batch=64)
    before = net.lsa.to_params()

    @nnx.jit
    def step(net, opt):
        def loss_fn(net):
            return ((net(t.x, t.y, t.x_query) - t.y_query) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, grads)
        return loss, grads

    loss, grads = step(net, opt)
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    after = net.lsa.to_params()
    mask = model.masks(cfg)
    for l in range(cfg.depth):
        for name in ("W_K", "W_Q", "W_V"):
            moved = np.asarray(after["layers"][l][name]) != np.asarray(before["layers"][l][name])
            learned = mask["layers"][l][name] == 1
            assert moved[learned].any(), (l, name)
            assert not moved[~learned].any(), (l, name)  # sparse's fixed entries get no gradient
    np.testing.assert_array_equal(after["h"], before["h"])  # sparse's readout is fixed


def test_readme_snippet_runs(trained_run, monkeypatch):
    text = README.read_text()
    section = text[text.index("## A trained LSA inside a Flax model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(pathlib.Path(trained_run).parents[1])  # the snippet loads runs/default
    scope: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), scope)
    assert np.isfinite(scope["loss"])
    run = icl_gd.load(trained_run)
    assert jax.tree.structure(scope["params"]) == jax.tree.structure(run.params)
    assert not np.array_equal(scope["params"]["layers"][0]["W_Q"], run.params["layers"][0]["W_Q"])


def test_import_icl_gd_does_not_load_flax():
    code = "import sys, icl_gd, icl_gd.run; assert not any(m.startswith('flax') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
