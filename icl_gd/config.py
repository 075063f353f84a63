"""The immutable run configuration: one frozen dataclass, validated before anything compiles.

Every field is also an absl flag of ``launch.train`` (see ``launch/flags.py``), with the
field's ``help`` metadata as its help text, so the flags and the config never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

COVARIANCES = ("isotropic", "cond", "eigenvalues")
X_DISTS = ("gaussian", "sphere", "student_t", "uniform")
WEIGHT_PRIORS = ("identity", "inverse", "eigenvalues")
NOISE_DISTS = ("gaussian", "laplace", "heteroscedastic")
TARGETS = ("linear", "tanh", "relu_net")
PARAMETERIZATIONS = ("full", "sparse", "block")
ATTENTIONS = ("linear", "softmax")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")

# Training defaults of a parameterisation, used for every field the caller leaves unset
# (``Config.create``; the launchers' flags). The general form's optimum sits at large |a_l| (about 10
# in layer 3 at d=5, n=20, times Sigma^-1's eigenvalues) behind a heavy-tailed per-prompt loss.
# Adam's beta2 = 0.999 remembers the rare huge gradients for too long and lr 3e-3 moves too
# slowly; a global-norm clip of 1e-3 rescales every gradient to that norm (Ahn et al.'s code clips
# each matrix to 1e-3), so Adam's moments see directions, not the tail (docs/RESULTS.md, ahn_general).
RECIPES: dict[str, dict[str, Any]] = {"block": {"lr": 0.1, "b2": 0.9, "clip_norm": 1e-3}}

# Fields that change bookkeeping only, never the trained parameters: a run may be resumed
# with different values for these.
MAX_COND = 1e8  # largest --cond: Sigma^-1/2 and the tasks are float32
OPERATIONAL_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_tasks")
# Largest --depth: the layers are unrolled in the traced program, so compile time grows with depth
# (train step + held-out eval at d=5 on a 2-core CPU under load 8: 21 s at depth 8, 40 s at 32,
# 161 s at 64, 239 s at 128; depth 1000 ran for over 5 minutes).
MAX_DEPTH = 64


class ConfigError(ValueError):
    """A config field or flag holds a value outside its allowed range."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"--{field}={value!r} is invalid: {allowed}")


class ConfigMismatchError(ValueError):
    """The workdir holds a run trained with a different config."""


