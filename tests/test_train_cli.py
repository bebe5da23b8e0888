"""The training verbs share `eval` (and could share `train`/`merge`) with other packages in either order."""

from __future__ import annotations

import argparse

import pytest

from ahf.args import shared_verb
from training import cli


def _parser():
    parser = argparse.ArgumentParser(prog="ahf")
    return parser, parser.add_subparsers(dest="command", required=True)


def test_training_creates_eval_and_exposes_its_subparsers():
    parser, subparsers = _parser()
    cli.add_commands(subparsers)
    eval_parser = subparsers.choices["eval"]
    eval_parser._ahf_sub.add_parser("acts").set_defaults(handler="acts-handler")  # what index would do
    assert parser.parse_args(["eval", "acts"]).handler == "acts-handler"
    args = parser.parse_args(["eval", "rm", "--model", "M", "--pairs", "P", "--json"])
    assert args.handler.__name__ == "run_eval_rm" and args.model == "M" and args.json
    args = parser.parse_args(["merge", "rm", "A", "B", "--method", "ties", "--out", "O"])
    assert args.models == ["A", "B"] and args.method == "ties" and args.density == 0.2
    for verb in ("rm", "sft", "dpo", "rloo"):
        args = parser.parse_args(["train", verb, "D", "--out", "O"])
        assert args.handler.__name__ == "run_train" and args.train_command == verb
    assert parser.parse_args(["train", "rloo", "D", "--out", "O", "--reward-model", "R"]).reward_model == "R"
    with pytest.raises(SystemExit):  # one verb per algorithm: the old `train policy` is gone
        parser.parse_args(["train", "policy", "D", "--out", "O"])


def test_training_adds_rm_to_an_eval_verb_made_elsewhere():
    parser, subparsers = _parser()
    # another package registered first, with or without the `_ahf_sub` convention
    eval_parser = subparsers.add_parser("eval")
    eval_parser.add_subparsers(dest="eval_command", required=True).add_parser("acts").set_defaults(handler="acts")
    cli.add_commands(subparsers)
    assert parser.parse_args(["eval", "acts"]).handler == "acts"
    assert parser.parse_args(["eval", "rm", "--model", "M", "--pairs", "P"]).handler.__name__ == "run_eval_rm"
    assert eval_parser._ahf_sub is shared_verb(subparsers, "eval", "")
