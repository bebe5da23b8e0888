"""feedback.export on real labelled stores: the three formats, splits by post, duplicates, the
dataset card, --act, --force and atomic replacement, and TRL's RewardTrainer reading the pairs."""

from __future__ import annotations

import json
import shutil

import datasets
import pyarrow.parquet as pq
import pytest

from ahf.cli import main as ahf_main
from ahf.console import UserError
from feedback.export import MANIFEST, export_dataset, split_of
from feedback.labels import ExportConfig, LabelConfig, label_store
from mining.store import Store

FUNNY = "reddit-api/TestCommentForest.test_replace__all.json"
RC_2005 = "pushshift/RC_2005-12.zst"
# The 2005 dump has no posts: allow SHP without a post score, and between siblings at any depth
# (top-level replies to an unknown post have no context to export).
DUMP_CONFIG = LabelConfig.model_validate({"shp": {"unknown_post": "allow", "top_level_only": False}})


@pytest.fixture(scope="module")
def funny(labelled_real):
    return labelled_real("funny", FUNNY)[0]


@pytest.fixture(scope="module")
def dump(labelled_real):
    return labelled_real("dump", RC_2005, DUMP_CONFIG)[0]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_export_files_agree_and_follow_trl_columns(funny, tmp_path):
    out = tmp_path / "pairs"
    report = export_dataset(funny, "pairs", out)
    assert report.rows == {"train": 212, "validation": 0, "test": 0}  # one post: one split
    # one time-adjacent pair of siblings with the same text is dropped
    assert report.candidates == 213 and report.dropped == {"no_context": 0, "duplicate": 0, "same_text": 1}
    dd = datasets.load_from_disk(str(out / "dataset"))
    assert list(dd) == ["train", "validation", "test"]
    for split in dd:
        rows = _jsonl(out / f"{split}.jsonl")
        assert rows == pq.read_table(out / f"{split}.parquet").to_pylist() == dd[split].to_list()
    first = dd["train"][0]
    assert list(first)[:4] == ["prompt", "chosen", "rejected", "margin"]
    assert first["prompt"] == "Ba Dum Tsss\n\n"  # the post title, then the separator TRL appends to
    assert all(r["margin"] > 0 and r["chosen"] != r["rejected"] for r in dd["train"])
    card = (out / "README.md").read_text()
    assert "| train | 212 | 1 |" in card and "| train | 5 | 207 |" in card  # rows by rule: shp, time_adjacent
    assert (out / "plots" / "rule.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plots" / "margin.png").exists()
    assert '"min_ratio": 2.0' in card and '"comments": 541' in card  # config and provenance
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]  # nothing left beside --out


def test_pointwise_and_sft_exports(funny, tmp_path):
    report = export_dataset(funny, "pointwise", tmp_path / "pw")
    # 528 tiered turns; 6 repeat an earlier sibling's text under the same context
    assert report.candidates == 528 and report.dropped == {"no_context": 0, "duplicate": 6}
    rows = _jsonl(tmp_path / "pw" / "train.jsonl")
    assert list(rows[0])[:6] == ["prompt", "completion", "label", "tier", "reward", "adjusted"]
    assert {r["tier"] for r in rows} == {"good", "ok", "bad"}
    assert all(r["label"] == (r["tier"] == "good") for r in rows)
    assert len({(r["prompt"], r["completion"]) for r in rows}) == len(rows) == 522
    # deeper turns carry their ancestors: prompt = title, then each ancestor body
    with Store(funny, read_only=True) as s:
        cid, title, ancestors = s.con.execute(
            "SELECT comment_id, post_title, ancestor_ids FROM turns WHERE depth = 3 ORDER BY comment_id LIMIT 1"
        ).fetchone()
        bodies = [s.con.execute("SELECT body FROM comments WHERE id = ?", [a]).fetchone()[0] for a in ancestors]
    row = next(r for r in rows if r["comment_id"] == cid)
    assert row["prompt"] == "\n\n".join([title, *bodies]) + "\n\n"
    sft = export_dataset(funny, "sft", tmp_path / "sft")
    assert sum(sft.rows.values()) == 176  # the good tier
    assert list(_jsonl(tmp_path / "sft" / "train.jsonl")[0])[:2] == ["prompt", "completion"]


def test_splits_are_by_post_and_duplicates_are_removed(dump, tmp_path):
    splits = {"train": 0.6, "validation": 0.2, "test": 0.2}
    report = export_dataset(dump, "pointwise", tmp_path / "pw", config=ExportConfig(splits=splits))
    seen = {}
    for split in splits:
        for row in _jsonl(tmp_path / "pw" / f"{split}.jsonl"):
            assert seen.setdefault(row["post_id"], split) == split  # no post in two splits
            assert split_of(row["post_id"], splits, 0) == split
    assert len(seen) == sum(report.posts.values()) == 33
    assert min(report.posts.values()) > 0
    # another seed moves posts between splits but keeps every row
    other = export_dataset(dump, "pointwise", tmp_path / "seed1", config=ExportConfig(splits=splits, seed=1))
    assert sum(other.rows.values()) == sum(report.rows.values()) == 209 and other.rows != report.rows
    # pairs: the same pair made by both rules is kept once (the larger margin)
    pairs = export_dataset(dump, "pairs", tmp_path / "pairs")
    assert pairs.candidates == 106 and pairs.dropped == {"no_context": 90, "duplicate": 1, "same_text": 0}
    keys = [(r["prompt"], r["chosen"], r["rejected"]) for s in ("train", "validation", "test")
            for r in _jsonl(tmp_path / "pairs" / f"{s}.jsonl")]
    assert len(keys) == len(set(keys)) == sum(pairs.rows.values()) == 15


