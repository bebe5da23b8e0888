"""A light act classifier trained on weak labels: the fifth cue of `ahf acts tag`.

The structural cues are precise but sparse: a story answers a "[WP] ..." prompt, yet the same
kind of story under an untagged prompt gets no structure cue at all (on the check set with the
prompt tags removed, story recall falls from 0.98 to 0.39). The classifier learns what the
cue-marked replies *read like* and carries that to unmarked ones.

Weak labels, per act: the turns whose structure score reaches `min_structure` are labelled
positive; every other turn is unlabelled (it may well be a positive without a cue, so it is not
a negative). That is learning from positive and unlabelled data: a logistic regression on the
reply embeddings separates labelled from unlabelled, g(x) = P(labelled | x), and under the
usual assumption (cue-marked positives are a random sample of all positives, Elkan & Noto 2008)
P(act | x) = g(x) / c, where c = mean g on held-out labelled positives. The cue is that ratio,
clipped to [0, 1]. An act with fewer than `min_positives` weak positives gets no classifier
(reported, and its cue is 0). Subreddit names are never features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from ahf.config import StageConfig


class ClassifierConfig(StageConfig):
    """The weak-label act classifier: a logistic regression per act on the reply embeddings."""

    min_structure: float = Field(0.6, ge=0, le=1, description="structure score that makes a weak positive")
    min_positives: int = Field(20, ge=2, description="an act with fewer weak positives gets no classifier")
    max_unlabelled: int = Field(50_000, ge=100, description="unlabelled turns sampled for training")
    l2: float = Field(1e-3, ge=0, description="L2 penalty of the logistic regression")
    steps: int = Field(300, ge=1, description="full-batch gradient steps")
    seed: int = Field(0, description="seed of the unlabelled sample")


@dataclass
class ClassifierReport:
    positives: dict[str, int] = field(default_factory=dict)
    label_frequency: dict[str, float] = field(default_factory=dict)  # Elkan-Noto c per act
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"positives": self.positives, "label_frequency": self.label_frequency, "skipped": self.skipped}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression by full-batch gradient descent with momentum (x is small:
    at most `max_unlabelled` + positives rows of unit vectors, so this converges in a few hundred steps;
    float32 throughout, as the embeddings are)."""
    weight_pos = 0.5 / max(y.mean(), 1e-9)
    weight_neg = 0.5 / max(1 - y.mean(), 1e-9)
    sample_weight = (np.where(y > 0, weight_pos, weight_neg) / len(y)).astype(np.float32)
    w, b = np.zeros(x.shape[1], dtype=np.float32), np.float32(0.0)
    vw, vb, lr = np.zeros_like(w), 0.0, 2.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        r = (p - y) * sample_weight
        gw, gb = x.T @ r + l2 * w, r.sum()
        vw, vb = 0.9 * vw - lr * gw, 0.9 * vb - lr * gb
        w, b = w + vw, b + vb
    return w, b


def classifier_scores(vectors: np.ndarray, structure: dict[str, np.ndarray], config: ClassifierConfig
                      ) -> tuple[dict[str, np.ndarray], ClassifierReport]:
    """The classifier cue of every act for every turn (rows of `vectors`), and what it trained on."""
    rng = np.random.default_rng(config.seed)
    report, out = ClassifierReport(), {}
    for act, scores in structure.items():
        labelled = scores >= config.min_structure
        positives = np.flatnonzero(labelled)
        report.positives[act] = int(len(positives))
        out[act] = np.zeros(len(vectors))
        if len(positives) < config.min_positives:
            report.skipped[act] = f"{len(positives)} weak positives < min_positives {config.min_positives}"
            continue
        rng.shuffle(positives)
        held, train_pos = positives[: max(1, len(positives) // 5)], positives[max(1, len(positives) // 5):]
        unlabelled = np.flatnonzero(~labelled)
        if len(unlabelled) > config.max_unlabelled:
            unlabelled = rng.choice(unlabelled, config.max_unlabelled, replace=False)
        if len(unlabelled) == 0:
            report.skipped[act] = "every turn is a weak positive"
            continue
        rows = np.concatenate([train_pos, unlabelled])
        y = np.concatenate([np.ones(len(train_pos)), np.zeros(len(unlabelled))])
        w, b = fit_logistic(vectors[rows], y.astype(np.float32), config.l2, config.steps)
        g = 1.0 / (1.0 + np.exp(-(vectors @ w + b)))
        c = float(g[held].mean())
        report.label_frequency[act] = round(c, 4)
        out[act] = np.clip(g / max(c, 1e-9), 0.0, 1.0)
    return out, report
