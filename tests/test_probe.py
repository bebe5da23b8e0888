"""`method: probe` (training/probe.py): a frozen sentence encoder (the real offline MiniLM), whole texts by
overlapping windows, cached embeddings, a head chosen on held-out training prompts (inner cross-validation by
prompt), saved and scored by `ahf eval rm`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ahf.cli import main as ahf_main
from ahf.console import UserError
from training import data as D
from training.probe import (Chunking, embedding_cache, Features, FrozenEncoder, Rows, choose_head, covered,
                            embed_texts, fit_head, fit_heads_pooled, head_accuracy, score_with_probe,
                            selection_splits)
from training.rm import RMConfig, train_reward_model

TOPICS = ["a lighthouse keeper", "a dragon who hoards books", "the last train home", "a robot learning to cook",
          "a city under the sea", "a haunted violin", "twins separated at birth", "a door that opens once a year",
          "the moon going missing", "a detective who is a cat", "a garden on Mars", "an honest politician",
          "a library with no exits", "a time traveller's diary", "the first snow in a desert town",
          "a ghost who is afraid of people", "a map that redraws itself", "an orchestra of machines",
          "a bakery at the end of the world", "a letter delivered fifty years late", "a mountain that sings",
          "the king's forgotten twin", "a storm in a bottle", "a painter who cannot see colour",
          "a ship made of paper", "the clockmaker's apprentice", "a village where nobody sleeps",
          "a wolf raised by sheep", "the island that moves", "a spy in a kindergarten"]


def good(topic: str) -> str:  # a fluent, on-topic story
    return (f"The story of {topic} began on a quiet morning. Every detail was described with care, the characters "
            f"spoke naturally, and the ending tied the threads together in a satisfying, surprising way.")


def bad(topic: str) -> str:  # garbled, and longer: "the longer reply wins" gets every pair wrong
    return (f"{topic} lol asdf qwerty whatever zzz random random words keyboard smash hmm ok ok no idea "
            f"blah blah nope 123 456 xyz xyz end end end wat so yeah um like idk lol lol brb afk gg")


def planted_pairs(flip_seed: int | None = None) -> list[dict]:
    """One pair per topic, chosen = the fluent story; with `flip_seed`, exactly half of the first 24 pairs
    (the training ones) with the label swapped, chosen at random."""
    rows = [{"prompt": f"Write about {topic}.", "chosen": good(topic), "rejected": bad(topic)} for topic in TOPICS]
    if flip_seed is not None:
        order = list(range(24))
        random.Random(flip_seed).shuffle(order)
        for i in order[:12]:
            rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return rows


def write(rows: list[dict], path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def encoder():
    return FrozenEncoder(None)


def _config(tmp_path, **extra) -> RMConfig:
    return RMConfig(method="probe", probe_cache_dir=str(tmp_path / "cache"), **extra)


# ----------------------------------------------------------------------------- chunking

@pytest.mark.parametrize("n", [1, 5, 8, 9, 13, 100, 257])
def test_windows_cover_every_token_with_the_configured_overlap(n):
    chunking = Chunking(8, 6)
    spans = chunking.windows(n)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert covered(spans) == n  # every token in at least one window
    assert all(end - start <= 8 for start, end in spans)
    for (s1, e1), (s2, _) in zip(spans, spans[1:]):
        assert s2 - s1 == 6 and e1 - s2 == 2  # a new window every stride tokens, overlapping by size - stride
    assert len(spans) == max(1, -(-(n - 8) // 6) + 1)


def test_a_stride_past_the_window_is_refused_by_name():
    with pytest.raises(UserError, match="probe_chunk_stride"):
        Chunking(8, 9)


def test_long_texts_are_embedded_whole_and_cached(encoder, tmp_path):
    story = " ".join(f"word{i}" for i in range(700))
    chunking = Chunking(64, 48)
    cache = embedding_cache(tmp_path, encoder, chunking)
    advanced = []
    first, stats = embed_texts([story, "short"], encoder, chunking, cache, advanced.append)
    assert sum(advanced) == stats["windows"]  # progress counts every window the encoder ran
    whole = len(encoder.tokens(story)) + len(encoder.tokens("short"))
    assert stats["tokens_seen"] == stats["tokens_whole"] == whole and whole > 700  # nothing cut
    assert stats["windows"] == len(chunking.windows(len(encoder.tokens(story)))) + 1
    # the text's vector is the token-count-weighted mean of its windows' vectors
    ids = encoder.tokens(story)
    spans = chunking.windows(len(ids))
    vectors = encoder.embed([ids[s:e] for s, e in spans])
    weights = np.array([e - s for s, e in spans], dtype=np.float32)
    np.testing.assert_allclose(first[story], (vectors * weights[:, None]).sum(0) / weights.sum(), atol=1e-5)
    again, stats = embed_texts([story, "short"], encoder, chunking, cache, advanced.append)
    assert stats["encoded"] == 0 and stats["cached"] == 2 and stats["windows"] == 0
    assert sum(advanced) == len(chunking.windows(len(encoder.tokens(story)))) + 1  # the cache ran none
    assert stats["tokens_seen"] == stats["tokens_whole"] == whole
    np.testing.assert_array_equal(again[story], first[story])
    # another chunking is another cache entry
    _, stats = embed_texts([story], encoder, Chunking(64, 64), embedding_cache(tmp_path, encoder, Chunking(64, 64)))
    assert stats["encoded"] == 1


# ----------------------------------------------------------------------------- the head

def test_early_stopping_keeps_the_validation_best_epoch_not_the_last():
    torch.manual_seed(0)
    signal = torch.randn(16)

    def rows(n):  # a weak planted direction plus noise: full-batch training overfits the noise
        x = torch.randn(2 * n, 16)
        x[0::2] += 0.3 * signal
        return Rows(x, torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2))

    train, validation = rows(20), rows(40)
    fit = fit_head(train, validation, hidden=0, l2=0.0, lr=0.1, max_epochs=300, patience=300, seed=0)
    assert len(fit.curve) == 300
    assert fit.curve[fit.best_epoch - 1] == max(fit.curve) > fit.curve[-1]  # later epochs are worse
    assert head_accuracy(fit.head, validation) == pytest.approx(fit.validation_accuracy)  # the best state restored
    stopped = fit_head(train, validation, hidden=0, l2=0.0, lr=0.1, max_epochs=300, patience=10, seed=0)
    assert len(stopped.curve) <= stopped.best_epoch + 10


# ----------------------------------------------------------------------------- train, save, eval

def test_the_probe_learns_planted_quality_and_eval_rm_reproduces_it(tmp_path, capsys):
    rows = planted_pairs()
    train = write(rows[:24], tmp_path / "train.jsonl")
    held = write(rows[24:], tmp_path / "held.jsonl")
    result = train_reward_model(_config(tmp_path, eval_pairs=str(held)), train, tmp_path / "rm")
    assert result["method"] == "probe" and result["eval"]["pairs"] == 6
    assert result["eval"]["accuracy"] == 1.0 and result["eval"]["length_baseline"] == 0.0
    # inner 5-fold cross-validation: every training prompt validates once, then the refit uses them all
    assert result["validation_prompts"] == 24 and result["train_used"] == 24
    assert result["probe"]["selection_folds"] == 5 and len(result["probe"]["fold_accuracy"]) == 5
    assert result["embedding"]["encoded"] == 24 * 3 + 6 * 3
    card = json.loads((tmp_path / "rm" / "ahf_model.json").read_text())
    assert card["method"] == "probe" and card["probe"]["chunking"] == {"tokens": 384, "stride": 288}
    assert card["probe"]["chosen_l2"] in RMConfig().probe_l2 and len(card["probe"]["validation"]) == 4 * 4

    assert ahf_main(["eval", "rm", "--model", str(tmp_path / "rm"), "--pairs", str(held), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["embedding"]["encoded"] == 0  # every text came from the cache
    for key in ("accuracy", "length_baseline", "accuracy_ci", "vs_length", "length_controlled"):
        assert evaluated[key] == result["eval"][key]
    assert evaluated["mean_margin"] == pytest.approx(result["eval"]["mean_margin"], abs=1e-6)
    chosen, rejected, _, _ = score_with_probe(tmp_path / "rm", D.load_pairs(held))
    assert float((chosen - rejected).mean()) == pytest.approx(evaluated["mean_margin"], abs=1e-6)

    again = train_reward_model(_config(tmp_path, eval_pairs=str(held)), train, tmp_path / "rm2")
    assert again["embedding"]["encoded"] == 0 and again["embedding"]["cached"] == again["embedding"]["texts"]
    assert again["eval"] == result["eval"] and again["probe"] == result["probe"]  # deterministic for the seed


def test_shuffled_or_reversed_labels_are_caught(tmp_path):
    """Mutations of the labels. Shuffled (half swapped): no head fits the validation prompts any more (the
    planted run fits them all), so the chosen head's validation accuracy drops below 1. Its held-out accuracy
    is not asserted: a head fit to coin-flip labels still picks the quality axis, with a random sign, so on
    this planted data it lands near 0 or near 1 by chance. Reversed: the probe learns the reverse."""
    held = write(planted_pairs()[24:], tmp_path / "held.jsonl")
    planted = train_reward_model(_config(tmp_path, eval_pairs=str(held)),
                                 write(planted_pairs()[:24], tmp_path / "a.jsonl"), tmp_path / "rm")
    assert planted["probe"]["validation_accuracy"] == 1.0
    shuffled = train_reward_model(_config(tmp_path, eval_pairs=str(held)),
                                  write(planted_pairs(flip_seed=0)[:24], tmp_path / "b.jsonl"),
                                  tmp_path / "rm_shuffled")
    assert shuffled["probe"]["validation_accuracy"] <= 0.8
    reversed_ = write([dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in planted_pairs()[:24]],
                      tmp_path / "reversed.jsonl")
    result = train_reward_model(_config(tmp_path, eval_pairs=str(held)), reversed_, tmp_path / "rm_reversed")
    assert result["eval"]["accuracy"] == 0.0  # it learns whatever the labels say


def test_the_tier_objective_trains_a_three_way_probe(tmp_path, capsys):
    rows = []
    for i, topic in enumerate(TOPICS):
        prompt = f"Write about {topic}."
        rows += [{"prompt": prompt, "completion": good(topic), "tier": "good"},
                 {"prompt": prompt, "completion": f"A story about {topic}. It happened. Then it ended.", "tier": "ok"},
                 {"prompt": prompt, "completion": bad(topic), "tier": "bad"}]
    train = write(rows[:72], tmp_path / "train.jsonl")
    held = write(rows[72:], tmp_path / "held.jsonl")
    result = train_reward_model(_config(tmp_path, objective="tier", eval_pairs=str(held)), train, tmp_path / "rm")
    assert result["eval"]["pairs"] == 18  # 3 better/worse pairs per held-out prompt
    assert result["eval"]["accuracy"] >= 0.9 and result["eval_tier_accuracy"] >= 0.8
    pairs = write([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": bad(t)}
                   for r, t in zip(rows[72::3], TOPICS[24:])], tmp_path / "pairs.jsonl")
    assert ahf_main(["eval", "rm", "--model", str(tmp_path / "rm"), "--pairs", str(pairs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0  # good beats bad by expected tier


def test_probe_refusals_name_the_problem(tmp_path):
    train = write(planted_pairs()[:24], tmp_path / "train.jsonl")
    # several tasks: training.rm's multi-task rules, as for a fine-tuned model
    with pytest.raises(UserError, match="objective=pairwise"):
        train_reward_model(_config(tmp_path, objective="tier"), {"a": train, "b": train}, tmp_path / "rm")
    with pytest.raises(UserError, match="maps each task to its held-out file"):
        train_reward_model(_config(tmp_path, eval_pairs=str(train)), {"a": train, "b": train}, tmp_path / "rm")
    with pytest.raises(UserError, match="needs joint training"):
        train_reward_model(_config(tmp_path, eval_pairs={"a": str(train)}), train, tmp_path / "rm")
    with pytest.raises(UserError, match=r"eval_pairs names tasks \['c'\]"):
        train_reward_model(_config(tmp_path, eval_pairs={"c": str(train)}), {"a": train, "b": train}, tmp_path / "rm")
    with pytest.raises(UserError, match="at least two tasks"):
        train_reward_model(_config(tmp_path), {"a": train}, tmp_path / "rm")
    with pytest.raises(UserError, match="probe_chunk_tokens=600"):
        train_reward_model(_config(tmp_path, probe_chunk_tokens=600, probe_chunk_stride=300), train, tmp_path / "rm")
    one_prompt = write([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3, tmp_path / "one.jsonl")
    with pytest.raises(UserError, match="both sides of the validation split"):
        train_reward_model(_config(tmp_path, eval_fraction=0.0), one_prompt, tmp_path / "rm")
    with pytest.raises(UserError, match="both sides of the validation split"):
        train_reward_model(_config(tmp_path, eval_fraction=0.0, probe_selection_folds=1), one_prompt, tmp_path / "rm")
    with pytest.raises(UserError, match="probe_refit=false .* probe_selection_folds 0 or 1"):
        train_reward_model(_config(tmp_path, probe_refit=False), train, tmp_path / "rm")


# ----------------------------------------------------------------------------- real stories

def test_on_real_story_pairs_the_probe_sees_whole_stories_but_is_not_clear_of_length(shared_data, tmp_path):
    """What holds on the 374 WritingPrompts pairs (docs/training.md, "A small-data recipe"): every token of
    every story is embedded, the default (inner 5-fold cross-validation over the 42 training prompts) picks
    words + sentence_words, and on the held-out 20 % of prompts of seed 0 it is ahead of "the longer story
    wins" (64 vs 53 of 96) but NOT beyond the paired interval (10 prompts are too few; the cross-validated
    figures in the docs are the evidence)."""
    pairs = D.load_pairs(shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)
    train, held = D.split_by_prompt(pairs, 0.2, 0)
    D.write_pairs(train, tmp_path / "train.jsonl")
    D.write_pairs(held, tmp_path / "held.jsonl")
    result = train_reward_model(_config(tmp_path, eval_pairs=str(tmp_path / "held.jsonl")), tmp_path / "train.jsonl",
                                tmp_path / "rm")
    assert (result["train_prompts"], result["eval_prompts"], result["eval"]["pairs"]) == (42, 10, 96)
    embedding = result["embedding"]
    assert embedding["texts"] == 313 and embedding["windows"] == 665  # 261 stories + 52 prompts, 384-token windows
    assert result["tokens"] == {"seen": 169785, "whole": 169785, "share_seen": 1.0}
    assert result["probe"]["features"]["names"] == ["words", "sentence_words"]
    assert result["probe"]["selection_folds"] == 5 and result["validation_prompts"] == 42
    ev = result["eval"]
    assert ev["accuracy"] == pytest.approx(64 / 96) and ev["length_baseline"] == pytest.approx(53 / 96)
    low, high = ev["vs_length"]["ci"]
    assert low < 0 < high  # not beyond the length baseline's interval on 10 prompts


@pytest.mark.parametrize("selection_folds", [5, 1])
def test_the_feature_set_is_chosen_on_held_out_training_prompts(tmp_path, selection_folds):
    """Fluent beats garbled at exactly the same word count: a head on word counts has nothing to go on
    (held-out accuracy 0: equal rewards are no win), one on embeddings gets every held-out pair, pooled over
    the 5 inner folds (24 prompts) or on the one validation split (5 prompts)."""
    def words(text: str, n: int = 24) -> str:
        return " ".join((text.split() * 2)[:n])

    rows = [dict(r, chosen=words(r["chosen"]), rejected=words(r["rejected"])) for r in planted_pairs()]
    train, held = write(rows[:24], tmp_path / "train.jsonl"), write(rows[24:], tmp_path / "held.jsonl")
    result = train_reward_model(_config(tmp_path, eval_pairs=str(held), probe_feature_sets=[["words"], ["embedding"]],
                                        probe_selection_folds=selection_folds), train, tmp_path / "rm")
    assert result["probe"]["features"] == {"names": ["embedding"], "dim": 384}
    best = {}
    for row in result["probe"]["validation"]:
        best["+".join(row["features"])] = max(best.get("+".join(row["features"]), 0.0), row["validation_accuracy"])
        assert len(row.get("fold_accuracy", [None])) == max(1, selection_folds)
    assert best == {"words": 0.0, "embedding": 1.0}
    assert result["validation_prompts"] == (24 if selection_folds > 1 else 5)
    assert result["eval"]["accuracy"] == 1.0


class _Pair:  # a pair of synthetic feature vectors under a prompt (no encoder)
    def __init__(self, prompt, chosen, rejected):
        self.prompt, self.chosen, self.rejected = prompt, chosen, rejected


def _synthetic(prompts: int = 40, per_prompt: int = 3, seed: int = 0) -> list[_Pair]:
    """Columns 0-3 ("embedding") carry a planted preference plus noise; columns 4-7 ("interaction") and 8
    ("words") are noise only."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.tensor([1.0, -0.5, 0.5, 1.0] + [0.0] * 5)
    pairs = []
    for p in range(prompts):
        for _ in range(per_prompt):
            a, b = torch.randn(9, generator=generator), torch.randn(9, generator=generator)
            better = (a - b) @ direction > 0
            pairs.append(_Pair(f"prompt {p}", a if better else b, b if better else a))
    return pairs


def _synthetic_rows(pairs: list[_Pair], features: Features) -> Rows:
    columns = {"embedding": [0, 1, 2, 3], "interaction": [4, 5, 6, 7], "words": [8]}
    pick = [i for name in features.names for i in columns[name]]
    x = torch.stack([side[pick] for p in pairs for side in (p.chosen, p.rejected)])
    return Rows(x, torch.arange(0, 2 * len(pairs), 2), torch.arange(1, 2 * len(pairs), 2))


def test_inner_cross_validation_chooses_the_informative_feature_set_and_refits_on_its_pooled_epoch():
    pairs = _synthetic()
    config = RMConfig(method="probe", probe_feature_sets=[["words"], ["interaction"], ["embedding"]],
                      probe_l2=[0.1, 0.001], probe_max_epochs=120, probe_patience=30)
    splits = selection_splits(pairs, config)
    assert len(splits) == 5
    held_prompts = [{p.prompt for p in held} for _, held in splits]
    assert sorted(p for part in held_prompts for p in part) == sorted({p.prompt for p in pairs})  # each once
    assert all(not part & {p.prompt for p in fit} for part, (fit, _) in zip(held_prompts, splits))  # by prompt
    best, features, table = choose_head(splits, _synthetic_rows, config)
    assert features.names == ("embedding",) and best.head is None  # k heads, no single one: the caller refits
    chosen = next(row for row in table if row["chosen"])
    assert chosen["validation_accuracy"] >= 0.9 and len(chosen["fold_accuracy"]) == 5
    noise = [row["validation_accuracy"] for row in table if row["features"] != ["embedding"]]
    assert max(noise) < 0.75 < chosen["validation_accuracy"]
    # the pooled figure is the held-out pairs won over all folds, at the one epoch the curve peaks
    assert chosen["curve"][chosen["best_epoch"] - 1] == max(chosen["curve"]) == chosen["validation_accuracy"]
    sizes = [len(held) for _, held in splits]
    pooled = sum(a * n for a, n in zip(chosen["fold_accuracy"], sizes)) / sum(sizes)
    assert pooled == pytest.approx(chosen["validation_accuracy"], abs=1e-3)
    # deterministic for a seed; another seed reassigns the prompts to folds
    assert choose_head(selection_splits(pairs, config), _synthetic_rows, config)[2] == table
    other = selection_splits(pairs, config.model_copy(update={"seed": 1}))
    assert [{p.prompt for p in h} for _, h in other] != held_prompts
    # k past the prompt count: leave-one-prompt-out
    assert len(selection_splits(pairs, config.model_copy(update={"probe_selection_folds": 100}))) == 40


