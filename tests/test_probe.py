"""`method: probe` (training/probe.py): a frozen sentence encoder (the real offline MiniLM), whole texts by
overlapping windows, cached embeddings, a head chosen on the validation split, saved and scored by `ahf eval rm`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ahf.cli import main as ahf_main
from ahf.console import UserError
from training import data as D
from training.probe import (Chunking, embedding_cache, FrozenEncoder, Rows, covered, embed_texts, fit_head,
                            head_accuracy, score_with_probe)
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
    first, stats = embed_texts([story, "short"], encoder, chunking, cache)
    whole = len(encoder.tokens(story)) + len(encoder.tokens("short"))
    assert stats["tokens_seen"] == stats["tokens_whole"] == whole and whole > 700  # nothing cut
    assert stats["windows"] == len(chunking.windows(len(encoder.tokens(story)))) + 1
    # the text's vector is the token-count-weighted mean of its windows' vectors
    ids = encoder.tokens(story)
    spans = chunking.windows(len(ids))
    vectors = encoder.embed([ids[s:e] for s, e in spans])
    weights = np.array([e - s for s, e in spans], dtype=np.float32)
    np.testing.assert_allclose(first[story], (vectors * weights[:, None]).sum(0) / weights.sum(), atol=1e-5)
    again, stats = embed_texts([story, "short"], encoder, chunking, cache)
    assert stats["encoded"] == 0 and stats["cached"] == 2 and stats["windows"] == 0
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
    assert result["validation_prompts"] == 5 and result["train_used"] == 24  # refit on train + validation
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
    with pytest.raises(UserError, match="method=probe trains on one DATA"):
        train_reward_model(_config(tmp_path), {"a": train, "b": train}, tmp_path / "rm")
    with pytest.raises(UserError, match="probe_chunk_tokens=600"):
        train_reward_model(_config(tmp_path, probe_chunk_tokens=600, probe_chunk_stride=300), train, tmp_path / "rm")
    one_prompt = write([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3, tmp_path / "one.jsonl")
    with pytest.raises(UserError, match="both sides of the validation split"):
        train_reward_model(_config(tmp_path, eval_fraction=0.0), one_prompt, tmp_path / "rm")


# ----------------------------------------------------------------------------- real stories

def test_on_real_story_pairs_the_probe_sees_whole_stories_but_is_not_clear_of_length(shared_data, tmp_path):
    """What holds on the 374 WritingPrompts pairs (docs/training.md, "A small-data recipe"): every token of
    every story is embedded, the run is deterministic, and on the held-out 20 % of prompts of seed 0 the
    default probe is ahead of "the longer story wins" (65 vs 53 of 96) but NOT beyond the paired interval
    (10 prompts are too few; the cross-validated figures in the docs are the evidence)."""
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
    assert result["probe"]["features"]["names"] == ["embedding", "interaction", "words"]
    ev = result["eval"]
    assert ev["accuracy"] == pytest.approx(65 / 96) and ev["length_baseline"] == pytest.approx(53 / 96)
    low, high = ev["vs_length"]["ci"]
    assert low < 0 < high  # not beyond the length baseline's interval on 10 prompts


def test_the_feature_set_is_chosen_on_the_validation_split(tmp_path):
    """Fluent beats garbled at exactly the same word count: a head on word counts has nothing to go on
    (validation accuracy 0: equal rewards are no win), one on embeddings gets every validation pair."""
    def words(text: str, n: int = 24) -> str:
        return " ".join((text.split() * 2)[:n])

    rows = [dict(r, chosen=words(r["chosen"]), rejected=words(r["rejected"])) for r in planted_pairs()]
    train, held = write(rows[:24], tmp_path / "train.jsonl"), write(rows[24:], tmp_path / "held.jsonl")
    result = train_reward_model(_config(tmp_path, eval_pairs=str(held), probe_feature_sets=[["words"], ["embedding"]]),
                                train, tmp_path / "rm")
    assert result["probe"]["features"] == {"names": ["embedding"], "dim": 384}
    best = {}
    for row in result["probe"]["validation"]:
        best["+".join(row["features"])] = max(best.get("+".join(row["features"]), 0.0), row["validation_accuracy"])
    assert best == {"words": 0.0, "embedding": 1.0}
    assert result["eval"]["accuracy"] == 1.0


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
