"""Classical in-context regressors, vectorised over tasks, scored on a run's held-out tasks.

Every predictor maps a ``Tasks`` batch (and arrays of numbers) to yhat [B] and uses all n
context pairs. ``evaluate`` scores a set of them on exactly the held-out tasks of
``train.make_eval`` (chunk j drawn from fold_in(run_keys(seed)['eval'], j)), so a baseline's loss
and the trained model's eval loss differ only by the predictor, never by the sample.

* ``zero_predict``: yhat = 0 (the loss is E[y_q^2], the scale of the problem).
* ``theory.one_step_predict`` / ``theory.scaled_pgd_predict``: one or k steps of GD (P = I) or
  of GD preconditioned by the oracle Sigma^-1, step sizes tuned (``tuned_steps``).
* ``posterior_mean_predict``: ridge with the Bayes-optimal penalty, the posterior mean of w under
  the Gaussian prior N(0, Omega) and Gaussian noise: optimal among all predictors for linear targets.
* ``ols_predict``: least squares through the pseudo-inverse (minimum-norm when n < d).

Where each predictor runs: the ones built from matrix products (zero, GD/PGD, the model) run as
XLA programs, one per predictor and shape, on each held-out chunk; the two that need LAPACK (OLS's
pseudo-inverse, the posterior mean's solve) run in NumPy, in float64, on the same chunk copied to
the host (``Predictor.on_host``). XLA:CPU programs that mix a LAPACK custom call with the rest of
the predictor stack can wedge for ever (docs/XLA_CPU_HANG.md); keeping LAPACK out of every XLA
program removes the trigger, and float64 makes OLS exact to ~1e-12 rather than ~1e-4.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import theory, watchdog
from icl_gd.config import Config
from icl_gd.data import (
    DISTRIBUTION_FIELDS,
    Tasks,
    TaskSpec,
    covariance_matrix,
    distribution,
    prior_covariance,
    sample_tasks,
)
from icl_gd.keys import eval_chunks, run_keys, tune_key
from icl_gd.model import apply, gd_params
from icl_gd.theory import general_form, probes


# ---------------------------------------------------------------------------------------
# Predictors: (tasks, *arrays) -> yhat [B].
# ---------------------------------------------------------------------------------------
def zero_predict(tasks: Tasks) -> jax.Array:
    """yhat = 0."""
    return jnp.zeros_like(tasks.y_query)


def ols_weights(x: Any, y: Any) -> np.ndarray:
    """w = X^+ y (float64, NumPy): least squares for n >= d (exact on noiseless data), the
    minimum-norm interpolant for n < d."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[-2] < x.shape[-1]:
        return np.einsum("bdn,bn->bd", np.linalg.pinv(x), y)
    # n >= d: X has full column rank almost surely; R w = Q^T y is the same least squares, backward
    # stable like the SVD, and 5x faster batched (the SVDs were ~10% of a reproduction's analysis).
    q, r = np.linalg.qr(x)
    return np.linalg.solve(r, np.einsum("bnd,bn->bd", q, y)[..., None])[..., 0]


def ols_predict(tasks: Tasks) -> np.ndarray:
    return np.einsum("bd,bd->b", np.asarray(tasks.x_query, np.float64), ols_weights(tasks.x, tasks.y))


def posterior_mean_weights(x: Any, y: Any, omega_inv: Any, noise: float) -> np.ndarray:
    """E[w | X, y] = (X^T X + sigma^2 Omega^-1)^-1 X^T y for w ~ N(0, Omega), eps ~ N(0, sigma^2), sigma > 0.

    The Gaussian posterior mean (Bishop 2006, eq. (3.53) with S_0 = Omega, beta = 1/sigma^2): ridge
    with the Bayes-optimal penalty sigma^2 Omega^-1. Float64, NumPy.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gram = np.einsum("bnd,bne->bde", x, x) + float(noise) ** 2 * np.asarray(omega_inv, np.float64)
    return np.linalg.solve(gram, np.einsum("bnd,bn->bd", x, y)[..., None])[..., 0]


def noiseless_posterior_mean_weights(x: Any, y: Any, omega_sqrt: Any) -> np.ndarray:
    """E[w | X, y] at sigma = 0: Omega^1/2 (X Omega^1/2)^+ y, the Omega^-1-norm-minimal interpolant
    (the sigma -> 0 limit of ``posterior_mean_weights``; OLS when n >= d). Float64, NumPy."""
    omega_sqrt = np.asarray(omega_sqrt, np.float64)
    return np.einsum("de,be->bd", omega_sqrt, ols_weights(np.asarray(x, np.float64) @ omega_sqrt, y))


def posterior_mean_predict(tasks: Tasks, omega_inv: Any, noise: float) -> np.ndarray:
    return np.einsum("bd,bd->b", np.asarray(tasks.x_query, np.float64),
                     posterior_mean_weights(tasks.x, tasks.y, omega_inv, noise))


def noiseless_posterior_mean_predict(tasks: Tasks, omega_sqrt: Any) -> np.ndarray:
    return np.einsum("bd,bd->b", np.asarray(tasks.x_query, np.float64),
                     noiseless_posterior_mean_weights(tasks.x, tasks.y, omega_sqrt))


# The Config fields ``model.apply`` reads: configs equal on them run the same program.
MODEL_FIELDS = ("d", "n", "depth", "parameterization", "heads", "key_size", "attention", "tie_weights")


def model_predictor(cfg: Config) -> Callable:
    """The trained model as a predictor (tasks, params) -> yhat. One function per model shape
    (``MODEL_FIELDS``), so every run of one shape shares a jit key: members of a depth ladder or a
    covariance sweep compile their held-out program once (a compile costs ~2.5 s at d=5)."""
    return _model_predictor(tuple(getattr(cfg, f) for f in MODEL_FIELDS))


@functools.lru_cache(maxsize=32)
def _model_predictor(fields: tuple) -> Callable:
    cfg = Config(**dict(zip(MODEL_FIELDS, fields)))

    def predict(tasks: Tasks, params: Any) -> jax.Array:
        return apply(params, tasks.x, tasks.y, tasks.x_query, cfg)

    return predict


# ---------------------------------------------------------------------------------------
# Evaluation on the held-out set of a run.
# ---------------------------------------------------------------------------------------
class Predictor(NamedTuple):
    """A named predictor: ``fn(tasks, *args)``; ``fn`` must be hashable (a module-level function).

    ``on_host``: ``fn`` is NumPy code run on host copies of the tasks (the LAPACK-based
    baselines); otherwise it is traced into the held-out XLA program.
    """

    name: str
    fn: Callable
    args: tuple = ()
    on_host: bool = False


@functools.partial(jax.jit, static_argnames="fn")
def _squared_errors(fn: Callable, tasks: Tasks, args: tuple) -> jax.Array:
    """Per-task squared query errors of one device predictor on one materialised chunk. Its compile key is
    (fn, shapes) alone, not the task law: one program per predictor and shape serves every run of the
    reproduction (one program per run's predictor set, sampler fused in, had cost ~90 compiles, ~3.5 min)."""
    return (fn(tasks, *args) - tasks.y_query) ** 2


@functools.partial(jax.jit, static_argnames=("spec", "size"))
def heldout_chunk(key: jax.Array, j: jax.Array, dist, spec: TaskSpec, size: int) -> Tasks:
    """Held-out chunk j: the tasks ``train.make_eval`` scores (compiled once per task shape and law; eager,
    the unrolled sampler would be dispatched and compiled op by op, ~3 s a call)."""
    return sample_tasks(jax.random.fold_in(key, j), dist, spec, size)


def heldout_squared_errors(cfg: Config, predictors: list[Predictor]) -> dict[str, np.ndarray]:
    """Per-task squared query errors of every predictor on the run's held-out tasks.

    Each chunk is drawn once (``heldout_chunk``) and scored by every predictor: device predictors in
    their own small programs (``_squared_errors``, dispatched asynchronously), host predictors on a
    float64 copy.
    """
    num, size = eval_chunks(cfg)
    key, dist, spec = run_keys(cfg.seed)["eval"], distribution(cfg), TaskSpec.from_config(cfg)
    parts: dict[str, list] = {p.name: [] for p in predictors}
    on_host = [p for p in predictors if p.on_host]
    kinds = f"{len(predictors) - len(on_host)} XLA and {len(on_host)} NumPy predictors"
    with watchdog.stage(f"held-out evaluation ({kinds}, {num * size} tasks)"):
        for j in range(num):
            tasks = heldout_chunk(key, j, dist, spec, size)
            for p in predictors:
                if not p.on_host:
                    parts[p.name].append(_squared_errors(p.fn, tasks, tuple(p.args)))
            if on_host:
                host = Tasks(*(np.asarray(a, np.float64) for a in tasks))
                for p in on_host:
                    parts[p.name].append((p.fn(host, *p.args) - host.y_query) ** 2)
    return {name: np.concatenate([np.asarray(e, np.float64) for e in v]) for name, v in parts.items()}


def mean_and_stderr(errors: np.ndarray) -> dict[str, float]:
    """Mean squared error, its standard error, and the median per-task squared error (robust where a
    few prompts dominate the mean, e.g. polynomial predictors at small n)."""
    return {"loss": float(errors.mean()), "stderr": float(errors.std(ddof=1) / np.sqrt(errors.size)),
            "median": float(np.median(errors))}


def tuned_steps(cfg: Config, precond: np.ndarray, max_steps: int, num_tasks: int = 2**15) -> list[np.ndarray]:
    """Tuned step sizes of k = 1..max_steps steps of GD with preconditioner P, fit on ``tune_key`` tasks.

    k = 1 with a closed form uses the exact optimum ``theory.best_scale``; otherwise
    ``theory.optimal_step_sizes`` (L-BFGS on a fixed Monte-Carlo sample).
    """
    dist, spec = distribution(cfg), TaskSpec.from_config(cfg)
    out = []
    for k in range(1, max_steps + 1):
        if k == 1 and theory.has_closed_form(cfg):
            sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
            out.append(np.array([theory.best_scale(precond, sigma, omega, cfg.n, cfg.noise, cfg.noise_dist,
                                                        cfg.x_dist, cfg.dof)]))
        else:
            with watchdog.stage(f"tuning {k}-step (P)GD step sizes on {num_tasks} tasks"):
                etas = theory.optimal_step_sizes(tune_key(cfg.seed), dist, spec, precond, k, max_steps, num_tasks)
            out.append(etas[:k])
    return out


def baseline_predictors(cfg: Config, max_steps: int, gamma_one_layer: np.ndarray | None = None,
                        num_tune_tasks: int = 2**15) -> tuple[list[Predictor], dict[str, dict]]:
    """The standard baselines for a config and their tuned numbers.

    Names: zero, ols, bayes (posterior mean; linear targets only), one_layer_opt (yhat with
    Gamma = ``gamma_one_layer``, the best one-layer LSA, when given), gd_k and pgd_k (k steps of
    GD / Sigma^-1-preconditioned GD) for k = 1..max_steps. Returns (predictors, info by name).
    """
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    preds = [Predictor("zero", zero_predict), Predictor("ols", ols_predict, on_host=True)]
    info: dict[str, dict] = {"zero": {"description": "yhat = 0"},
                             "ols": {"description": "least squares, pseudo-inverse (min-norm when n < d)"}}
    if cfg.target == "linear":
        omega = prior_covariance(cfg)
        if cfg.noise > 0:
            preds.append(Predictor("bayes", posterior_mean_predict, (np.linalg.inv(omega), cfg.noise), on_host=True))
        else:
            preds.append(Predictor("bayes", noiseless_posterior_mean_predict,
                                   (np.asarray(distribution(cfg).prior_sqrt, np.float64),), on_host=True))
        info["bayes"] = {"description": "ridge with the Bayes-optimal penalty (posterior mean of w)"}
    if gamma_one_layer is not None:
        preds.append(Predictor("one_layer_opt", theory.one_step_predict, (f32(gamma_one_layer),)))
        info["one_layer_opt"] = {"description": "yhat = x_q^T Gamma* g, the best one-layer LSA"}
    for tag, precond in (("gd", np.eye(cfg.d)), ("pgd", theory.oracle_preconditioner(cfg))):
        for k, etas in enumerate(tuned_steps(cfg, precond, max_steps, num_tune_tasks), start=1):
            name = f"{tag}_{k}"
            preds.append(Predictor(name, theory.scaled_pgd_predict, (f32(etas), f32(precond))))
            info[name] = {"description": f"{k} step(s) of {'GD' if tag == 'gd' else 'Sigma^-1-preconditioned GD'}"
                                         ", tuned step sizes", "steps": k, "step_sizes": [float(e) for e in etas]}
    if general_form.has_general_form_optimum(cfg) and (cfg.depth > 1 or cfg.parameterization == "block"):
        preds += baseline_predictors_general(cfg, info, num_tune_tasks)
    return preds, info


def baseline_predictors_general(cfg: Config, info: dict[str, dict], num_prompts: int) -> list[Predictor]:
    """The general form at its (a, b) optimum (``general_form``, fit on ``num_prompts`` spectra) as the
    predictor 'general_form_opt': a block model with A_l = a_l Sigma^-1, B_l = b_l I; its numbers go into
    ``info``."""
    opt = general_form.config_general_form_optimum(cfg, num_prompts)
    block = general_form_config(cfg)
    sigma_inv = theory.oracle_preconditioner(cfg)
    params = gd_params(block, [-a * sigma_inv for a in opt.a], list(opt.b))
    info["general_form_opt"] = {
        "description": f"Ahn et al.'s general form at the (a, b) optimum: A_l = a_l Sigma^-1, B_l = b_l I, "
                       f"{cfg.depth} layers", **opt.to_dict()}
    return [Predictor("general_form_opt", model_predictor(block), (params,))]


def general_form_config(cfg: Config) -> Config:
    """The one-head, untied ``block`` model of ``cfg``'s task and depth (the (a, b) optimum's home)."""
    return dataclasses.replace(cfg, parameterization="block", attention="linear", heads=1, key_size=0,
                               tie_weights=False)


_BASELINE_CACHE: dict[tuple, tuple[dict[str, dict], dict[str, np.ndarray]]] = {}
_BASELINE_CACHE_SIZE = 8


def baseline_errors(cfg: Config, max_steps: int, gamma_one_layer: np.ndarray | None = None,
                    num_tune_tasks: int = 2**15) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """(info, per-task squared errors) of ``baseline_predictors`` on the run's held-out tasks.

    Memoised on everything they depend on: the task distribution with its seed and held-out size
    (``data.DISTRIBUTION_FIELDS``), max_steps, the tuning sample's size, Gamma* and, where the
    general form's optimum is among them, the depth. The members of a depth ladder or of a model
    comparison share one distribution, so their tuned GD/PGD, OLS and Bayes are computed once.
    """
    general = general_form.has_general_form_optimum(cfg) and (cfg.depth > 1 or cfg.parameterization == "block")
    gamma = None if gamma_one_layer is None else np.asarray(gamma_one_layer, np.float64).tobytes()
    key = (tuple(getattr(cfg, f) for f in DISTRIBUTION_FIELDS), max_steps, num_tune_tasks, gamma,
           cfg.depth if general else None)
    if key not in _BASELINE_CACHE:
        preds, info = baseline_predictors(cfg, max_steps, gamma_one_layer, num_tune_tasks)
        _BASELINE_CACHE[key] = (info, heldout_squared_errors(cfg, preds))
        while len(_BASELINE_CACHE) > _BASELINE_CACHE_SIZE:
            _BASELINE_CACHE.pop(next(iter(_BASELINE_CACHE)))
    return _BASELINE_CACHE[key]


def evaluate(cfg: Config, max_steps: int, params: Any = None, gamma_one_layer: np.ndarray | None = None,
             num_tune_tasks: int = 2**15) -> dict[str, dict]:
    """Loss and standard error of every baseline (and of the model, when ``params`` are given, as
    'model') on the run's held-out tasks; each entry also carries the baseline's tuned numbers and,
    with a model, ``paired_stderr``: the standard error of (model loss - baseline loss) on these tasks."""
    info, errors = baseline_errors(cfg, max_steps, gamma_one_layer, num_tune_tasks)
    info, errors = dict(info), dict(errors)
    if params is not None:
        errors |= heldout_squared_errors(cfg, [Predictor("model", model_predictor(cfg), (params,))])
        info["model"] = {"description": "the trained transformer"}
    out = {name: {**info[name], **mean_and_stderr(e)} for name, e in errors.items()}
    if "model" in errors:
        for name, e in errors.items():
            if name != "model":
                out[name]["paired_stderr"] = paired_stderr(errors["model"], e)
    return out


def paired_stderr(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) - mean(b) for per-task errors of two predictors on the SAME tasks: the
    spread of the per-task differences, which cancels the tasks' shared difficulty (far below the
    unpaired sqrt(se_a^2 + se_b^2) when the predictors are close)."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(diff.std(ddof=1) / np.sqrt(diff.size))


