"""Honest pairwise evaluation of any reward: model-independent, from two reward sequences and the pairs.

`pair_metrics(chosen_rewards, rejected_rewards, pairs)` is what `ahf eval rm` (training.rm.evaluate_pairs),
the report and the probe reward model report. Every accuracy counts a tie (equal rewards) as half a win.

- Intervals (95 %): a percentile bootstrap over PROMPTS (the pairs sharing a prompt are resampled together,
  as `training.data.split_by_prompt` holds them out together: pairs of one prompt are not independent) with a
  fixed seed, and the Wilson binomial interval (which treats pairs as independent: narrower when prompts
  repeat).
- Length baseline: the reply with more words (`str.split()`) wins. `vs_length` is the paired difference
  model − baseline, bootstrapped on the same resamples.
- Length-controlled: (a) the pairs of similar length (`similar_length`: the word counts differ by less than
  LENGTH_TOLERANCE of the longer); (b) accuracy of the rewards' residuals after a least-squares fit of the
  reward on the word count among monotone functions (isotonic regression, the better of non-decreasing and
  non-increasing) over every scored reply. Any reward that is a monotone function of length leaves
  residuals of 0: exactly 0.5. A log-linear fit a + b·log(words) is one such function, but it leaves the
  rest of a non-log length effect in the residuals, where its sign follows length again (a reward equal to
  the word count scored 0.40–0.46 after it on synthetic pairs, not 0.5); its slope `log_slope` is reported
  as a description. The bootstrap of (b) resamples the residual outcomes (conditional on the fit).
- Calibration: per pair |Δ| = |r_chosen − r_rejected| and whether the sign was right, in equal-count bins of
  |Δ|; the observed win rate beside the Bradley-Terry prediction sigmoid(|Δ|); the expected calibration
  error is the pair-weighted mean of |observed − predicted|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ahf.console import UserError

LENGTH_TOLERANCE = 0.2  # similar length: word counts differ by less than 20 % of the longer reply's
RESAMPLES = 2000  # bootstrap resamples of the prompts
CALIBRATION_BINS = 10
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile
RESAMPLE_CHUNK = 250  # resamples drawn at once (memory: chunk x prompts counts)
TIE_TOLERANCE = 1e-9  # residuals closer than this (relative to the largest |reward|) are a tie: float noise


# ----------------------------------------------------------------------------- lengths

def words(text: str) -> int:
    """The word count every length figure uses: whitespace-separated tokens."""
    return len(text.split())


def similar_length(a: int, b: int, tolerance: float = LENGTH_TOLERANCE) -> bool:
    """Word counts a and b differ by less than `tolerance` of the longer: |a − b| < tolerance · max(a, b).
    Strict, so two empty replies are not similar (0 < 0 is false): there is nothing to compare."""
    return abs(a - b) < tolerance * max(a, b)


def similar_length_pairs(pairs: Sequence, tolerance: float = LENGTH_TOLERANCE) -> list:
    """The pairs whose chosen and rejected replies are of similar length (`similar_length`)."""
    return [p for p in pairs if similar_length(words(p.chosen), words(p.rejected), tolerance)]


def length_baseline(pairs: Sequence) -> float:
    """Accuracy of "the longer reply (in words) wins"; ties count half."""
    return float(np.mean(_length_outcomes(pairs)))


def _length_outcomes(pairs: Sequence) -> np.ndarray:
    return outcomes([words(p.chosen) for p in pairs], [words(p.rejected) for p in pairs])


def outcomes(chosen: Sequence[float], rejected: Sequence[float], tolerance: float = 0.0) -> np.ndarray:
    """Per pair: 1 when chosen scores higher, 0.5 for a tie (|difference| <= tolerance), else 0."""
    diff = np.asarray(chosen, dtype=float) - np.asarray(rejected, dtype=float)
    return np.where(diff > tolerance, 1.0, np.where(diff < -tolerance, 0.0, 0.5))


# ----------------------------------------------------------------------------- intervals

def wilson_interval(successes: float, n: int, z: float = Z_95) -> list[float]:
    """Wilson score interval of a binomial proportion (`successes` may be fractional: ties count half)."""
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def prompt_groups(pairs: Sequence) -> np.ndarray:
    """Per pair, the index of its prompt (first-seen order): the bootstrap's resampling unit."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(p.prompt, len(index)) for p in pairs], dtype=np.int64)


