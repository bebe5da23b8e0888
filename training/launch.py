"""Launch commands for training across nodes: `ahf train launch` (prints, writes, runs nothing).

From the nodes (a list, or an MPI-style hostfile of `HOST slots=GPUS` lines), the GPUs per node and the
arguments of one `ahf train VERB ...` run, `plan_launch` makes

- the DeepSpeed launcher command, run once on the first node: `deepspeed --hostfile H --num_nodes N
  --num_gpus G --master_addr A --master_port P --no_local_rank --module ahf.cli train ...` (the launcher
  reaches the other nodes over passwordless ssh with pdsh; `--no_local_rank` because its launch.py would
  otherwise put `--local_rank=R` before the `train` arguments, which `ahf` does not take: the rank comes
  from LOCAL_RANK in the environment);
- the torchrun command, the same on every node: `torchrun --nnodes N --nproc_per_node G --rdzv_backend
  c10d --rdzv_endpoint A:P --rdzv_id ID -m ahf.cli train ...` (c10d rendezvous: no ssh, no node ranks);
- the DeepSpeed config every rank will build, its "auto" fields filled for that world size
  (training.engine.load_deepspeed_config, for GPUs), with `train_batch_size` = micro batch x grad_accum x
  world size as DeepSpeed checks it; the schedule's step counts stay "auto" unless max_steps is set (each
  rank counts them from its data).

The hostfile rules are DeepSpeed's own (deepspeed/launcher/runner.py `_parse_hostfile`): `HOST slots=N`,
`#` comments and blank lines skipped, a host listed twice or a file with no hosts refused; here with a
`UserError` before anything starts. Paths in the train arguments are made absolute: every node must see
them at the same place (a shared filesystem).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shlex
from pathlib import Path
from typing import Sequence

from ahf.console import UserError

DEFAULT_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT (the launcher's --master_port default)
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # deepspeed/launcher/runner.py _parse_hostfile
# dests of `ahf train VERB` that plan_launch carries into the commands (a new option must be added here)
CARRIED = {"command", "train_command", "handler", "data", "task", "out", "config", "set", "json", "reward_model"}


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """{host: slots} in file order, by DeepSpeed's rules; a bad line, a host listed twice or no host at all
    is a UserError naming the line."""
    hosts: dict[str, int] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOST_LINE.search(line)
        if not match:
            raise UserError(f"{source} line {number}: {line!r} is not `HOST slots=GPUS`")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise UserError(f"{source}: node {host!r} is listed twice (lines {lines[host]} and {number}); "
                            "each node once, with all its GPUs as slots")
        hosts[host], lines[host] = slots, number
    if not hosts:
        raise UserError(f"{source} lists no nodes: write one `HOST slots=GPUS` line per node")
    return hosts


def hostfile_text(nodes: Sequence[str], gpus_per_node: int) -> str:
    return "".join(f"{node} slots={gpus_per_node}\n" for node in nodes)


def resolve_nodes(nodes: Sequence[str] | None, hostfile: str | Path | None,
                  gpus_per_node: int | None) -> tuple[list[str], int, str | None]:
    """(nodes, GPUs per node, the given hostfile's absolute path or None) from exactly one of the two."""
    if (nodes is None) == (hostfile is None):
        raise UserError("give the nodes either as a list (--nodes a,b) or as a hostfile (--hostfile FILE), "
                        "not " + ("both" if nodes is not None else "neither"))
    if gpus_per_node is not None and gpus_per_node < 1:
        raise UserError(f"GPUs per node must be at least 1, not {gpus_per_node}: one rank runs per GPU")
    if hostfile is not None:
        path = Path(hostfile)
        if not path.is_file():
            raise UserError(f"hostfile not found: {path}")
        slots = parse_hostfile(path.read_text(), str(path))
        empty = [host for host, n in slots.items() if n < 1]
        if empty:
            raise UserError(f"{path}: {empty[0]} has slots=0: a node needs at least 1 GPU")
        if gpus_per_node is None:
            if len(set(slots.values())) > 1:
                raise UserError(f"{path}: the nodes have different slots ({', '.join(f'{h}={n}' for h, n in slots.items())}): "
                                "set --gpus-per-node (every node runs as many ranks)")
            gpus_per_node = next(iter(slots.values()))
        short = [host for host, n in slots.items() if n < gpus_per_node]
        if short:
            raise UserError(f"{path}: {short[0]} has {slots[short[0]]} slots, fewer than {gpus_per_node} GPUs per node")
        return list(slots), gpus_per_node, os.path.abspath(path)
    nodes = [str(n).strip() for n in nodes]
    if not nodes or not all(nodes):
        raise UserError("the node list is empty" if not nodes else f"the node list has an empty name: {nodes}")
    bad = [n for n in nodes if re.search(r"\s", n) or n.startswith("#")]
    if bad:
        raise UserError(f"not a node name: {bad[0]!r}")
    twice = next((n for i, n in enumerate(nodes) if n in nodes[:i]), None)
    if twice is not None:
        raise UserError(f"node {twice!r} is listed twice: each node once (it runs one rank per GPU)")
    if gpus_per_node is None:
        raise UserError("with a node list, give the GPUs per node (--gpus-per-node)")
    return nodes, gpus_per_node, None


def parse_train_args(train_args: Sequence[str]) -> argparse.Namespace:
    """`VERB DATA --out DIR ...` as `ahf train` parses it; argparse's complaint becomes a UserError."""
    from training.cli import TRAIN_VERBS, _rm_data, add_commands

    args = list(train_args)
    if args[:1] == ["--"]:
        args = args[1:]
    if args[:1] == ["train"]:
        args = args[1:]
    if not args or args[0] not in TRAIN_VERBS:
        raise UserError(f"the run to launch is `ahf train {'|'.join(TRAIN_VERBS)} ...`, not "
                        f"{shlex.join(args) or 'nothing'}")
    parser = argparse.ArgumentParser(prog="ahf")
    add_commands(parser.add_subparsers(dest="command", required=True))
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            namespace = parser.parse_args(["train", *args])
    except SystemExit as exc:
        error = message.getvalue().strip().splitlines()  # usage lines, then "PROG: error: WHAT"
        what = re.sub(r"^.*?error: ", "", error[-1]) if error else "invalid arguments"
        raise UserError(f"ahf train {shlex.join(args)}: {what}") from exc
    used = {k for k, v in vars(namespace).items() if v not in (None, False, [])}
    if used - CARRIED:
        raise UserError(f"training.launch does not yet carry {sorted(used - CARRIED)} into the launch command")
    if namespace.train_command == "rm":
        _rm_data(namespace)  # one DATA or --task NAME=DATA ..., as `ahf train rm` checks
    return namespace


def canonical_train_args(ns: argparse.Namespace, extra_sets: Sequence[str] = ()) -> list[str]:
    """`train VERB ...` for every rank: paths absolute, `--set` overrides in order, then `extra_sets`."""
    args = ["train", ns.train_command]
    if ns.data is not None:
        args.append(os.path.abspath(ns.data))
    for spec in getattr(ns, "task", None) or []:
        name, _, path = spec.partition("=")
        args += ["--task", f"{name}={os.path.abspath(path)}"]
    args += ["--out", os.path.abspath(ns.out)]
    if ns.config:
        args += ["--config", os.path.abspath(ns.config)]
    if getattr(ns, "reward_model", None):
        args += ["--reward-model", os.path.abspath(ns.reward_model)]
    for override in [*(ns.set or []), *extra_sets]:
        args += ["--set", override]
    if ns.json:
        args.append("--json")
    return args


def plan_launch(train_args: Sequence[str], *, nodes: Sequence[str] | None = None,
                hostfile: str | Path | None = None, gpus_per_node: int | None = None,
                deepspeed: str | None = None, master_addr: str | None = None, master_port: int = DEFAULT_PORT,
                rdzv_id: str | None = None, write_to: str | Path | None = None) -> dict:
    """The launch of one `ahf train VERB ...` run over several nodes: the `deepspeed` and `torchrun`
    commands, the hostfile, the filled DeepSpeed config and the global batch; writes `hostfile` (for a
    node list), `deepspeed.json` and `launch.json` to `write_to` (default: OUT.launch beside --out).

    `train_args`: what follows `ahf train` (`rm DATA --out DIR [--config F] [--set k=v ...]`);
    `deepspeed`: a configs/deepspeed name or JSON path (default: the training config's `deepspeed`),
    passed to every rank as `--set deepspeed=...`. Runs nothing."""
    from ahf.config import load_config
    from training.cli import TRAIN_VERBS
    from training.engine import load_deepspeed_config

    nodes, gpus, given_hostfile = resolve_nodes(nodes, hostfile, gpus_per_node)
    if not 0 < master_port < 65536:
        raise UserError(f"master port {master_port} is not a TCP port (1-65535)")
    ns = parse_train_args(train_args)
    verb = ns.train_command
    extra = []
    if deepspeed is not None:
        extra.append(f"deepspeed={os.path.abspath(deepspeed) if Path(deepspeed).suffix else deepspeed}")
    module_name, config_class, _ = TRAIN_VERBS[verb]
    config = load_config(getattr(importlib.import_module(module_name), config_class), f"train/{verb}",
                         ns.config, [*(ns.set or []), *extra])
    train = canonical_train_args(ns, extra)
    world = len(nodes) * gpus
    master = master_addr or nodes[0]
    out_dir = Path(train[train.index("--out") + 1])
    plan_dir = Path(os.path.abspath(write_to)) if write_to else out_dir.with_name(out_dir.name + ".launch")
    host_path = given_hostfile or str(plan_dir / "hostfile")
    rdzv = rdzv_id or f"ahf-{verb}-" + hashlib.sha256(shlex.join(train).encode()).hexdigest()[:8]

    steps = config.max_steps
    ds_config = load_deepspeed_config(
        config.deepspeed, micro_batch_size=config.micro_batch_size, grad_accum=config.grad_accum, lr=config.lr,
        weight_decay=config.weight_decay, warmup_steps=int(config.warmup_ratio * steps) if steps else 0,
        total_steps=steps, bf16=config.bf16, on_gpu=True)
    global_rows = config.micro_batch_size * config.grad_accum * world
    ds_config = {"train_batch_size": global_rows, **ds_config}  # DeepSpeed asserts = micro x accum x world

    deepspeed_cmd = ["deepspeed", "--hostfile", host_path, "--num_nodes", str(len(nodes)), "--num_gpus", str(gpus),
                     "--master_addr", master, "--master_port", str(master_port), "--no_local_rank",
                     "--module", "ahf.cli", *train]
    torchrun_cmd = ["torchrun", "--nnodes", str(len(nodes)), "--nproc_per_node", str(gpus),
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:{master_port}", "--rdzv_id", rdzv,
                    "-m", "ahf.cli", *train]
    batch = {"micro_batch_size": config.micro_batch_size, "grad_accum": config.grad_accum, "world_size": world,
             "rows": global_rows}
    packing = getattr(config, "packing", "none")
    if packing != "none":
        batch["packing"] = packing
        batch["note"] = (f"packing={packing}: a packed micro-step is one row of at most pack_tokens="
                         f"{config.pack_tokens} tokens (auto packs on CUDA for a causal backbone), so a step holds "
                         f"{config.grad_accum * world} packed rows, at most {config.grad_accum * world * config.pack_tokens:,} tokens")
    plan = {
        "verb": verb, "nodes": nodes, "gpus_per_node": gpus, "world_size": world,
        "master_addr": master, "master_port": master_port, "rdzv_id": rdzv,
        "hostfile": host_path, "hostfile_text": hostfile_text(nodes, gpus),
        "train_args": train, "out_dir": str(out_dir),
        "deepspeed_command": deepspeed_cmd,
        "torchrun_commands": [{"node": node, "command": torchrun_cmd} for node in nodes],
        "deepspeed_config_name": config.deepspeed, "zero_stage": ds_config.get("zero_optimization", {}).get("stage"),
        "global_batch": batch, "steps": steps,
        "deepspeed_config": ds_config, "deepspeed_config_path": str(plan_dir / "deepspeed.json"),
        "plan_dir": str(plan_dir),
    }
    plan_dir.mkdir(parents=True, exist_ok=True)
    if given_hostfile is None:
        Path(host_path).write_text(plan["hostfile_text"])
    (plan_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    (plan_dir / "launch.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan
