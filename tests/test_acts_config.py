"""The act definitions (configs/acts.yaml) and the cue arithmetic, on real texts from ../shared/data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from ahf.console import UserError
from index.acts import (
    OTHER,
    ActDef,
    ActsConfig,
    LengthPrior,
    assign,
    length_scores,
    load_acts_config,
    structure_scores,
    word_counts,
)
from index.checkset import build_checkset, detokenize


def test_shipped_config_defines_the_four_acts_with_all_cue_kinds():
    config = load_acts_config()
    assert set(config.acts) == {"story", "explanation", "qa", "summary"}
    for name, act in config.acts.items():
        assert act.bm25_terms.strip(), name
        assert len(act.exemplars) >= 4, name
        assert act.cues, name
        assert act.length.min_words < act.length.max_words, name


def test_config_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "acts.yaml"
    bad.write_text("acts:\n  story:\n    cues:\n      - {field: reply, pattern: '(unclosed'}\n")
    with pytest.raises(UserError, match=r"acts\.yaml: acts\.story\.cues\.0\.pattern"):
        load_acts_config(str(bad))
    bad.write_text("acts:\n  other: {}\n")
    with pytest.raises(UserError, match="reserved"):
        load_acts_config(str(bad))
    with pytest.raises(UserError, match=r"min_confidence"):
        load_acts_config(None, ["min_confidence=2"])


def test_overrides_reach_the_model():
    config = load_acts_config(None, ["weights.dense=0.5", "acts.summary.length.min_words=7"])
    assert config.weights.dense == 0.5
    assert config.acts["summary"].length.min_words == 7


def test_length_prior_shape():
    prior = LengthPrior(min_words=100, max_words=1000)
    got = length_scores(np.array([0, 50, 100, 500, 1000, 2000]), prior)
    assert got.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0, 0.5]


def test_word_counts_and_structure_cues_on_real_prompts(shared_data):
    checkset = build_checkset(shared_data, max_stories=40, max_explanations=40, max_distractors=0)
    titles = {p["id"]: p["title"] for p in checkset.posts}
    table = pa.table({
        "reply": [c["body"] for c in checkset.comments],
        "title": [titles[c["link_id"][3:]] for c in checkset.comments],
        "parent_text": [titles[c["link_id"][3:]] for c in checkset.comments],
        "context": [titles[c["link_id"][3:]] for c in checkset.comments],
    })
    labels = [checkset.labels[c["id"]] for c in checkset.comments]
    config = load_acts_config()
    story = structure_scores(table, config.acts["story"])
    explanation = structure_scores(table, config.acts["explanation"])
    is_story = np.array([lab == "story" for lab in labels])
    # Every Fan et al. prompt carries a tag such as [WP] or [IP]; no ELI5 question does.
    assert (story[is_story] >= 1.0 - 1e-9).mean() >= 0.95
    assert (story[~is_story] < 1.0).all()
    # ELI5 questions end with '?' and mostly start with why/how: the explanation cues fire there.
    assert explanation[~is_story].mean() > explanation[is_story].mean() + 0.3
    words = word_counts(table["reply"])
    assert words.tolist()[0] == len(checkset.comments[0]["body"].split())


def test_assign_picks_the_best_act_and_other_below_threshold():
    acts, conf = assign({"story": np.array([0.9, 0.2, 0.5]), "qa": np.array([0.1, 0.3, 0.6])}, 0.4)
    assert acts.tolist() == ["story", OTHER, "qa"]
    assert conf.tolist() == [0.9, 0.3, 0.6]


def test_detokenize_restores_reddit_text():
    assert detokenize("[ WP ] You do n't know , do you ? ( maybe )") == "[WP] You don't know, do you? (maybe)"
    assert detokenize("`` Hi , '' she said .") == '"Hi," she said.'


def test_checkset_counts_every_source_row(shared_data, tmp_path):
    from index.checkset import write_checkset

    result = write_checkset(build_checkset(shared_data), tmp_path)
    # 501 CSV rows = 498 stories + 3 aggregate rows; 404 valid ELI5 answers; the whole Dec 2005 dump.
    assert result["labels"] == {"explanation": 404, "other": 1075, "story": 498}
    assert result["skipped"] == {"fan2018_aggregate_rows": 3}
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert len(labels) == 1977
    subs = {json.loads(line)["subreddit"] for line in (tmp_path / "RC_checkset.ndjson").open()}
    assert subs == {"threads"}


def test_actdef_defaults_are_usable():
    act = ActDef()
    assert act.cues == [] and act.length.min_words == 1
    with pytest.raises(ValueError):
        ActsConfig(acts={})