class ConfigFileError(ValueError):
    """A config file (a run's config.json) cannot be read as a Config: damaged, or an unknown field."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors absl's argument name
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run. Frozen: derive variants with ``dataclasses.replace``."""

    # --- task distribution -------------------------------------------------------------
    d: int = _f(5, "Covariate dimension d.")
    n: int = _f(20, "Context length n (number of (x_i, y_i) pairs before the query).")
    covariance: str = _f("isotropic", f"Spectrum of Sigma: one of {COVARIANCES}.")
    cond: float = _f(10.0, "Condition number for --covariance=cond (eigenvalues 1 .. 1/cond, geometric).")
    eigenvalues: tuple[float, ...] = _f((), "Explicit eigenvalues of Sigma (length d) for --covariance=eigenvalues.")
    rotate: bool = _f(True, "Rotate the spectrum by a random orthogonal matrix (cond/eigenvalues).")
    rotation_seed: int = _f(0, "Seed of the random rotation of Sigma.")
    x_dist: str = _f("gaussian", f"Law of the covariates, all with E[x x^T] = Sigma: one of {X_DISTS}.")
    dof: float = _f(5.0, "Degrees of freedom of --x_dist=student_t (heavy-tailed radius); must be > 2.")
    weight_prior: str = _f("identity", "Prior of w: identity (w ~ N(0, I)), inverse (w ~ N(0, Sigma^-1)) or "
                                       "eigenvalues (w ~ N(0, Omega), Omega's spectrum --prior_eigenvalues).")
    prior_eigenvalues: tuple[float, ...] = _f((), "Eigenvalues of Omega = E[w w^T] (length d) for "
                                                  "--weight_prior=eigenvalues, rotated like Sigma's spectrum "
                                                  "(--rotate/--rotation_seed, also when Sigma is isotropic).")
    prior_mean: float = _f(0.0, "Norm c of the mean of w: w ~ N(c u, Omega), u the first eigenvector of Omega "
                                 "(e_1 unless rotated). c > 0 breaks the negation symmetry w -> -w of the task law.")
    noise: float = _f(0.0, "Label noise std sigma (eps ~ N(0, sigma^2) on every pair, the query included).")
    noise_dist: str = _f("gaussian", f"Law of the label noise, all of variance sigma^2: one of {NOISE_DISTS}.")
    x_scale: float = _f(1.0, "Stretch of the covariates: x -> x_scale x, so Sigma -> x_scale^2 Sigma while the "
                              "weight prior stays that of the unstretched Sigma (distribution shifts at test time).")
    w_scale: float = _f(1.0, "Stretch of the task weights: w -> w_scale w, so Omega -> w_scale^2 Omega.")
    target: str = _f("linear", f"Target family f(x): one of {TARGETS}.")
    relu_width: int = _f(16, "Hidden width of the random two-layer ReLU target (--target=relu_net).")
    # --- model ---------------------------------------------------------------------------
    depth: int = _f(1, "Number of attention layers L.")
    heads: int = _f(1, "Attention heads per layer (outputs summed).")
    key_size: int = _f(0, "Rows of W_K and W_Q; 0 means d+1.")
    parameterization: str = _f("full", f"Weight structure: one of {PARAMETERIZATIONS} "
                                       "(sparse: Ahn et al.'s PGD form; block: their general form "
                                       "with learned x -> x value blocks B_l; both with a fixed readout).")
    attention: str = _f("linear", f"Attention kind: one of {ATTENTIONS}.")
    tie_weights: bool = _f(False, "Share one set of layer weights across all layers.")
    init_scale: float = _f(0.2, "Std of the Gaussian initialisation of every weight.")
    # --- optimisation --------------------------------------------------------------------
    optimizer: str = _f("adam", f"Optimiser: one of {OPTIMIZERS}.")
    lr: float = _f(3e-3, "Peak learning rate.")
    schedule: str = _f("cosine", f"Learning-rate schedule: one of {SCHEDULES}.")
    warmup_steps: int = _f(0, "Linear warm-up steps for --schedule=warmup_cosine.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw only).")
    b1: float = _f(0.9, "Adam/AdamW first-moment decay beta1.")
    b2: float = _f(0.999, "Adam/AdamW second-moment decay beta2 (Ahn et al.'s code uses 0.9).")
    clip_norm: float = _f(0.0, "Global-norm gradient clipping threshold; 0 disables it.")
    batch_size: int = _f(1024, "Fresh tasks per training step.")
    steps: int = _f(4000, "Training steps.")
    seed: int = _f(0, "Seed of initialisation, training tasks and the held-out set.")
    # --- bookkeeping ---------------------------------------------------------------------
    eval_tasks: int = _f(65536, "Size of the fixed held-out evaluation set.")
    log_every: int = _f(500, "Steps per compiled call; metrics are logged at these boundaries.")
    checkpoint_every: int = _f(1000, "Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = _f(3, "How many recent checkpoints to keep.")

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Flags and JSON give lists; keep the dataclass hashable and immutable.
        object.__setattr__(self, "eigenvalues", tuple(float(v) for v in self.eigenvalues))
        object.__setattr__(self, "prior_eigenvalues", tuple(float(v) for v in self.prior_eigenvalues))

    @classmethod
    def create(cls, **fields: Any) -> Config:
        """A Config with the parameterisation's ``RECIPES`` defaults for every field not given."""
        recipe = RECIPES.get(fields.get("parameterization", cls.parameterization), {})
        return cls(**{**recipe, **fields})

    @property
    def k(self) -> int:
        """Key/query width."""
        return self.key_size or self.d + 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eigenvalues"] = list(self.eigenvalues)
        out["prior_eigenvalues"] = list(self.prior_eigenvalues)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        unknown = cls.unknown_fields(data)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], f"unknown field; known fields: {cls.field_names()}")
        return cls(**data)

    @classmethod
    def field_names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def unknown_fields(cls, data: dict[str, Any]) -> list[str]:
        """The keys of ``data`` that are no Config field, sorted."""
        return sorted(set(data) - set(cls.field_names()))

    def differences(self, other: Config, ignore: tuple[str, ...] = OPERATIONAL_FIELDS) -> dict[str, tuple]:
        """Fields (other than ``ignore``) whose values differ: {name: (self, other)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}

    def validate(self) -> Config:
        """Raise ``ConfigError`` naming the first bad field; return self when all is well."""
        _choice(self, "covariance", COVARIANCES)
        _choice(self, "x_dist", X_DISTS)
        _choice(self, "weight_prior", WEIGHT_PRIORS)
        _choice(self, "target", TARGETS)
        _choice(self, "noise_dist", NOISE_DISTS)
        _choice(self, "parameterization", PARAMETERIZATIONS)
        _choice(self, "attention", ATTENTIONS)
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "schedule", SCHEDULES)
        for name in ("d", "n", "depth", "heads", "batch_size", "steps", "eval_tasks",
                     "log_every", "checkpoint_every", "keep_checkpoints", "relu_width"):
            _at_least(self, name, 1)
        if self.depth > MAX_DEPTH:
            raise ConfigError("depth", self.depth, f"must be <= {MAX_DEPTH}: the layers are unrolled, so compiling "
                              "takes minutes beyond that (about 3 min at depth 64 on a 2-core CPU)")
        for name in ("key_size", "warmup_steps", "seed", "rotation_seed"):
            _at_least(self, name, 0)
        _real(self, "noise", lo=0.0)
        _real(self, "prior_mean", lo=0.0)
        _real(self, "x_scale", lo=0.0, strict=True)
        _real(self, "w_scale", lo=0.0, strict=True)
        _real(self, "weight_decay", lo=0.0)
        _real(self, "clip_norm", lo=0.0)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0):
                raise ConfigError(name, value, "must be a number in [0, 1)")
        _real(self, "init_scale", lo=0.0, strict=True)
        _real(self, "lr", lo=0.0, strict=True)
        _real(self, "cond", lo=1.0)
        if self.cond > MAX_COND:
            raise ConfigError("cond", self.cond, f"must be <= {MAX_COND:g} (tasks are drawn in float32)")
        _real(self, "dof", lo=2.0, strict=True)
        _spectrum(self, "eigenvalues", self.covariance == "eigenvalues", "--covariance=eigenvalues")
        _spectrum(self, "prior_eigenvalues", self.weight_prior == "eigenvalues", "--weight_prior=eigenvalues")
        if self.warmup_steps and self.schedule != "warmup_cosine":
            raise ConfigError("warmup_steps", self.warmup_steps, "only --schedule=warmup_cosine uses it")
        if self.weight_decay and self.optimizer != "adamw":
            raise ConfigError("weight_decay", self.weight_decay, "only --optimizer=adamw uses weight decay")
        if self.warmup_steps >= self.steps and self.schedule == "warmup_cosine":
            raise ConfigError("warmup_steps", self.warmup_steps, f"must be < --steps={self.steps}")
        return self


def _choice(cfg: Config, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(name, value, f"allowed values are {', '.join(allowed)}")


def _at_least(cfg: Config, name: str, lo: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(name, value, f"must be an integer >= {lo}")


def _real(cfg: Config, name: str, lo: float, strict: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if strict else value >= lo)
    if not ok:
        raise ConfigError(name, value, f"must be a finite number {'>' if strict else '>='} {lo}")


def _spectrum(cfg: Config, name: str, used: bool, user: str) -> None:
    """A spectrum field: d finite, positive values where ``user`` reads it, else empty (a value nobody
    reads must not be stored: NaN != NaN would block every resume)."""
    values = getattr(cfg, name)
    if not used:
        if values:
            raise ConfigError(name, list(values), f"only {user} uses it")
        return
    if len(values) != cfg.d:
        raise ConfigError(name, list(values), f"need exactly d={cfg.d} values")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(name, list(values), "every eigenvalue must be finite and > 0")
