"""Joint multi-task reward models: task token and per-task head, on the real DeepSpeed engine (CPU) with
tiny random-init GPT-2s, two real tasks (WritingPrompts upvote pairs, lfqa validity pairs)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ahf.cli import main as ahf_main
from ahf.console import UserError
from training import data as D
from training.models import RewardModel, build_backbone
from training.multitask import TASK_MARKER, epoch_order, parse_task_specs, with_task_marker
from training.rm import RMConfig, encode_pairs, pair_batches, score_pairs, task_inputs, train_reward_model
from training.tiny import TINY_GPT2
from training.tokens import LengthPolicy

TASKS = ["stories", "explanations"]


@pytest.fixture(scope="module")
def task_files(shared_data, tmp_path_factory):
    """60 story pairs (detokenized) and 40 explanation pairs, as two pairs files."""
    folder = tmp_path_factory.mktemp("tasks")
    stories = D.load_pairs(shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)[:60]
    explanations = D.explanation_task(shared_data / "explanations" / "validity_annotation.jsonl", 0.2, 0)[0][:40]
    return {"stories": D.write_pairs(stories, folder / "stories.jsonl"),
            "explanations": D.write_pairs(explanations, folder / "explanations.jsonl")}


def _tiny_rm(seed=0, tasks=None, conditioning=None):
    torch.manual_seed(seed)
    return RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa"),
                       tasks=tasks, task_conditioning=conditioning)


def _tiny_settings(shared_data) -> list[str]:
    overrides = ["model=tiny", f"tokenizer={shared_data / 'tokenizer' / 'gpt2'}",
                 "random_init=" + json.dumps(TINY_GPT2),
                 "max_length=64", "max_prompt_length=24", "max_steps=4", "micro_batch_size=8", "lr=1e-3",
                 "log_every=2", "deepspeed=zero2", "eval_batch_size=32"]
    return sum([["--set", o] for o in overrides], [])


@pytest.mark.parametrize("form", ["task_token", "task_head"])
def test_joint_training_cli_then_eval_per_task(form, task_files, shared_data, tmp_path, capsys):
    out = tmp_path / form
    code = ahf_main(["train", "rm", "--task", f"stories={task_files['stories']}",
                     "--task", f"explanations={task_files['explanations']}", "--out", str(out), "--json",
                     *_tiny_settings(shared_data), "--set", f"multitask={form}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == TASKS and result["task_conditioning"] == form and result["steps"] == 4
    held = {}
    for task in TASKS:  # each task split by prompt on its own, as single-task training would
        train, held[task] = D.split_by_prompt(D.load_pairs(task_files[task]), 0.2, 0)
        assert result["by_task"][task]["train_rows"] == len(train) == result["by_task"][task]["train_used"]
        assert result["by_task"][task]["eval_rows"] == len(held[task]) == result["eval_by_task"][task]["pairs"]
    assert result["train_rows"] == sum(result["by_task"][t]["train_rows"] for t in TASKS)
    assert result["pairs_per_epoch"] == result["train_used"]  # proportional: every pair once
    for entry in result["history"]:  # two full batches of 8 pairs per logged window, split across the tasks
        assert sum(entry["pairs_by_task"].values()) == 16
        assert entry["accuracy_by_task"].keys() == {t for t, n in entry["pairs_by_task"].items() if n}

    card = json.loads((out / "ahf_model.json").read_text())
    assert card["tasks"] == TASKS and card["task_conditioning"] == form
    assert ("task_marker" in card) == (form == "task_token")
    assert RewardModel.load(out).head.out_features == (2 if form == "task_head" else 1)

    for task in TASKS:  # the saved model, scored by `eval rm --task`, gives the training run's numbers
        held_file = D.write_pairs(held[task], tmp_path / f"{task}_held.jsonl")
        assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_file), "--task", task, "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert evaluated["task"] == task and evaluated["pairs"] == len(held[task])
        assert evaluated["accuracy"] == pytest.approx(result["eval_by_task"][task]["accuracy"])
        assert evaluated["mean_margin"] == pytest.approx(result["eval_by_task"][task]["mean_margin"], abs=1e-5)

    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_file)]) == 2
    assert "trained jointly on tasks stories, explanations" in capsys.readouterr().err
    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_file), "--task", "poems"]) == 2
    assert "unknown task 'poems': this reward model knows stories, explanations" in capsys.readouterr().err


def test_task_token_puts_the_marker_before_every_prompt(task_files, tokenizer):
    pairs = D.load_pairs(task_files["explanations"])[:12]
    assert any(p.rejected_prompt for p in pairs)  # cross-question pairs: both prompts get the marker
    marked = with_task_marker(pairs, "explanations")
    encoded, _ = encode_pairs(marked, tokenizer, LengthPolicy(128, 48))
    marker_ids = tokenizer.encode(TASK_MARKER.format(task="explanations"))
    assert marker_ids == tokenizer.encode("[task: explanations]\n")
    for row in encoded:  # prompt truncation keeps the head of the prompt, so the marker survives it
        assert row["prompt"][:len(marker_ids)] == marker_ids
        assert row["rejected_prompt"][:len(marker_ids)] == marker_ids

    model = _tiny_rm(tasks=TASKS, conditioning="task_token")
    as_stories, _, _ = score_pairs(model, tokenizer, pairs, 128, 48, task="stories")
    as_explanations, _, _ = score_pairs(model, tokenizer, pairs, 128, 48, task="explanations")
    plain = _tiny_rm()  # same weights without tasks: scores the unmarked text
    unmarked, _, _ = score_pairs(plain, tokenizer, pairs, 128, 48)
    by_hand, _, _ = score_pairs(plain, tokenizer, marked, 128, 48)
    assert torch.allclose(as_explanations, by_hand, atol=1e-6)
    assert (as_stories - as_explanations).abs().min() > 0 and (as_explanations - unmarked).abs().min() > 0


def test_task_head_reads_each_tasks_column_and_round_trips(task_files, tokenizer, tmp_path):
    model = _tiny_rm(tasks=TASKS, conditioning="task_head").eval()
    assert model.head.weight.shape == (2, 32)
    with torch.no_grad():  # column 1 = -column 0 - 3: the two tasks must give different, predictable scores
        model.head.weight[1] = -model.head.weight[0]
        model.head.bias[:] = torch.tensor([0.0, -3.0])
    pairs = D.load_pairs(task_files["stories"])[:6]
    stories, _, _ = score_pairs(model, tokenizer, pairs, 64, 24, task="stories")
    explanations, _, _ = score_pairs(model, tokenizer, pairs, 64, 24, task="explanations")
    assert torch.allclose(explanations, -stories - 3.0, atol=1e-5)

    ids = torch.tensor([tokenizer.encode("a short story")])
    with torch.no_grad():
        column = model(ids, task_ids=torch.tensor([1]))
        assert column.item() == pytest.approx(-model(ids, task_ids=torch.tensor([0])).item() - 3.0, abs=1e-5)
    with pytest.raises(UserError, match="one task id per scored row"):
        model(ids)

    model.save(tmp_path / "heads", tokenizer)
    loaded = RewardModel.load(tmp_path / "heads")
    assert loaded.tasks == TASKS and loaded.task_conditioning == "task_head"
    again, _, _ = score_pairs(loaded, tokenizer, pairs, 64, 24, task="stories")
    assert torch.equal(again, stories)


def test_task_head_packed_layouts_match_padded_scores(task_files, tokenizer):
    """Packed rows (varlen, shared prompt) hand each scored row its own task's column, as padding does."""
    model = _tiny_rm(tasks=TASKS, conditioning="task_head").eval()
    with torch.no_grad():
        model.head.weight[1] = -2 * model.head.weight[0]
    encoded, _ = encode_pairs(D.load_pairs(task_files["stories"])[:10], tokenizer, LengthPolicy(64, 24))
    for i, row in enumerate(encoded):
        row["task"] = i % 3 % 2  # tasks mixed within every batch
    by_layout = {}
    for layout in ("none", "varlen", "shared_prompt"):
        scores = {}
        for batch, _ in pair_batches(encoded, layout, 4, 300, tokenizer.pad_token_id, random.Random(1)):
            with torch.no_grad():
                out = model(**task_inputs(model, batch, "cpu"))
            half = len(batch.extras["pairs"])
            for k, i in enumerate(batch.extras["pairs"]):
                scores[i] = (out[k].item(), out[half + k].item())
        by_layout[layout] = scores
    padded = by_layout["none"]
    assert len(padded) == 10
    with torch.no_grad():  # each pair alone, with its own task: the batched scores read the right column
        for i, row in enumerate(encoded):
            alone = [model(torch.tensor([row["prompt"] + row[side]]), task_ids=torch.tensor([row["task"]])).item()
                     for side in ("chosen", "rejected")]
            assert alone == pytest.approx(list(padded[i]), abs=1e-4)
    for layout in ("varlen", "shared_prompt"):
        assert max(abs(by_layout[layout][i][j] - padded[i][j]) for i in padded for j in (0, 1)) < 1e-4


