"""The `ahf` command as users and scripts see it: --json objects, exit codes, messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ahf.cli import main

RC_2005 = "pushshift/RC_2005-12.zst"


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--posts", "40", "--train-steps", "2", "--json"]) == 0
    result = _json(capsys)
    assert result["ok"]
    ingest = result["steps"]["ingest"]
    assert ingest["records_read"] == ingest["ingested"] > 0 and ingest["skipped"] == {}
    assert ingest["posts"] == 40 and ingest["threads"] == 40 and ingest["orphans"] == 0
    turns = result["steps"]["threads and turns"]
    assert turns["comments"] == turns["turns"] + sum(turns["filtered"].values())
    assert turns["filtered"]["bot_author"] == 10  # one AutoModerator sticky per explanation post
    stats = result["steps"]["stats"]
    assert {row["subreddit"] for row in stats["subreddits"]} == {
        "synthetic_stories", "synthetic_explain", "synthetic_questions", "synthetic_life"}
    labels = result["steps"]["label feedback"]
    assert sum(labels["tiers"].values()) == labels["labelled"] > 0 and labels["pairs"]["shp"] > 0
    exported = result["steps"]["export pairs"]
    from datasets import load_from_disk

    pairs = load_from_disk(str(tmp_path / "exports" / "pairs" / "dataset"))
    assert {split: len(rows) for split, rows in pairs.items()} == exported["rows"]
    assert {"prompt", "chosen", "rejected", "margin"} <= set(pairs["train"].column_names)
    acts = result["steps"]["query acts"]["acts"]
    assert sum(acts.values()) == turns["turns"] and acts.get("story", 0) > 0
    trained = result["steps"]["train reward model"]  # on the export directory: evaluated on its validation split
    assert trained["held_out"] == "validation split" and trained["eval"]["pairs"] == exported["rows"]["validation"] > 0
    tested = result["steps"]["evaluate reward model"]
    assert tested["pairs"] == exported["rows"]["test"] and 0.0 <= tested["accuracy"] <= 1.0
    card = json.loads((tmp_path / "models" / "rm" / "ahf_model.json").read_text())
    assert card["data"]["export"]["report"]["rows"] == exported["rows"]  # lineage: the export's manifest
    # the planted truth of the corpus, measured (tests/test_demo_validation.py asserts the default run's goals)
    validation = result["validation"]
    assert {"spearman_raw", "spearman_adjusted", "tier_purity", "shp_agreement", "time_adjacent_agreement",
            "sentiment_agreement", "act_precision", "rm_accuracy", "length_baseline",
            "quality_ceiling"} <= set(validation)
    assert validation["rm_by_split"]["test"]["accuracy"] == round(tested["accuracy"], 4)
    assert validation["rm_pairs"] == tested["pairs"] + trained["eval"]["pairs"]  # every held-out pair
    assert validation == json.loads((tmp_path / "validation.json").read_text())
    assert result["report"] == {"store": result["store"], "models": [str(tmp_path / "models" / "rm")],
                                "exports": [str(tmp_path / "exports" / f) for f in ("pairs", "pointwise", "sft")],
                                "truth": str(tmp_path / "corpus" / "truth.jsonl"),
                                "validation": str(tmp_path / "validation.json"), "html": str(tmp_path / "report.html")}
    written = result["steps"]["write the report"]["out"]
    assert Path(written) == tmp_path / "report.html" and "data:image/svg+xml;base64," in Path(written).read_text()  # figures inline
    # the synthetic corpus is deterministic: a second run gives the same store figures
    assert main(["demo", "--out", str(tmp_path), "--posts", "40", "--train-steps", "0", "--json"]) == 0
    again = _json(capsys)["steps"]["stats"]
    assert {**again, "seconds": 0} == {**stats, "seconds": 0}
    # --reaction-scale reaches the corpus: more replies to comments (58 at scale 1, 117 at 3), the same posts
    assert main(["demo", "--out", str(tmp_path), "--posts", "40", "--train-steps", "0", "--reaction-scale", "3",
                 "--json"]) == 0
    scaled = _json(capsys)["steps"]
    assert scaled["ingest"]["posts"] == 40
    assert scaled["label feedback"]["turns_with_replies"] > 1.5 * labels["turns_with_replies"]
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--reaction-scale", "0"])
    assert exit_info.value.code == 2 and "--reaction-scale: must be a positive number" in capsys.readouterr().err


def test_demo_on_a_real_dump(shared_data, tmp_path, capsys):
    """`--data` with a real dump: acts it lacks are named, not queried, and the empty held-out splits of
    its pairs export (all from a few threads) make training hold out prompts instead, and skip the test."""
    from ahf.demo import _reward_model_summary

    assert main(["demo", "--data", str(shared_data / RC_2005), "--out", str(tmp_path), "--train-steps", "2",
                 "--json"]) == 0
    result = _json(capsys)
    steps = result["steps"]
    assert result["ok"] and steps["corpus"]["source"] == "user data"
    assert result["validation"] is None and result["report"]["truth"] is None  # no planted truth in real data
    assert (steps["ingest"]["records_read"], steps["ingest"]["threads"], steps["ingest"]["orphans"]) == (1075, 396, 15)
    acts = steps["query acts"]
    assert acts["absent"] == ["story", "summary"] and set(acts["top"]) == {"explanation", "qa"}
    assert sum(acts["acts"].values()) == steps["threads and turns"]["turns"] == 930
    rows = steps["export pairs"]["rows"]
    assert rows["train"] > 0 and rows["validation"] == rows["test"] == 0
    trained = steps["train reward model"]
    assert trained["pairs"] == rows
    assert trained["held_out"] == "20% of the training prompts (the export's validation split is empty)"
    assert trained["eval"]["pairs"] > 0 and (tmp_path / "models" / "rm" / "ahf_model.json").exists()
    assert steps["evaluate reward model"]["skipped"] == "the test split of the pairs export is empty"
    assert "test split of the pairs export is empty" in _reward_model_summary(steps)[0]
    # a query for an act the tagger knows but found no turns of has no hits; an act it never knew is an error
    store = str(tmp_path / "store")
    assert main(["query", "--act", "story", "--store", store, "--json"]) == 0
    assert main(["query", "--act", "story", "--store", store, "--json", "a tale of two dragons"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["query", "--act", "qa", "--store", store, "--json", "how do browsers send requests"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # both qa turns of the dump
    assert main(["query", "--act", "poem", "--store", store]) == 2
    assert "unknown act 'poem'; the acts of this store: explanation, other, qa, story, summary" in " ".join(
        capsys.readouterr().err.split())


def test_ingest_then_stats_json(shared_data, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["ingest", str(shared_data / RC_2005), "--store", store, "--json"]) == 0
    result = _json(capsys)
    assert (result["records_read"], result["threads"], result["orphans"]) == (1075, 396, 15)
    assert result["turns"]["turns"] == 930
    assert main(["stats", "--store", store, "--json"]) == 0
    stats = _json(capsys)
    assert stats["turns"] == 930 and stats["deleted_bodies"] == 120
    assert sum(stats["depth"].values()) == 930
    assert stats["subreddits"] == [{"subreddit": "reddit.com", "posts": 0, "comments": 1075, "turns": 930}]


def test_config_override_and_bad_value(shared_data, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["ingest", str(shared_data / RC_2005), "--store", store, "--json",
                 "--set", "turns.min_chars=200"]) == 0
    assert _json(capsys)["turns"]["filtered"]["too_short"] > 3
    assert main(["turns", "--store", store, "--set", "turns.min_chars=lots"]) == 2
    err = capsys.readouterr().err
    assert "turns.min_chars" in err and "Traceback" not in err


def test_stats_without_store_is_a_message(tmp_path, capsys):
    assert main(["stats", "--store", str(tmp_path / "missing")]) == 2
    assert "run `ahf ingest` first" in capsys.readouterr().err
