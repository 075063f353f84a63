"""The shared machinery of the experiments: sizes, the experiment record, outcomes, checks and panels."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from icl_gd.config import Config  # noqa: E402
from icl_gd.experiments.checks import LOSS_SLACK, Check, at_most  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    quick: bool = True
    steps: int = 0  # 0: the experiment's own length
    seed: int = 0  # every member's seed (benchmarks/seed_spread.py measures the spread over seeds)

    def base(self, length: float = 1.0, **fields: Any) -> Config:
        """The shared base config of this size, trained ``length`` times the usual steps
        (ill-conditioned and deep models converge slower); ``fields`` override it."""
        tiny = self.steps != 0  # smoke-test size: every code path, no claim expected to hold
        d, n = (2, 6) if tiny else (3, 10) if self.quick else (5, 20)
        steps = self.steps or int(length * (2000 if self.quick else 4000))
        batch = 128 if tiny else 1024
        log_every = -(-steps // 2) if tiny else max(1, min(500, steps // 4))  # tiny: one compiled length
        defaults = dict(d=d, n=n, steps=steps, batch_size=batch, log_every=log_every,
                        checkpoint_every=max(log_every, steps // 2), eval_tasks=1024 if tiny else 65536,
                        seed=self.seed)
        return Config(**{**defaults, **fields}).validate()

    @property
    def analysis_kwargs(self) -> dict[str, int]:
        small = self.steps != 0
        return {"num_tune_tasks": 2**10 if small else 2**15, "mc_tasks": 2**12 if small else 2**18}


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    claim: str
    members: Callable[[Size], list[Config]]
    judge: Callable[[list[dict], Size], tuple[list[Check], list[dict]]]
    plot: Callable[[list[dict], str], None]
    reported_only: bool = False
    probe: Callable[[Any, Size], dict] | None = None  # (loaded Run, size) -> numbers kept as summary["probe"]


@dataclasses.dataclass
class Outcome:
    name: str
    claim: str
    checks: list[Check]
    numbers: list[dict]
    figure: str
    reported_only: bool
    train_seconds: float = 0.0  # the members' recorded training time (``train_seconds``), resumed runs included

    @property
    def passed(self) -> bool:
        """Every check passed, and a judged experiment has checks at all (no checks is no evidence)."""
        return (self.reported_only or bool(self.checks)) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"name": self.name, "claim": self.claim, "checks": [c.to_dict() for c in self.checks],
                "numbers": self.numbers, "figure": self.figure, "reported_only": self.reported_only,
                "passed": self.passed, "train_seconds": self.train_seconds}


def loss_check(s: dict, tag: str) -> Check:
    """Held-out loss vs the optimal one-layer predictor's loss on the SAME held-out tasks
    (``loss_star_heldout``): at most ``LOSS_SLACK`` above it plus 3 paired standard errors (the
    per-task differences cancel the tasks' shared difficulty)."""
    ref = s["baselines"]["one_layer_opt"]
    return at_most(f"held-out loss ({tag}) vs the best 1-layer predictor on the same tasks", s["loss"], ref["loss"],
                   LOSS_SLACK, ref["paired_stderr"])


def summary_row(s: dict, **extra: Any) -> dict:
    keep = ("loss", "loss_stderr", "loss_star", "loss_star_heldout", "rel_error", "eta_learned", "eta_star",
            "scalar_fit_residual", "ahn_distance")
    return {**{k: s.get(k) for k in keep}, **extra}


def gamma_panels(summaries: list[dict], path: str, labels: Sequence[str], ref_title: str = "theory Gamma*") -> None:
    """Gamma_eff above Gamma* for each member, one colour scale per column."""
    cols = len(summaries)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.6), squeeze=False)
    for j, (s, label) in enumerate(zip(summaries, labels)):
        g, gs = np.asarray(s["gamma_learned"]), np.asarray(s["gamma_star"])
        vmax = float(max(np.abs(g).max(), np.abs(gs).max()))
        for i, (m, title) in enumerate(((g, f"learned Gamma_eff\n{label}"), (gs, f"{ref_title}\n{label}"))):
            im = axes[i, j].imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            axes[i, j].set_title(title, fontsize=9)
            axes[i, j].set_xticks(range(len(m)))
            axes[i, j].set_yticks(range(len(m)))
            fig.colorbar(im, ax=axes[i, j], fraction=0.046)
        axes[1, j].set_xlabel(f"rel. error {s['rel_error']:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_seconds(history: list[dict]) -> float:
    """Seconds a run spent in its compiled training calls, from its history records (a vmapped
    group's time is shared by its ``group_size`` members); eval, checkpoints and compiles excluded."""
    total, prev = 0.0, 0
    for rec in history:
        total += (rec["step"] - prev) / rec["steps_per_sec"] / rec.get("group_size", 1)
        prev = rec["step"]
    return total