def bootstrap_means(values: np.ndarray, groups: np.ndarray, seed: int = 0, resamples: int = RESAMPLES) -> np.ndarray:
    """(resamples, k) means of the k columns of `values` (pairs x k) over prompt resamples: each resample
    draws as many prompts as there are, with replacement, and keeps all of each drawn prompt's pairs.
    Columns share the resamples, so their differences are paired."""
    values = values.reshape(len(values), -1)
    n_groups = int(groups.max()) + 1
    sums = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, groups, values)
    sizes = np.bincount(groups, minlength=n_groups).astype(float)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, RESAMPLE_CHUNK):
        chunk = min(RESAMPLE_CHUNK, resamples - start)
        drawn = rng.integers(0, n_groups, size=(chunk, n_groups)) + n_groups * np.arange(chunk)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=chunk * n_groups).reshape(chunk, n_groups).astype(float)
        means.append((counts @ sums) / (counts @ sizes)[:, None])  # times each prompt was drawn, per resample
    return np.concatenate(means)


def percentile_interval(samples: np.ndarray) -> list[float]:
    """The 2.5 % and 97.5 % quantiles of bootstrap samples."""
    low, high = np.quantile(samples, [0.025, 0.975])
    return [float(low), float(high)]


def accuracy_summary(wins: np.ndarray, groups: np.ndarray, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Accuracy of per-pair outcomes with its bootstrap (over prompts) and Wilson intervals."""
    boot = bootstrap_means(wins, groups, seed, resamples)[:, 0]
    return {"accuracy": float(wins.mean()), "ci": {"bootstrap": percentile_interval(boot),
                                                   "wilson": wilson_interval(float(wins.sum()), len(wins))}}


# ----------------------------------------------------------------------------- length regression

def isotonic_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of y on x (pool adjacent violators; equal x share one value)."""
    levels, where = np.unique(x, return_inverse=True)
    sizes = np.bincount(where, minlength=len(levels)).astype(float)
    means = np.bincount(where, weights=y, minlength=len(levels)) / sizes
    values, weights, spans = [], [], []
    for mean, size in zip(means, sizes):
        values.append(mean), weights.append(size), spans.append(1)
        while len(values) > 1 and values[-2] > values[-1]:  # pool the violating neighbours
            weight = weights[-2] + weights[-1]
            values[-2:] = [(values[-2] * weights[-2] + values[-1] * weights[-1]) / weight]
            weights[-2:], spans[-2:] = [weight], [spans[-2] + spans[-1]]
    return np.repeat(values, spans)[where]


def monotone_length_fit(lengths: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, str]:
    """The least-squares monotone function of length through the rewards (the better direction)."""
    rising = isotonic_fit(lengths, rewards)
    falling = -isotonic_fit(lengths, -rewards)
    if np.sum((rewards - falling) ** 2) < np.sum((rewards - rising) ** 2):
        return falling, "decreasing"
    return rising, "increasing"


def length_regressed(chosen: np.ndarray, rejected: np.ndarray, pairs: Sequence, groups: np.ndarray,
                     seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Accuracy of residual_chosen > residual_rejected after removing the best monotone length fit."""
    lengths = np.array([words(p.chosen) for p in pairs] + [words(p.rejected) for p in pairs], dtype=float)
    rewards = np.concatenate([chosen, rejected])
    fitted, direction = monotone_length_fit(lengths, rewards)
    residuals = rewards - fitted
    tolerance = TIE_TOLERANCE * max(float(np.abs(rewards).max()), 1e-300)
    wins = outcomes(residuals[:len(pairs)], residuals[len(pairs):], tolerance)
    spread = float(np.sum((rewards - rewards.mean()) ** 2))
    log_lengths = np.log1p(lengths)
    slope = float(np.polyfit(log_lengths, rewards, 1)[0]) if np.ptp(log_lengths) > 0 else 0.0
    return {**accuracy_summary(wins, groups, seed, resamples), "fit": f"isotonic ({direction}) in words",
            "length_r2": 1 - float(np.sum(residuals ** 2)) / spread if spread > 0 else 0.0, "log_slope": slope}


# ----------------------------------------------------------------------------- buckets, calibration

def bucket_accuracy(pairs: Sequence, correct: Sequence[float], buckets: int = 3) -> dict | None:
    """Accuracy by margin (or score-ratio) tercile, when the file carries one."""
    key = "margin" if all(p.margin is not None for p in pairs) else \
        "score_ratio" if all(p.score_ratio is not None for p in pairs) else None
    if key is None:
        return None
    values = [getattr(p, key) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: values[i])
    out = []
    for b in range(buckets):
        members = order[b * len(order) // buckets:(b + 1) * len(order) // buckets]
        if members:
            wins = sum(correct[i] for i in members)
            out.append({"range": [values[members[0]], values[members[-1]]], "n": len(members),
                        "accuracy": wins / len(members), "wilson": wilson_interval(float(wins), len(members)),
                        "length_baseline": length_baseline([pairs[i] for i in members])})
    return {"by": key, "buckets": out}


def calibration(chosen: np.ndarray, rejected: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Equal-count bins of |Δ|: observed win rate of the higher-scored reply vs sigmoid(|Δ|), and the ECE."""
    diff = chosen - rejected
    size = np.abs(diff)
    right = outcomes(diff, np.zeros_like(diff))  # sign-symmetrised: the higher-scored reply won (tie: half)
    predicted = 1 / (1 + np.exp(-size))
    order = np.argsort(size, kind="stable")
    count = min(bins, len(diff))
    rows, ece = [], 0.0
    for b in range(count):
        members = order[b * len(order) // count:(b + 1) * len(order) // count]
        observed, expected = float(right[members].mean()), float(predicted[members].mean())
        ece += len(members) / len(diff) * abs(observed - expected)
        rows.append({"range": [float(size[members[0]]), float(size[members[-1]])], "n": len(members),
                     "observed": observed, "predicted": expected})
    return {"bins": rows, "ece": ece}


# ----------------------------------------------------------------------------- everything

def pair_metrics(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float], pairs: Sequence,
                 seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Every evaluation figure of one reward on `pairs` (training.data.Pair; rewards in the same order)."""
    chosen = np.asarray(chosen_rewards, dtype=float).reshape(-1)
    rejected = np.asarray(rejected_rewards, dtype=float).reshape(-1)
    if not len(pairs):
        raise UserError("no pairs to evaluate")
    if not len(chosen) == len(rejected) == len(pairs):
        raise ValueError(f"{len(chosen)} chosen and {len(rejected)} rejected rewards for {len(pairs)} pairs")
    groups = prompt_groups(pairs)
    model, baseline = outcomes(chosen, rejected), _length_outcomes(pairs)
    paired = bootstrap_means(np.stack([model, baseline], axis=1), groups, seed, resamples)
    n = len(pairs)
    result = {
        "pairs": n, "prompts": int(groups.max()) + 1,
        "accuracy": float(model.mean()),
        "accuracy_ci": {"bootstrap": percentile_interval(paired[:, 0]), "wilson": wilson_interval(model.sum(), n)},
        "length_baseline": float(baseline.mean()),
        "length_baseline_ci": {"bootstrap": percentile_interval(paired[:, 1]),
                               "wilson": wilson_interval(baseline.sum(), n)},
        "vs_length": {"difference": float(model.mean() - baseline.mean()),
                      "ci": percentile_interval(paired[:, 0] - paired[:, 1])},
        "mean_margin": float(np.mean(chosen - rejected)),
        "length_controlled": _similar_length_accuracy(chosen, rejected, pairs, seed, resamples),
        "length_regressed": length_regressed(chosen, rejected, pairs, groups, seed, resamples),
        "calibration": calibration(chosen, rejected),
        "bootstrap": {"unit": "prompt", "resamples": resamples, "seed": seed},
    }
    buckets = bucket_accuracy(pairs, model.tolist())
    if buckets:
        result["by_bucket"] = buckets
    return result


def _similar_length_accuracy(chosen: np.ndarray, rejected: np.ndarray, pairs: Sequence, seed: int,
                             resamples: int) -> dict:
    """Accuracy, interval and length baseline on the pairs of similar length (`similar_length`)."""
    keep = np.array([similar_length(words(p.chosen), words(p.rejected)) for p in pairs])
    out: dict = {"pairs": int(keep.sum()), "of": len(pairs), "tolerance": LENGTH_TOLERANCE}
    if not keep.any():
        return out | {"accuracy": None, "ci": None, "length_baseline": None}
    subset = [p for p, k in zip(pairs, keep) if k]
    summary = accuracy_summary(outcomes(chosen[keep], rejected[keep]), prompt_groups(subset), seed, resamples)
    return out | summary | {"length_baseline": length_baseline(subset)}