def test_one_selection_fold_is_the_single_validation_split_of_fit_head():
    """Mutation check: probe_selection_folds 0 or 1 must reproduce the previous path exactly: the
    probe_validation_fraction split, and for every candidate fit_head's early-stopped epoch, accuracy,
    loss, curve and head."""
    pairs = _synthetic(seed=3)
    config = RMConfig(method="probe", probe_selection_folds=1, probe_feature_sets=[["words"], ["embedding"]],
                      probe_l2=[0.1, 0.001], probe_max_epochs=150, probe_patience=20)
    splits = selection_splits(pairs, config)
    assert splits == [D.split_by_prompt(pairs, 0.2, 0)]
    assert selection_splits(pairs, config.model_copy(update={"probe_selection_folds": 0})) == splits
    best, features, table = choose_head(splits, _synthetic_rows, config)
    fit_part, validation_part = splits[0]
    for row in table:
        f = Features(tuple(row["features"]))
        old = fit_head(_synthetic_rows(fit_part, f), _synthetic_rows(validation_part, f), 0, row["l2"], config.probe_lr,
                       config.probe_max_epochs, config.probe_patience, config.seed)
        assert (row["best_epoch"], row["validation_accuracy"], row["validation_loss"], row["curve"]) == \
            (old.best_epoch, round(old.validation_accuracy, 4), round(old.validation_loss, 4), old.curve)
        assert "fold_accuracy" not in row
        if row["chosen"]:
            for key, value in old.head.state_dict().items():
                torch.testing.assert_close(best.head.state_dict()[key], value, rtol=0, atol=0)
    # and with several folds, one head per fold trains exactly as fit_head would on that fold
    f = Features(("embedding",))
    folds = [(_synthetic_rows(a, f), _synthetic_rows(b, f)) for a, b in
             selection_splits(pairs, config.model_copy(update={"probe_selection_folds": 3}))]
    pooled = fit_heads_pooled(folds, 0, 0.1, 0.01, 40, 40, 0)
    alone = [fit_head(a, b, 0, 0.1, 0.01, 40, 40, 0) for a, b in folds]
    assert pooled.fold_accuracy == [round(fit.curve[pooled.best_epoch - 1], 4) for fit in alone]