def test_equal_balance_upsamples_the_smaller_task():
    task_of = [0] * 7 + [1] * 3
    assert epoch_order(task_of, "proportional", random.Random(0)) == list(range(10))
    order = epoch_order(task_of, "equal", random.Random(0))
    assert sorted(i for i in order if task_of[i] == 0) == list(range(7))  # the largest task: every pair once
    smaller = [i for i in order if task_of[i] == 1]
    assert len(smaller) == 7  # 2 whole copies + 1 sampled
    assert sorted(smaller.count(i) for i in (7, 8, 9)) == [2, 2, 3]


def test_bad_task_usage_is_refused(task_files, tokenizer, tmp_path, capsys):
    out = str(tmp_path / "never")
    assert ahf_main(["train", "rm", "--out", out]) == 2
    assert "not neither" in capsys.readouterr().err
    assert ahf_main(["train", "rm", str(task_files["stories"]), "--task", f"a={task_files['stories']}",
                     "--task", f"b={task_files['explanations']}", "--out", out]) == 2
    assert "not both" in capsys.readouterr().err
    assert ahf_main(["train", "rm", "--task", f"stories={task_files['stories']}", "--out", out]) == 2
    assert "at least two tasks" in capsys.readouterr().err
    with pytest.raises(UserError, match="NAME=FILE"):
        parse_task_specs(["stories", "b=x"])
    with pytest.raises(UserError, match="given twice"):
        parse_task_specs(["a=x", "a=y"])
    with pytest.raises(UserError, match="task name 'two words'"):
        parse_task_specs(["two words=x", "b=y"])
    config = RMConfig(model="tiny", random_init=TINY_GPT2, eval_pairs=str(task_files["stories"]))
    with pytest.raises(UserError, match="maps each task to its held-out file"):
        train_reward_model(config, task_files, out)
    with pytest.raises(UserError, match="objective=pairwise"):
        train_reward_model(RMConfig(model="tiny", random_init=TINY_GPT2, objective="tier"), task_files, out)
    with pytest.raises(UserError, match="needs joint training"):
        train_reward_model(RMConfig(model="tiny", random_init=TINY_GPT2, eval_pairs={"stories": "x"}),
                           task_files["stories"], out)

    single = _tiny_rm().save(tmp_path / "single", tokenizer)
    assert ahf_main(["eval", "rm", "--model", str(single), "--pairs", str(task_files["stories"]),
                     "--task", "stories"]) == 2
    assert "single-task; it takes no task" in capsys.readouterr().err


def test_merge_needs_the_same_tasks_and_conditioning(tokenizer, tmp_path, capsys):
    heads = [_tiny_rm(seed, TASKS, "task_head").save(tmp_path / f"heads{seed}", tokenizer) for seed in (0, 1)]
    single = _tiny_rm(2).save(tmp_path / "single", tokenizer)
    tokens = _tiny_rm(3, TASKS, "task_token").save(tmp_path / "tokens", tokenizer)
    for other, said in ((single, "single-task"), (tokens, "task_token over tasks [stories, explanations]")):
        assert ahf_main(["merge", "rm", str(heads[0]), str(other), "--out", str(tmp_path / "no")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "no").exists()

    assert ahf_main(["merge", "rm", *map(str, heads), "--out", str(tmp_path / "merged"), "--json"]) == 0
    capsys.readouterr()
    merged = RewardModel.load(tmp_path / "merged")
    first, second = (RewardModel.load(d) for d in heads)
    assert merged.tasks == TASKS and merged.task_conditioning == "task_head"
    assert torch.allclose(merged.head.weight, (first.head.weight + second.head.weight) / 2)  # column by column