def depth_references(cfg: Config, params: Any, num_tune_tasks: int = 2**15) -> dict[str, Any]:
    """What a trained L-layer linear model (L > 1) is compared with at the end of a run, on its held-out tasks:

    the optimal L-step Sigma^-1-preconditioned GD (tuned steps, ``tuned_steps``) and its loss; for
    sparse and block models the learned per-layer steps eta_l (Gamma_l ~ eta_l Sigma^-1, sorted: the
    steps commute) and dist(Sigma^1/2 Gamma_l Sigma^1/2, I); for block models also the learned
    (a_l, b_l) beside the general form's (a, b) optimum and that optimum's loss (``general_form``).
    """
    sigma = covariance_matrix(cfg)
    precond = theory.oracle_preconditioner(cfg)
    steps = tuned_steps(cfg, precond, cfg.depth, num_tune_tasks)[-1]
    preds, info = [Predictor("pgd", theory.scaled_pgd_predict, (jnp.asarray(steps, jnp.float32),
                                                                 jnp.asarray(precond, jnp.float32)))], {}
    if general_form.has_general_form_optimum(cfg):
        preds += baseline_predictors_general(cfg, info, num_tune_tasks)
    errors = heldout_squared_errors(cfg, preds)
    out: dict[str, Any] = {"pgd_steps": sorted(float(e) for e in steps), "pgd_loss": float(errors["pgd"].mean())}
    if "general_form_opt" in errors:
        opt = info["general_form_opt"]
        out["general_form_opt"] = {"a": list(opt["a"]), "b": list(opt["b"]),
                                   "loss": float(errors["general_form_opt"].mean())}
    if cfg.parameterization in ("sparse", "block"):
        gammas, _ = probes.layer_preconditioners(params, cfg)
        out["layer_steps"] = sorted(probes.shape_fit(g, precond)[0] for g in gammas)
        out["layer_ahn_distances"] = [probes.ahn_distance(g, sigma) for g in gammas]
    if cfg.parameterization == "block":
        g = probes.general_form_layers(params, cfg, sigma)
        out.update(learned_a=g["a"], learned_b=g["b"])
    return out
