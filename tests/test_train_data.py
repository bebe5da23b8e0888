"""training.data and training.tokens on the real shared files: exact counts, splits, errors, packing masks."""

from __future__ import annotations

import json

import pytest
import torch

from ahf.console import UserError
from training import data as D
from training.tokens import LengthPolicy, block_mask, encode_prompt, encode_reply, first_fit


def test_pairs_file_exact_counts_and_split_by_prompt(shared_data):
    pairs = D.load_pairs(shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl")
    assert len(pairs) == 374
    assert len({p.prompt for p in pairs}) == 52
    train, held = D.split_by_prompt(pairs, 0.2, seed=0)
    assert len(train) + len(held) == 374
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert len({p.prompt for p in held}) == 10  # round(52 * 0.2)
    again = D.split_by_prompt(pairs, 0.2, seed=0)
    assert [p.chosen for p in again[1]] == [p.chosen for p in held]
    assert [p.chosen for p in D.split_by_prompt(pairs, 0.2, seed=1)[1]] != [p.chosen for p in held]


def test_detokenize_writingprompts_text(shared_data):
    pairs = D.load_pairs(shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)
    assert not any("<\\newline>" in p.chosen or "<newline>" in p.rejected for p in pairs)
    assert sum("\n" in p.chosen for p in pairs) > 300
    assert D.detokenize("[ WP ] `` Life.EXE has stopped working . ''") == '[WP] "Life.EXE has stopped working."'
    assert D.detokenize("I do n't know , he said . <newline> <newline> Next") == "I don't know, he said.\n\nNext"


def test_sft_csv_uses_story_column(shared_data):
    rows = D.load_sft(shared_data / "writingprompts" / "fan2018_500.csv", detok=True)
    assert len(rows) == 501
    assert rows[1].prompt.startswith('[WP] "Life.EXE')
    assert rows[1].completion.startswith('"This is Steve, how can I help?"')


def test_explanation_task_pairs_split_by_question(shared_data, tmp_path):
    path = shared_data / "explanations" / "validity_annotation.jsonl"
    train, held, counts = D.explanation_task(path, eval_fraction=0.2, seed=0, per_invalid=2)
    assert counts["answers"] == 781 and counts["questions"] == 650 and counts["eval_questions"] == 130
    assert counts["train_pairs"] == len(train) and counts["eval_pairs"] == len(held)
    assert counts["same_question"] + counts["cross_question"] == len(train) + len(held)
    # 169 invalid answers, each with 2 valid partners from other questions of its source, + 58 same-question pairs
    assert counts["same_question"] == 58 and counts["cross_question"] == 2 * 169
    train_q = {p.prompt for p in train} | {p.rejected_prompt for p in train if p.rejected_prompt}
    held_q = {p.prompt for p in held} | {p.rejected_prompt for p in held if p.rejected_prompt}
    assert train_q.isdisjoint(held_q)
    again = D.load_pairs(D.write_pairs(held, tmp_path / "held.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected, p.rejected_prompt) for p in again] == \
        [(p.prompt, p.chosen, p.rejected, p.rejected_prompt) for p in held]


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:2: missing field 'rejected'"):
        D.load_pairs(path)
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "lots"}) + "\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:1: field 'margin' must be a number"):
        D.load_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:1: not valid JSON"):
        D.load_pairs(path)
    points = tmp_path / "points.jsonl"
    points.write_text(json.dumps({"prompt": "p", "completion": "c", "tier": "great"}) + "\n")
    with pytest.raises(UserError, match=r"points.jsonl:1: field 'tier' must be one of"):
        D.load_pointwise(points)


def test_parquet_and_datasets_dir_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"prompt": f"q{i}", "chosen": "long answer here", "rejected": "short", "margin": float(i)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source in (tmp_path / "pairs.parquet", tmp_path / "ds"):
        pairs = D.load_pairs(source)
        assert [p.margin for p in pairs] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_real_gpt2_tokenizer_and_length_policy_counts(shared_data, tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [15496, 995]
    pairs = D.load_pairs(shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)
    encoded = [(encode_prompt(tokenizer, p.prompt), [encode_reply(tokenizer, p.chosen), encode_reply(tokenizer, p.rejected)])
               for p in pairs]
    longest = [len(pr) + max(len(r) for r in rs) for pr, rs in encoded]
    over = sum(n > 512 for n in longest)
    report = D.FilterReport()
    kept = [LengthPolicy(512, 128, "drop").fit(pr, rs, report) for pr, rs in encoded]
    assert report.kept == 374 - over and report.dropped == {"over_max_length_512": over}
    assert sum(k is not None for k in kept) == 374 - over
    report = D.FilterReport()
    fitted = [LengthPolicy(512, 128, "truncate").fit(pr, rs, report) for pr, rs in encoded]
    assert report.kept == 374 and sum(report.truncated.values()) >= over
    assert all(len(p) + len(r) <= 512 for p, rs in fitted for r in rs)
    assert all(rs[0][-1] == tokenizer.eos_token_id for _, rs in fitted)  # the end token survives truncation


def test_shared_prompt_mask_structure():
    # one pair: prompt (2 tokens, segment 0), chosen (2, segment 1), rejected (1, segment 2)
    mask = block_mask(torch.tensor([0, 0, 1, 1, 2]), causal=True,
                      shared=torch.tensor([True, True, False, False, False]))[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, False, False, True],  # rejected sees the prompt, never the chosen reply
    ]
    assert first_fit([5, 4, 3, 2], 7) == [[0, 3], [1, 2]]