def test_sentence_words_is_the_log_mean_words_per_sentence():
    from training.probe import Features

    features = Features(("sentence_words", "words"))
    assert features.names == ("words", "sentence_words")  # always in FEATURES order
    row = features.row(np.zeros(2), np.zeros(2), "One two three. Four five six seven eight nine!")
    np.testing.assert_allclose(row, [np.log(10), np.log(9 / 2)], rtol=1e-6)
    with pytest.raises(UserError, match="probe_feature_sets"):
        Features(("colour",))


def test_finetune_truncation_reports_reply_tokens_seen_against_whole():
    from training.tokens import LengthPolicy

    report = D.FilterReport()
    prompt, (long, short) = LengthPolicy(10, 4).fit([1, 2], [[5] * 20, [6] * 3], report)
    assert len(long) == 8 and short == [6] * 3  # the long reply cut to the budget, end token kept
    LengthPolicy(10, 4).fit([1, 2], [[7] * 4, [8] * 4], report)  # fits: nothing cut
    assert report.to_dict()["reply_tokens"] == {"seen": 8 + 3 + 8, "whole": 20 + 3 + 8, "share_seen": 0.6129}
    assert "reply_tokens" not in D.FilterReport().to_dict()  # reports no policy counted keep their shape


# ----------------------------------------------------------------------------- several tasks (--task)

