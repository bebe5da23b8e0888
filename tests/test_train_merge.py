"""Reward-model merging: the three methods against hand computations, and the CLI round trip."""

from __future__ import annotations

import json

import torch

from ahf.cli import main as ahf_main
from training.merge import merge_states, ties
from training.models import WEIGHTS, RewardModel, build_backbone, load_state, load_tokenizer
from training.tiny import TINY_GPT2


def test_ties_trims_elects_sign_and_averages_agreeing_entries():
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    b = torch.tensor([1.0, 4.0, -0.2, -3.0])
    # density 0.5 keeps the top-2 magnitudes: a -> [3, 0, 0, 2], b -> [0, 4, 0, -3]
    # summed signs: [+, +, 0, -]; agreeing entries: [3], [4], none, [-3]
    assert ties([a, b], 0.5).tolist() == [3.0, 4.0, 0.0, -3.0]


def test_merge_methods_match_their_formulas():
    base = {"backbone.w": torch.tensor([1.0, 1.0, 1.0])}
    first = {"backbone.w": torch.tensor([2.0, 1.0, 0.0]), "head.weight": torch.tensor([1.0])}
    second = {"backbone.w": torch.tensor([1.0, 3.0, 0.0]), "head.weight": torch.tensor([3.0])}
    average = merge_states([first, second], "average", None)
    assert average["backbone.w"].tolist() == [1.5, 2.0, 0.0] and average["head.weight"].tolist() == [2.0]
    arithmetic = merge_states([first, second], "task-arithmetic", base, scale=0.5)
    assert arithmetic["backbone.w"].tolist() == [1.5, 2.0, 0.0]  # 1 + 0.5 * ([1,0,-1] + [0,2,-1])
    assert arithmetic["head.weight"].tolist() == [2.0]  # heads have no base: averaged
    tied = merge_states([first, second], "ties", base, scale=1.0, density=1.0)
    assert tied["backbone.w"].tolist() == [2.0, 3.0, 0.0]  # signs agree everywhere: mean of non-zero deltas


def test_merge_rm_cli_round_trip(tmp_path, shared_data, capsys):
    tokenizer = load_tokenizer(str(shared_data / "tokenizer" / "gpt2"))
    dirs = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa"))
        dirs.append(model.save(tmp_path / f"rm{seed}", tokenizer))
    base, first, second = dirs
    out = tmp_path / "merged"
    code = ahf_main(["merge", "rm", str(first), str(second), "--method", "ties", "--base", str(base),
                     "--density", "0.3", "--out", str(out), "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "ties" and record["heads"] == "averaged"
    assert record["tensors_merged_against_base"] == record["tensors"] - 2  # all but the head's weight and bias
    merged = load_state(out / WEIGHTS)
    states = [load_state(d / WEIGHTS) for d in dirs]
    key = "backbone.h.0.mlp.c_fc.weight"
    expected = states[0][key] + ties([states[1][key] - states[0][key], states[2][key] - states[0][key]], 0.3)
    assert torch.allclose(merged[key], expected)
    assert torch.allclose(merged["head.weight"], (states[1]["head.weight"] + states[2]["head.weight"]) / 2)
    reloaded = RewardModel.load(out)
    ids = torch.tensor([tokenizer.encode("a short story")])
    assert reloaded(ids).shape == (1,)
    assert ahf_main(["merge", "rm", str(first), str(second), "--method", "task-arithmetic",
                     "--out", str(tmp_path / "nobase")]) == 2  # random-init models record no base
