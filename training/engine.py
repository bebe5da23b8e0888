"""DeepSpeed as the training engine, on a GPU or on the CPU in one process.

`configs/deepspeed/<name>.json` (zero0 ... zero3, zero3_offload) hold the ZeRO settings; fields set to
"auto" are filled from the training config (batch size, learning rate, schedule, bf16). On a machine
without a launcher (`deepspeed` / `torchrun`) we set the single-process rendezvous variables ourselves
and use gloo on the CPU, so the same code runs in tests and on one GPU. Under a launcher its variables are
left alone (`rank()` / `world_size()` read them; training.launch writes the launch commands).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ahf.config import find_config, shipped
from ahf.console import UserError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_single_process_env() -> None:
    """Rendezvous variables for one process unless a launcher already set them (else DeepSpeed wants MPI)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the job, over every node (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def import_deepspeed():
    """DeepSpeed's logger writes to the stdout it saw at import; `--json` keeps stdout for the result
    (and pytest closes its capture streams), so point it at the process's real stderr."""
    import deepspeed

    for handler in logging.getLogger("DeepSpeed").handlers:
        # exactly DeepSpeed's own StreamHandler (not pytest's or a user's capture subclasses)
        if type(handler) is logging.StreamHandler and handler.stream is not sys.__stderr__:
            handler.setStream(sys.__stderr__)
    return deepspeed


def _skip_shm_build_on_cpu() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (1-3 min, a C++ compiler) on first
    use. One process has nothing to share, and the CPU runs several only as a small check of the multi-rank
    path (tests, `torchrun --nproc_per_node 2`), so mark the op unavailable and let gloo do the all-reduce."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_deepspeed_config(name_or_path: str, *, micro_batch_size: int, grad_accum: int, lr: float,
                          weight_decay: float = 0.0, warmup_steps: int = 0, total_steps: int | None = 1,
                          bf16: bool | str = "auto", on_gpu: bool | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON (a name in configs/deepspeed/, or a path) and fill its "auto" fields.

    `on_gpu`: the device the config is for (None: this machine's; training.launch plans for GPU nodes from
    any machine, where bf16 "auto" then means on). `total_steps=None` leaves the schedule's step counts
    "auto" (a launch plan does not know them: each rank fills them from its data)."""
    path = Path(name_or_path) if Path(name_or_path).suffix else find_config(f"deepspeed/{name_or_path}.json")
    if path is None or not path.is_file():
        known = sorted(p.name.removesuffix(".json") for p in shipped("deepspeed").iterdir() if p.name.endswith(".json"))
        raise UserError(f"DeepSpeed config not found: {name_or_path} (known: {', '.join(known)})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from exc
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
        use_bf16 = bf16_available() if bf16 == "auto" else bool(bf16)
    else:
        use_bf16 = on_gpu if bf16 == "auto" else bool(bf16)
    steps = {"warmup_num_steps": "auto", "total_num_steps": "auto"} if total_steps is None else {
        "warmup_num_steps": max(1, warmup_steps), "total_num_steps": max(2, total_steps, warmup_steps + 1)}
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "lr": lr, "warmup_max_lr": lr, "weight_decay": weight_decay,
        **steps,
        "enabled": use_bf16,
        # torch's AdamW (fused on GPU) needs no op build; DeepSpeed's FusedAdam would JIT-compile.
        "torch_adam": True,
    }
    config = _fill_auto(copy.deepcopy(config), fill)
    config.pop("train_batch_size", None)  # derived from micro batch x accumulation x world size
    if _offloads_optimizer(config) and config.get("optimizer", {}).get("params", {}).get("torch_adam"):
        # DeepSpeedCPUAdam would need a C++ build (none on the CPU box, none in the py3-none-any wheel on
        # the GPU box); torch's AdamW steps the offloaded fp32 states instead, slower but equivalent
        config["zero_force_ds_cpu_optimizer"] = False
    if not on_gpu:
        config.get("bf16", {}).update(enabled=False)
        config.get("fp16", {}).update(enabled=False)
        zero = config.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(key), dict):
                zero[key]["pin_memory"] = False
    elif "params" in config.get("optimizer", {}) and "fused" not in config["optimizer"]["params"] \
            and not _offloads_optimizer(config):
        config["optimizer"]["params"]["fused"] = True
    return config


def _offloads_optimizer(config: dict) -> bool:
    return bool(config.get("zero_optimization", {}).get("offload_optimizer"))


def _fill_auto(node: Any, fill: dict) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if value == "auto":
                if key not in fill:
                    raise UserError(f"DeepSpeed config: no value for 'auto' field {key!r}")
                out[key] = fill[key]
            else:
                out[key] = _fill_auto(value, fill)
        return out
    if isinstance(node, list):
        return [_fill_auto(v, fill) for v in node]
    return node


def initialize(model: torch.nn.Module, ds_config: dict):
    """`deepspeed.initialize` on whatever device exists. Returns (engine, optimizer, scheduler)."""
    ensure_single_process_env()
    deepspeed = import_deepspeed()
    _skip_shm_build_on_cpu()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine, optimizer, scheduler


def start_engine(model: torch.nn.Module, config: Any, batches_per_epoch: int) -> tuple[Any, dict, int, int]:
    """The schedule and DeepSpeed engine every trainer shares: (engine, ds_config, total_micro, total_steps).

    `config` has the common training fields: max_steps, epochs, grad_accum, micro_batch_size, lr,
    weight_decay, warmup_ratio, deepspeed, bf16.
    """
    if config.max_steps:
        total_steps = config.max_steps
    else:
        total_steps = max(1, math.ceil(batches_per_epoch * config.epochs) // config.grad_accum)
    total_micro = total_steps * config.grad_accum  # every micro-step ends in an optimizer step
    ds_config = load_deepspeed_config(config.deepspeed, micro_batch_size=config.micro_batch_size,
                                      grad_accum=config.grad_accum, lr=config.lr, weight_decay=config.weight_decay,
                                      warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps,
                                      bf16=config.bf16)
    engine, _, _ = initialize(model, ds_config)
    return engine, ds_config, total_micro, total_steps


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


@contextmanager
def gathered(module: torch.nn.Module, engine=None):
    """Full parameters inside the block, also under ZeRO-3 (where each rank holds a shard)."""
    if engine is not None and zero_stage(engine) == 3:
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


def full_state_dict(module: torch.nn.Module, engine=None) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of every parameter and buffer, gathered from ZeRO-3 shards when needed."""
    with gathered(module, engine):
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                for k, v in module.state_dict().items()}