def short_reply(topic: str) -> str:
    return f"A note on {topic}."


def long_reply(topic: str) -> str:
    return (f"A note on {topic}. It goes on for a while, adding one plain detail after another. Then it adds "
            f"a few more, and only after all of that does it come to a close.")


def length_task_pairs(longer_wins: bool) -> list[dict]:
    """One pair per topic between the same two replies: task `long` prefers the longer, `short` the shorter
    (the same texts, opposite labels: only the head tells the tasks apart)."""
    return [{"prompt": f"Write about {t}.", "chosen": long_reply(t) if longer_wins else short_reply(t),
             "rejected": short_reply(t) if longer_wins else long_reply(t)} for t in TOPICS]


@pytest.fixture(scope="module")
def length_tasks(tmp_path_factory):
    """Per task (long, short): 24 training and 6 held-out pairs (different topics)."""
    work = tmp_path_factory.mktemp("probe_tasks")
    files = {}
    for name, longer in (("long", True), ("short", False)):
        rows = length_task_pairs(longer)
        files[name] = (write(rows[:24], work / f"{name}_train.jsonl"), write(rows[24:], work / f"{name}_held.jsonl"))
    return files, work


def _quick(cache, **extra) -> RMConfig:  # fewer candidates than the defaults: the same code, less time
    return RMConfig(method="probe", probe_cache_dir=str(cache), probe_l2=[0.1, 0.01], probe_max_epochs=150, **extra)


