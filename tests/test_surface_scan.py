"""training/surface_scan.py and `ahf eval surface`: the 7-feature surface scan, nested inside the outer folds
by prompt."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training import data as D
from ahf.cli import main as ahf_main
from training.data import prompt_folds
from training.probe import Features
from training.surface_scan import FEATURES, dialogue, first_person, paragraphs, pick, probe_value, scan, \
    surface_features, surface_scan

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def quoted_pairs(prompts: int = 10, per_prompt: int = 2) -> list[D.Pair]:
    """The chosen reply quotes its speech, the rejected one says the same words unquoted: same word count,
    sentences, paragraphs and first person, so only `dialogue` tells them apart."""
    pairs = []
    for i in range(prompts):
        for j in range(per_prompt):
            a, b, c = WORDS[(i + j) % 16], WORDS[(2 * i + j + 3) % 16], WORDS[(i + 3 * j + 7) % 16]
            pairs.append(D.Pair(prompt=f"[WP] prompt {i}", chosen=f'"{a} {b} {c}" she said. Then {c} went home.',
                                rejected=f"{a} {b} {c}, she said. Then {c} went home."))
    return pairs


def planted(pairs: list[D.Pair], sign_of_prompt) -> dict[tuple[str, str], float]:
    """A hand-made feature: the chosen reply's value is 1 above the rejected's (below where sign is -1)."""
    values = {}
    for n, p in enumerate(pairs):
        s = sign_of_prompt(p.prompt)
        values[(p.prompt, p.chosen)], values[(p.prompt, p.rejected)] = 10.0 * n + s, 10.0 * n
    return values


def one_pair_per_prompt(prompts: int) -> list[D.Pair]:
    return [D.Pair(prompt=f"p{i:02d}", chosen=f"good {i}", rejected=f"bad {i}") for i in range(prompts)]


# ----------------------------------------------------------------------------- the text features

def test_text_feature_values_on_hand_written_strings():
    # 6 words, 4 of them inside straight or curly quotes (the marks are not words)
    assert dialogue('"Hello there," she said. “Go home.”') == pytest.approx(4 / 6)
    assert dialogue('He said "wait\nand then" ok') == 0.0  # a quote closes on its own line
    assert dialogue("") == 0.0
    assert paragraphs("One.\n\nTwo.\nThree.\n  \n") == pytest.approx(math.log(4))  # 3 non-blank lines
    # I'm (by its part before the apostrophe), we, US, me, my, Us: 6 of 10 words
    assert first_person("I'm sure we saw US, me and my dog. Us!") == pytest.approx(0.6)
    assert first_person("Mine is ours, myself. Iron mines.") == pytest.approx(3 / 6)
    for text, expected in [("One two three. Four five!", math.log(5 / 2)), ("a b c", math.log(3)),
                           ("Wait... what?!", 0.0)]:
        assert probe_value("sentence_words", text) == pytest.approx(expected, rel=1e-6)
        # exactly the probe's value (float32, as its head sees it before standardisation)
        assert probe_value("sentence_words", text) == float(Features(("sentence_words",)).row(None, None, text)[0])
    assert probe_value("words", "One two three. Four five!") == float(np.float32(math.log(6)))


def test_embedding_features_from_hand_made_embeddings():
    pairs = [D.Pair("P", "A", "B"), D.Pair("P", "C", "B")]
    embeddings = {"P": np.array([1.0, 0.0]), "A": np.array([2.0, 0.0]), "B": np.array([0.0, 3.0]),
                  "C": np.array([1.0, 2.0])}
    values = surface_features(pairs, embeddings)
    assert list(values) == list(FEATURES)
    similarity, originality = values["prompt_similarity"], values["originality"]
    assert [similarity[("P", r)] for r in "ABC"] == pytest.approx([1.0, 0.0, 1 / math.sqrt(5)])
    # 1 - the closest sibling: A's is C (1/√5); B's and C's are each other (2/√5)
    assert [originality[("P", r)] for r in "ABC"] == pytest.approx([1 - 1 / math.sqrt(5), 1 - 2 / math.sqrt(5),
                                                                     1 - 2 / math.sqrt(5)])
    assert list(surface_features(pairs)) == ["words", "sentence_words", "dialogue", "paragraphs", "first_person"]


# ----------------------------------------------------------------------------- the scan

def test_a_feature_that_decides_every_pair_is_picked_in_every_fold_and_wins_every_held_out_pair():
    pairs = quoted_pairs()
    features = surface_features(pairs)  # no embeddings: the 5 text features
    result = scan(pairs, 5, 0, features)
    assert [(p["feature"], p["direction"], p["train_accuracy"]) for p in result["picks"]] == [("dialogue", 1, 1.0)] * 5
    assert (result["pairs"], result["prompts"], result["held_wins"], result["accuracy"]) == (20, 10, 20.0, 1.0)
    # every other rule ties every pair: half a win each
    assert pick(pairs, {name: features[name] for name in features if name != "dialogue"})[1:] == (1, 0.5)


def test_ties_keep_the_earlier_feature_then_plus_one():
    pairs = one_pair_per_prompt(4)
    same = planted(pairs, lambda prompt: 1 if prompt < "p02" else -1)  # 2 of 4 each way: 0.5 both directions
    assert pick(pairs, {"first": same, "second": dict(same)}) == ("first", 1, 0.5)


@pytest.mark.parametrize("reversed_prompts, held_wins", [(3, 7.0), (5, 0.0)])
def test_the_direction_is_learned_on_the_training_prompts_only(reversed_prompts, held_wins):
    """Leave one prompt out over 10 prompts, one pair each; the planted feature's sign is reversed on some.
    3 reversed: each fold's 9 training prompts vote +1 (6-3 or 7-2), so exactly the 7 normal prompts win.
    5 reversed: holding a normal prompt out leaves 4 normal vs 5 reversed, so the rule says -1 and loses it;
    holding a reversed one out leaves 5 vs 4, +1, and loses it: 0 of 10, where any one direction fitted on
    all pairs would score 0.5. Only the training prompts chose."""
    pairs = one_pair_per_prompt(10)
    feature = {"planted": planted(pairs, lambda prompt: -1 if int(prompt[1:]) < reversed_prompts else 1)}
    result = scan(pairs, 52, 0, feature)  # --folds past the prompt count: leave one prompt out
    assert result["folds"] == 10 and result["held_wins"] == held_wins
    for (train, held), p in zip(prompt_folds(pairs, 52, 0), result["picks"]):
        normal = sum(int(q.prompt[1:]) >= reversed_prompts for q in train)
        assert p["direction"] == (1 if normal > len(train) - normal else -1)
        assert p["held_wins"] == float(p["direction"] == (-1 if int(held[0].prompt[1:]) < reversed_prompts else 1))


# ----------------------------------------------------------------------------- the real pairs

def test_on_the_real_story_pairs_the_text_only_scan_picks_sentence_words_in_every_fold(shared_data):
    """Seed 0, 5 folds by prompt, the 5 text features (no encoder): every fold's training prompts pick shorter
    sentences (sentence_words, -1), which wins 231 of the 374 held-out pairs (0.618, docs/training.md)."""
    pairs = D.load_pairs(shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)
    result = scan(pairs, 5, 0, surface_features(pairs))
    assert (result["pairs"], result["prompts"], result["folds"]) == (374, 52, 5)
    assert [(p["feature"], p["direction"]) for p in result["picks"]] == [("sentence_words", -1)] * 5
    assert [p["train_accuracy"] for p in result["picks"]] == [0.6486, 0.6012, 0.6006, 0.6013, 0.6449]
    assert [p["runner_up"]["feature"] for p in result["picks"]] == ["paragraphs"] * 5  # (text features only)
    assert [p["held_pairs"] for p in result["picks"]] == [78, 43, 66, 58, 129]
    assert [p["held_wins"] for p in result["picks"]] == [39.0, 32.0, 46.0, 41.0, 73.0]
    assert result["held_wins"] == 231.0 and result["length_controlled"]["pairs"] == 133


# ----------------------------------------------------------------------------- ahf eval surface

def test_eval_surface_reports_the_nested_pick_and_each_feature(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    D.write_pairs(quoted_pairs(), data)
    assert ahf_main(["eval", "surface", "--pairs", str(data), "--text-only", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(p["feature"], p["direction"]) for p in result["picks"]] == [("dialogue", 1)] * 5
    assert (result["pairs"], result["accuracy"], result["length_baseline"]) == (20, 1.0, 0.5)
    assert result["features"] == list(result["by_feature"]) == ["words", "sentence_words", "dialogue", "paragraphs",
                                                               "first_person"]
    assert result["by_feature"]["dialogue"]["directions"] == [1] * 5
    assert result["by_feature"]["words"]["accuracy"] == 0.5  # equal word counts: every pair a tie
    assert result == json.loads(json.dumps(surface_scan(quoted_pairs(), 5, 0) | {"pairs_file": str(data)}))

    assert ahf_main(["eval", "surface", "--pairs", str(data), "--text-only", "--folds", "52"]) == 0
    human = capsys.readouterr().out
    assert "dialogue (larger wins) in 10" in human and "accuracy 1.000" in human and "ECE" not in human


def test_eval_surface_needs_two_prompts_and_two_folds(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    D.write_pairs(quoted_pairs(prompts=1), data)
    assert ahf_main(["eval", "surface", "--pairs", str(data), "--text-only"]) == 2
    assert "2 pairs on 1 prompt(s)" in capsys.readouterr().err
    assert ahf_main(["eval", "surface", "--pairs", str(data), "--folds", "1"]) == 2
    assert "--folds 1: at least 2" in capsys.readouterr().err
