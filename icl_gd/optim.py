"""The optimiser of a run, built from its Config: optax Adam / AdamW (betas b1, b2) / SGD, a learning-rate
schedule (constant, cosine, warm-up + cosine) and optional global-norm clipping."""

from __future__ import annotations

import optax

from icl_gd.config import Config


def make_schedule(cfg: Config) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, cfg.steps)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    sched = make_schedule(cfg)
    if cfg.optimizer == "adam":
        opt = optax.adam(sched, b1=cfg.b1, b2=cfg.b2)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(sched)
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