def test_a_multi_task_probe_has_one_head_per_task_each_a_single_task_probe(length_tasks):
    from training.rm import score_reward_model

    files, work = length_tasks
    cache = work / "cache"
    tasks = {name: str(train) for name, (train, _) in files.items()}
    held = {name: str(h) for name, (_, h) in files.items()}
    result = train_reward_model(_quick(cache, eval_pairs=held), tasks, work / "joint")
    assert result["tasks"] == ["long", "short"] and result["task_conditioning"] == "task_head"
    # one encoder, one cache: the two tasks' texts (the same 30 prompts and 60 replies) embedded once
    assert result["embedding"]["texts"] == 90 and result["embedding"]["encoded"] == 90
    for name in tasks:
        by_task = result["by_task"][name]
        assert (by_task["train_rows"], by_task["eval_prompts"], by_task["train_used"]) == (24, 6, 24)
        assert by_task["eval_source"] == f"eval file {held[name]}" and by_task["validation_prompts"] == 24
        assert result["eval_by_task"][name]["pairs"] == 6 and result["eval_by_task"][name]["accuracy"] == 1.0
    assert result["eval_by_task"]["long"]["length_baseline"] == 1.0  # the longer reply wins in `long` only
    assert result["eval_by_task"]["short"]["length_baseline"] == 0.0
    card = json.loads((work / "joint" / "ahf_model.json").read_text())
    assert card["tasks"] == ["long", "short"] and set(card["data"]["tasks"]) == {"long", "short"}
    assert set(card["probe"]["by_task"]) == {"long", "short"} and "features" not in card["probe"]

    # each task's held-out pairs: its own head gets them all, the other task's head none (swapping heads fails)
    for name, other in (("long", "short"), ("short", "long")):
        own = score_reward_model(work / "joint", held[name], task=name)
        swapped = score_reward_model(work / "joint", held[name], task=other)
        assert np.mean(np.array(own[0]) > np.array(own[1])) == 1.0
        assert np.mean(np.array(swapped[0]) > np.array(swapped[1])) == 0.0

    # each head is exactly the single-task probe of its task (same seed; its embeddings from the shared cache)
    for name in tasks:
        alone = train_reward_model(_quick(cache, eval_pairs=held[name]), tasks[name], work / f"alone_{name}")
        assert alone["embedding"]["encoded"] == 0
        shared = ("encoder", "encoder_key", "chunking")
        assert result["probe"]["by_task"][name] == {k: v for k, v in alone["probe"].items() if k not in shared}
        assert {k: result["probe"][k] for k in shared} == {k: alone["probe"][k] for k in shared}
        assert result["eval_by_task"][name] == alone["eval"]
        assert {k: result["by_task"][name][k] for k in ("validation_rows", "validation_prompts", "train_used")} == \
            {k: alone[k] for k in ("validation_rows", "validation_prompts", "train_used")}
        joint_scores = score_reward_model(work / "joint", held[name], task=name)[:2]
        assert joint_scores == score_reward_model(work / f"alone_{name}", held[name])[:2]  # the same rewards
    assert result["steps"] == sum(r["epochs"] for r in result["probe"]["by_task"].values())