def test_force_replaces_atomically_and_never_deletes_foreign_dirs(funny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_dataset(funny, "sft", out)
    with pytest.raises(UserError, match="--force"):
        export_dataset(funny, "pairs", out)
    # a failure while writing leaves the earlier export whole, and no temp dir behind
    before = (out / "train.jsonl").read_bytes()

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("feedback.card.write_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_dataset(funny, "pairs", out, force=True)
    monkeypatch.undo()
    assert (out / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    report = export_dataset(funny, "pairs", out, force=True)
    assert json.loads((out / MANIFEST).read_text())["report"]["format"] == "pairs" == report.format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # not an export: refused even with --force; the store itself is refused as --out
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an ahf export"):
        export_dataset(funny, "pairs", foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="would contain the store"):
        export_dataset(funny, "pairs", funny.parent, force=True)


def test_act_filter(funny, tmp_path):
    with pytest.raises(UserError, match="has no `acts` table"):
        export_dataset(funny, "sft", tmp_path / "x", act="story")
    store = tmp_path / "store"
    shutil.copytree(funny, store)
    with Store(store) as s:  # an acts table as the index stage writes it
        s.replace_tables({"acts": """
            SELECT comment_id, CASE WHEN depth = 1 THEN 'story' ELSE 'chat' END AS act,
                   CASE WHEN sibling_rank % 2 = 0 THEN 0.9 ELSE 0.4 END AS confidence FROM turns"""})
        n_top_good = s.con.execute("SELECT count(*) FROM labels JOIN turns USING (comment_id) "
                                   "WHERE depth = 1 AND tier = 'good'").fetchone()[0]
        confident = s.con.execute("SELECT count(*) FROM labels JOIN turns USING (comment_id) "
                                  "WHERE depth = 1 AND tier = 'good' AND sibling_rank % 2 = 0").fetchone()[0]
    report = export_dataset(store, "sft", tmp_path / "stories", act="story")
    assert sum(report.rows.values()) + report.dropped["duplicate"] == n_top_good
    assert all(r["prompt"] == "Ba Dum Tsss\n\n" for r in _jsonl(tmp_path / "stories" / "train.jsonl"))
    strict = export_dataset(store, "sft", tmp_path / "strict", act="story",
                            config=ExportConfig(act_min_confidence=0.5))
    assert sum(strict.rows.values()) + strict.dropped["duplicate"] == confident < n_top_good
    with pytest.raises(UserError, match=r"\['chat', 'story'\]"):
        export_dataset(store, "sft", tmp_path / "y", act="poem")


def test_cli_export_json(funny, tmp_path, capsys):
    code = ahf_main(["export", "--store", str(funny), "--format", "pairs", "--out", str(tmp_path / "o"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"]["train"] == 212
    assert ahf_main(["export", "--store", str(funny), "--format", "pairs", "--out", str(tmp_path / "o")]) == 2
    code = ahf_main(["label", "--store", str(funny), "--json", "--set", "votes.min_replies=1000"])
    assert code == 0 and json.loads(capsys.readouterr().out)["labelled"] == 0
    label_store(funny)  # restore the module's labels


def test_reward_trainer_reads_the_pairs(funny, tmp_path, shared_data):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from training.models import load_tokenizer

    export_dataset(funny, "pairs", tmp_path / "pairs")
    train = datasets.load_from_disk(str(tmp_path / "pairs" / "dataset"))["train"]
    gpt2 = shared_data / "tokenizer" / "gpt2"
    tokenizer = load_tokenizer(str(gpt2))  # the real GPT-2 BPE (transformers 5 ignores `vocab_file=`)
    assert len(tokenizer) == 50257
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer), num_labels=1,
        pad_token_id=tokenizer.eos_token_id))
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=4, per_device_train_batch_size=8,
                        max_length=256, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                        dataset_num_proc=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(loss == loss and loss > 0 for loss in losses)


@pytest.mark.parametrize("manifest", ["", "not json", "[]", '{"report": {}}', '{"provenance": {}}'])
def test_force_needs_a_manifest_an_export_wrote(manifest, funny, tmp_path):
    """An empty, broken or foreign `.ahf-export.json` does not make a folder an export: --force refuses it."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / MANIFEST).write_text(manifest)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an ahf export manifest") as refused:
        export_dataset(funny, "pairs", folder, force=True)
    assert str(folder / MANIFEST) in str(refused.value)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, "notes.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_symlinked_out_is_refused_and_nothing_is_left_behind(funny, tmp_path, capsys):
    target = tmp_path / "exports-2024"
    export_dataset(funny, "sft", target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    link = tmp_path / "latest"
    link.symlink_to(target, target_is_directory=True)
    code = ahf_main(["export", "--store", str(funny), "--format", "pairs", "--out", str(link), "--force"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"--out {link} is a symbolic link" in err and str(target) in err
    assert link.is_symlink() and link.resolve() == target
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports-2024", "latest"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    with pytest.raises(UserError, match="is a symbolic link"):
        export_dataset(funny, "pairs", dangling)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "exports-2024", "latest"]
