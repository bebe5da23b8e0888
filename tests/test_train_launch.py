"""Training across nodes (training.launch, `ahf train launch`): the deepspeed and torchrun commands, the
hostfile and the filled DeepSpeed config of a 2-node x 8-GPU layout, read back by DeepSpeed's and torch's
own parsers; the refusals; the loop's data sharding; and a real 2-rank run on the CPU under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ahf.cli import main as ahf_main
from ahf.console import UserError
from training.launch import plan_launch

RUN = ["rm", "/shared/data/pairs.jsonl", "--out", "/shared/runs/rm", "--set", "micro_batch_size=4",
       "--set", "grad_accum=2"]
TRAIN = ["train", "rm", "/shared/data/pairs.jsonl", "--out", "/shared/runs/rm", "--set", "micro_batch_size=4",
         "--set", "grad_accum=2", "--set", "deepspeed=zero3"]
ZERO3 = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json"


def _two_by_eight(tmp_path, **kwargs):
    return plan_launch(RUN, nodes=["node1", "node2"], gpus_per_node=8, deepspeed="zero3", rdzv_id="ahf-rm-2x8",
                       write_to=tmp_path / "plan", **kwargs)


def test_two_nodes_of_eight_gpus(tmp_path):
    plan = _two_by_eight(tmp_path)
    hostfile = str(tmp_path / "plan" / "hostfile")
    assert plan["deepspeed_command"] == [
        "deepspeed", "--hostfile", hostfile, "--num_nodes", "2", "--num_gpus", "8", "--master_addr", "node1",
        "--master_port", "29500", "--no_local_rank", "--module", "ahf.cli", *TRAIN]
    torchrun = ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", "node1:29500", "--rdzv_id", "ahf-rm-2x8", "-m", "ahf.cli", *TRAIN]
    assert plan["torchrun_commands"] == [{"node": "node1", "command": torchrun}, {"node": "node2", "command": torchrun}]
    assert (plan["world_size"], plan["nodes"], plan["gpus_per_node"]) == (16, ["node1", "node2"], 8)
    assert plan["hostfile_text"] == "node1 slots=8\nnode2 slots=8\n" == Path(hostfile).read_text()

    ds = plan["deepspeed_config"]
    assert plan["global_batch"] | {"note": None} == {"micro_batch_size": 4, "grad_accum": 2, "world_size": 16,
                                                     "rows": 128, "packing": "auto", "note": None}
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (128, 4, 2)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 16
    assert ds["zero_optimization"] == json.loads(ZERO3.read_text())["zero_optimization"]  # stage 3, as shipped
    assert plan["zero_stage"] == 3 and ds["bf16"] == {"enabled": True}  # planned for GPUs (auto: on)
    assert ds["optimizer"]["params"]["lr"] == 1e-5 == ds["scheduler"]["params"]["warmup_max_lr"]
    # no max_steps: the schedule's step counts are each rank's to fill from its data
    assert ds["scheduler"]["params"]["total_num_steps"] == "auto" == ds["scheduler"]["params"]["warmup_num_steps"]
    assert "auto" not in json.dumps({k: v for k, v in ds.items() if k != "scheduler"})
    assert json.loads((tmp_path / "plan" / "deepspeed.json").read_text()) == ds
    assert json.loads((tmp_path / "plan" / "launch.json").read_text()) == plan


def test_max_steps_fills_the_schedule_and_default_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_launch(["rm", "pairs.jsonl", "--out", "runs/rm", "--set", "max_steps=200"], nodes=["a", "b"],
                       gpus_per_node=4, master_port=6000)
    assert plan["train_args"] == ["train", "rm", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "runs/rm"),
                                  "--set", "max_steps=200"]  # absolute: every node resolves them alike
    assert plan["plan_dir"] == str(tmp_path / "runs" / "rm.launch") and not (tmp_path / "runs" / "rm").exists()
    params = plan["deepspeed_config"]["scheduler"]["params"]
    assert (params["warmup_num_steps"], params["total_num_steps"]) == (6, 200)  # 3 % warm-up, as start_engine
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 2 and plan["world_size"] == 8
    assert plan["torchrun_commands"][0]["command"][8] == "a:6000"
    again = plan_launch(["rm", "pairs.jsonl", "--out", "runs/rm", "--set", "max_steps=200"], nodes=["a", "b"],
                        gpus_per_node=4, master_port=6000)
    assert again["rdzv_id"] == plan["rdzv_id"] and plan["rdzv_id"].startswith("ahf-rm-")  # same on every node


def test_commands_read_back_by_deepspeed_and_torchrun(tmp_path, monkeypatch):
    """DeepSpeed's runner and torchrun parse the commands into 2 x 8 ranks running `python -m ahf.cli train
    ...`; DeepSpeed's config class accepts the filled config at world size 16 (it asserts the batch sizes)."""
    from deepspeed.launcher import runner
    from deepspeed.runtime import config as ds_config
    from torch.distributed import run as torchrun

    plan = _two_by_eight(tmp_path)
    args = runner.parse_args(plan["deepspeed_command"][1:])
    assert (args.module, args.no_local_rank, args.user_script, args.user_args) == (True, True, "ahf.cli", TRAIN)
    resources = runner.parse_inclusion_exclusion(runner.fetch_hostfile(args.hostfile), args.include, args.exclude)
    resources = runner.apply_num_nodes_and_gpus(resources, args.num_nodes, args.num_gpus)
    assert dict(resources) == {"node1": list(range(8)), "node2": list(range(8))}
    assert (args.master_addr, args.master_port) == ("node1", 29500)

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # torchrun sets it
    parsed = torchrun.get_args_parser().parse_args(plan["torchrun_commands"][1]["command"][1:])
    config, command, command_args = torchrun.config_from_args(parsed)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "node1:29500", "ahf-rm-2x8")
    assert command_args == ["-u", "-m", "ahf.cli", *TRAIN]  # no --local-rank: torchrun passes LOCAL_RANK

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 16)
    checked = ds_config.DeepSpeedConfig(plan["deepspeed_config"])
    assert (checked.world_size, checked.train_batch_size, checked.zero_optimization_stage) == (16, 128, 3)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):  # the check is real
        ds_config.DeepSpeedConfig(plan["deepspeed_config"] | {"train_batch_size": 64})

    from ahf.cli import build_parser  # every rank parses the same run
    ns = build_parser().parse_args(TRAIN)
    assert (ns.train_command, ns.data, ns.out, ns.set) == ("rm", "/shared/data/pairs.jsonl", "/shared/runs/rm",
                                                           ["micro_batch_size=4", "grad_accum=2", "deepspeed=zero3"])


def test_a_hostfile_is_used_as_written(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two DGX nodes\n\nnode1 slots=8\n  node2 slots=8  # spare\n")
    plan = plan_launch(RUN, hostfile=hostfile, deepspeed="zero3", rdzv_id="ahf-rm-2x8", write_to=tmp_path / "plan")
    assert not (tmp_path / "plan" / "hostfile").exists()  # the given one is used, not rewritten
    listed = _two_by_eight(tmp_path)
    assert plan["deepspeed_command"] == ["deepspeed", "--hostfile", str(hostfile), *listed["deepspeed_command"][3:]]
    assert plan == listed | {"hostfile": str(hostfile), "deepspeed_command": plan["deepspeed_command"]}
    assert plan_launch(RUN, hostfile=hostfile, gpus_per_node=4, write_to=tmp_path / "p4")["world_size"] == 8


@pytest.mark.parametrize("hosts, gpus, message", [
    (["node1", "node2"], 0, "GPUs per node must be at least 1, not 0"),
    ("", 8, "lists no nodes"),
    ("# nothing here\n\n", None, "lists no nodes"),
    ("node1 slots=8\nnode2 slots=8\nnode1 slots=8\n", None, r"node 'node1' is listed twice \(lines 1 and 3\)"),
    (["node1", "node2", "node1"], 8, "node 'node1' is listed twice"),
    ("node1 slots=8\nnode2 8\n", None, r"line 2: 'node2 8' is not `HOST slots=GPUS`"),
    ("node1 slots=8\nnode2 slots=4\n", None, "different slots"),
    ("node1 slots=8\nnode2 slots=4\n", 8, "node2 has 4 slots, fewer than 8"),
    ("node1 slots=0\n", None, "slots=0"),
    (["node1"], None, "give the GPUs per node"),
    ([], 8, "the node list is empty"),
])
def test_refusals(tmp_path, hosts, gpus, message):
    if isinstance(hosts, str):
        path = tmp_path / "hostfile"
        path.write_text(hosts)
        where = {"hostfile": path}
    else:
        where = {"nodes": hosts}
    with pytest.raises(UserError, match=message):
        plan_launch(RUN, gpus_per_node=gpus, write_to=tmp_path / "plan", **where)
    assert not (tmp_path / "plan").exists()  # refused before writing anything


def test_deepspeed_refuses_the_same_hostfiles():
    """The hostfile rules are DeepSpeed's (deepspeed/launcher/runner.py `_parse_hostfile`)."""
    from deepspeed.launcher.runner import _parse_hostfile

    for text, problem in (["node1 slots=8", "node1 slots=8"], "multiple entries"), (["# none"], "empty"):
        with pytest.raises(ValueError, match=problem):
            _parse_hostfile(text)
    assert _parse_hostfile(["# c", "", "node1 slots=8", "node2 slots=8 # x"]) == {"node1": 8, "node2": 8}


@pytest.mark.parametrize("run, message", [
    (["merge", "rm", "a", "b", "--out", "o"], "the run to launch is `ahf train rm|sft|dpo|rloo ...`"),
    ([], "not nothing"),
    (["rm", "pairs.jsonl"], "the following arguments are required: --out"),
    (["rm", "--out", "o"], "either one PAIRS file or --task NAME=PAIRS"),
    (["rm", "pairs.jsonl", "--out", "o", "--set", "nonsense=1"], "nonsense"),
    (["rm", "pairs.jsonl", "--out", "o", "--set", "deepspeed=zero9"], "DeepSpeed config not found: zero9"),
])
def test_refused_runs(tmp_path, run, message):
    with pytest.raises(UserError, match=message):
        plan_launch(run, nodes=["node1", "node2"], gpus_per_node=8, write_to=tmp_path / "plan")


def test_cli_prints_the_plan(tmp_path, capsys):
    write = str(tmp_path / "plan")
    code = ahf_main(["train", "launch", "--nodes", "node1,node2", "--gpus-per-node", "8", "--deepspeed", "zero3",
                     "--rdzv-id", "ahf-rm-2x8", "--write-to", write, "--json", *RUN])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "plan" / "launch.json").read_text()) == _two_by_eight(tmp_path)
    code = ahf_main(["train", "launch", "--nodes", "node1,node2", "--gpus-per-node", "8", "--write-to", write, *RUN])
    human = capsys.readouterr().out
    assert code == 0 and "world size 16" in human and "4 x 2 x 16 = 128 rows" in human
    assert "deepspeed --hostfile " + write + "/hostfile --num_nodes 2 --num_gpus 8" in human
    assert ahf_main(["train", "launch", "--nodes", "node1,node1", "--gpus-per-node", "8", *RUN]) == 2
    assert "listed twice" in capsys.readouterr().err


def test_each_rank_gets_its_share_of_an_epoch(tmp_path):
    from training.loop import Trainer

    trainer = Trainer(None, tmp_path)
    assert (trainer.rank, trainer.world) == (0, 1) and trainer.shard([1, 2, 3]) == [1, 2, 3]
    trainer.world = 3
    shares = []
    for trainer.rank in range(3):
        shares.append(trainer.shard(list("abcdefg")))
    assert shares == [list("adg"), list("bea"), list("cfb")]  # padded with the first batches, as DistributedSampler
    trainer.world, trainer.rank = 4, 3
    assert trainer.shard(["x"]) == ["x"]  # fewer batches than ranks: every rank repeats them


def test_two_ranks_on_the_cpu_under_torchrun(tmp_path, shared_data):
    """The generated torchrun command, for one node of 2 CPU ranks (gloo), trains a tiny reward model under
    ZeRO-3: both ranks finish, each on its own half of the batches, and rank 0 alone writes metrics.jsonl,
    the model and its card."""
    from training.engine import free_port
    from training.tiny import TINY_GPT2

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl").read_text()
                             .splitlines(keepends=True)[:48]))
    sets = [f"tokenizer={shared_data / 'tokenizer' / 'gpt2'}", "model=tiny", "random_init=" + json.dumps(TINY_GPT2),
            "detokenize=true", "max_length=64", "max_prompt_length=24", "max_steps=4", "micro_batch_size=4",
            "lr=1e-3", "log_every=2", "packing=none"]
    out = tmp_path / "rm"
    plan = plan_launch(["rm", str(pairs), "--out", str(out), "--json", *sum([["--set", s] for s in sets], [])],
                       nodes=["127.0.0.1"], gpus_per_node=2, deepspeed="zero3", master_port=free_port())
    command = [str(Path(sys.executable).with_name("torchrun")), *plan["torchrun_commands"][0]["command"][1:]]
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT"}}
    done = subprocess.run(command, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 and all(r["deepspeed"] == {"config": "zero3", "zero_stage": 3, "bf16": False,
                                                        "world_size": 2} for r in results)
    assert all(r["steps"] == 4 and r["eval"] == results[0]["eval"] for r in results)  # the one saved model
    assert results[0]["history"][0]["loss"] != results[1]["history"][0]["loss"]  # different batches
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in results if r["history"] == metrics[:2])  # rank 0's, written once
    assert len(metrics) == 3 and metrics[2] == {"eval": {"eval": first["eval"]}}
    card = json.loads((out / "ahf_model.json").read_text())
    assert card["train_result"] == {k: v for k, v in first.items() if k not in {"history", "out_dir"}}
    assert sorted(p.name for p in out.iterdir()) == ["ahf_model.json", "metrics.jsonl", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert plan["plan_dir"] == str(tmp_path / "rm.launch")