def test_train_and_eval_rm_with_task_on_a_probe_cli(length_tasks, capsys):
    files, work = length_tasks
    out = work / "cli"
    # held out: 20 % of each task's prompts (its own seeded split), as a fine-tuned joint model takes them
    assert ahf_main(["train", "rm", "--task", f"long={files['long'][0]}", "--task", f"short={files['short'][0]}",
                     "--out", str(out), "--set", "method=probe", "--set", f"probe_cache_dir={work / 'cache'}",
                     "--set", "probe_l2=[0.1]", "--set", "probe_max_epochs=150"]) == 0
    printed = capsys.readouterr().out
    card = json.loads((out / "ahf_model.json").read_text())
    result = card["train_result"]
    for name in ("long", "short"):
        held = D.split_by_prompt(D.load_pairs(files[name][0]), 0.2, 0)[1]
        assert result["by_task"][name]["eval_rows"] == len(held) == 5  # 20 % of 24 prompts
        assert result["by_task"][name]["eval_source"] == "20% of the training prompts"
        ev = result["eval_by_task"][name]
        assert f"held-out {name} (5 prompts, 5 pairs): accuracy {ev['accuracy']:.3f}" in printed

    held_long, held_short = files["long"][1], files["short"][1]
    for name, pairs, baseline in (("long", held_long, 1.0), ("short", held_short, 0.0)):
        assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(pairs), "--task", name, "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert evaluated["task"] == name and evaluated["method"] == "probe" and evaluated["pairs"] == 6
        assert evaluated["accuracy"] == 1.0 and evaluated["length_baseline"] == baseline
        assert evaluated["embedding"]["encoded"] == 0
    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_long), "--task", "short", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.0  # the other task's head
    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_long), "--task", "long"]) == 0
    assert "6 pairs, 6 prompts: accuracy 1.000" in capsys.readouterr().out
    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_long)]) == 2
    assert "trained jointly on tasks long, short: name one" in capsys.readouterr().err
    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_long), "--task", "poems"]) == 2
    assert "unknown task 'poems': this reward model knows long, short" in capsys.readouterr().err

    # a single-task probe still refuses a task
    single = work / "single"
    train_reward_model(_quick(work / "cache", eval_pairs=str(held_long)), files["long"][0], single)
    assert ahf_main(["eval", "rm", "--model", str(single), "--pairs", str(held_long), "--task", "long"]) == 2
    assert "single-task; it takes no task" in capsys.readouterr().err

    # ensembles take a multi-task probe as any multi-task member: the same task list, scored with a task
    import shutil

    shutil.copytree(out, work / "cli_copy")
    assert ahf_main(["merge", "rm", str(out), str(single), "--method", "ensemble", "--out", str(work / "no")]) == 2
    assert "must score the same tasks" in capsys.readouterr().err
    assert ahf_main(["merge", "rm", str(out), str(work / "cli_copy"), "--method", "ensemble",
                     "--out", str(work / "ensemble"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ["long", "short"]
    assert ahf_main(["eval", "rm", "--model", str(work / "ensemble"), "--pairs", str(held_short), "--task", "short",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert ahf_main(["eval", "rm", "--model", str(work / "ensemble"), "--pairs", str(held_short)]) == 2
    assert "trained jointly on tasks long, short" in capsys.readouterr().err
    assert ahf_main(["merge", "rm", str(out), str(work / "cli_copy"), "--out", str(work / "weights")]) == 2
    assert "no weights to merge" in capsys.readouterr().err
