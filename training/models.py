"""Backbones, tokenizers and the reward model, saved and loaded as safetensors (never pickles).

A reward model is any Hugging Face backbone (`AutoModel`: a causal LM's trunk such as gpt2-xl, or an
encoder such as all-MiniLM-L6-v2) plus a linear head. Causal backbones read the score at the last
real token; encoders mean-pool. The tier-conditioned form uses a 3-way head (bad/ok/good) and scores
with the expected tier. A joint multi-task model (training.multitask) records its `tasks` and how it is
conditioned: `task_token` (a marker in the prompt, one scalar head) or `task_head` (one head output per
task; `forward(task_ids=...)` reads each row's own column).

On disk (`DIR/`): `model.safetensors` (backbone + head), `ahf_model.json` (`MODEL_CARD`: backbone config,
head, pooling, the training config, the data it was trained on, the training result), and the tokenizer
files. Causal LMs (sft, dpo, rloo) are plain Hugging Face directories with the same card beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ahf.console import UserError
from training.attention import BLOCK_SPARSE
from training.attention import register as register_block_sparse
from ahf.model_folders import SAFE_LOADING, check_model_folder
from training.multitask import TASK_MARKER

MODEL_CARD = "ahf_model.json"
WEIGHTS = "model.safetensors"


def load_tokenizer(name_or_path: str):
    """A directory holding GPT-2's `encoder.json` + `vocab.bpe` gives the real GPT-2 tokenizer offline."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    check_model_folder(name_or_path, weights=False)
    path = Path(name_or_path)
    if (path / "encoder.json").exists() and (path / "vocab.bpe").exists():
        # transformers 5 takes `vocab=`/`merges=` (it silently ignores the 4.x `vocab_file=` names and
        # builds an empty vocabulary), so check the size rather than trust the call
        tokenizer = GPT2TokenizerFast(vocab=str(path / "encoder.json"), merges=str(path / "vocab.bpe"))
        if len(tokenizer) < 50000:
            tokenizer = GPT2TokenizerFast(vocab_file=str(path / "encoder.json"), merges_file=str(path / "vocab.bpe"))
        if len(tokenizer) < 50000:
            raise UserError(f"{path}: GPT-2 tokenizer files gave only {len(tokenizer)} tokens")
        tokenizer.model_max_length = 1 << 30  # lengths are the trainers' business (counted, never silent)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as exc:  # ValueError: a hub tokenizer that needs custom code
            raise UserError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation() -> str:
    """flash-attention 2 when CUDA has it (varlen kernels for packed rows), else PyTorch SDPA."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_backbone(model: str, random_init: dict | None = None, causal_lm: bool = False,
                   attn_implementation: str | None = None) -> nn.Module:
    """`from_pretrained(model)`; or, with `random_init` (e.g. {model_type: gpt2, n_layer: 2}), a fresh model."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    attn = attn_implementation or attention_implementation()
    if attn == BLOCK_SPARSE:
        register_block_sparse()
    if random_init:
        settings = dict(random_init)
        model_type = settings.pop("model_type", "gpt2")
        config = AutoConfig.for_model(model_type, **settings)
        config._attn_implementation = attn
        return cls.from_config(config, attn_implementation=attn, trust_remote_code=False)
    check_model_folder(model)
    for implementation in dict.fromkeys((attn, "sdpa")):  # a model the chosen kernel does not cover: SDPA
        try:
            return cls.from_pretrained(model, attn_implementation=implementation, **SAFE_LOADING)
        except (OSError, ValueError) as exc:
            error = exc
    raise UserError(f"cannot load model {model!r}: {error}") from error


def position_limit(backbone: nn.Module) -> int | None:
    """How many tokens a backbone can place: its `max_position_embeddings` (GPT-2's n_positions), less the
    ids RoBERTa-style embeddings reserve up to their padding_idx; None when it declares no limit (T5)."""
    limit = getattr(backbone.config, "max_position_embeddings", None)
    table = getattr(getattr(backbone, "embeddings", None), "position_embeddings", None)
    padding = getattr(table, "padding_idx", None)
    return None if limit is None else limit - (0 if padding is None else padding + 1)


def is_causal(config) -> bool:
    return bool(getattr(config, "is_decoder", False)) or config.model_type in {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "opt", "phi", "gemma", "olmo"}


class RewardModel(nn.Module):
    """Backbone + linear head. `forward` returns one score per row (pairwise) or tier logits (tier)."""

    def __init__(self, backbone: nn.Module, head: str = "pairwise", pooling: str | None = None,
                 base_model: str | None = None, tasks: list[str] | None = None,
                 task_conditioning: str | None = None, task_marker: str | None = None):
        super().__init__()
        if head not in {"pairwise", "tier"}:
            raise UserError(f"unknown reward head {head!r} (pairwise or tier)")
        if tasks and (head != "pairwise" or task_conditioning not in {"task_token", "task_head"}):
            raise UserError(f"a multi-task reward model needs the pairwise head and task_conditioning "
                            f"task_token or task_head (got {head!r}, {task_conditioning!r})")
        self.backbone = backbone
        self.head_kind = head
        self.pooling = pooling or ("last" if is_causal(backbone.config) else "mean")
        self.base_model = base_model
        self.tasks = list(tasks) if tasks else None
        self.task_conditioning = task_conditioning if tasks else None
        # the marker text the prompts were prefixed with (task_token), as recorded at training time
        self.task_marker = (task_marker or TASK_MARKER) if self.task_conditioning == "task_token" else None
        hidden = getattr(backbone.config, "hidden_size", None) or backbone.config.n_embd
        outputs = 3 if head == "tier" else len(tasks) if self.task_conditioning == "task_head" else 1
        self.head = nn.Linear(hidden, outputs)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             score_index: torch.Tensor | None) -> torch.Tensor:
        if score_index is not None:  # packed rows: the caller names the positions to read
            return hidden.reshape(-1, hidden.shape[-1])[score_index]
        if attention_mask is None:
            return hidden[:, -1] if self.pooling == "last" else hidden.mean(1)
        if self.pooling == "last":  # right padding: the last real token
            last = attention_mask.long().sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask=None, position_ids=None, score_index=None, task_ids=None,
                block_mask=None):
        # a BlockMask (packed rows, training.attention) reaches the attention function as a keyword
        extra = {} if block_mask is None else {"block_mask": block_mask}
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra)
        pooled = self.pool(out.last_hidden_state, attention_mask if attention_mask is not None
                           and attention_mask.dim() == 2 else None, score_index)
        logits = self.head(pooled.to(self.head.weight.dtype))
        if self.task_conditioning == "task_head":  # each scored row reads its own task's column
            if task_ids is None or task_ids.shape != logits.shape[:1]:
                raise UserError(f"a per-task-head reward model needs one task id per scored row "
                                f"(tasks: {', '.join(self.tasks)})")
            return logits.gather(1, task_ids.to(logits.device).long().view(-1, 1)).squeeze(1)
        return logits.squeeze(-1) if self.head_kind == "pairwise" else logits

    def task_index(self, task: str | None) -> int | None:
        """The column / marker for `task`; None for a single-task model. Errors name the known tasks."""
        if self.tasks is None:
            if task is not None:
                raise UserError(f"this reward model is single-task; it takes no task (got {task!r})")
            return None
        if task is None:
            raise UserError(f"this reward model was trained jointly on tasks {', '.join(self.tasks)}: "
                            f"name one (--task NAME)")
        if task not in self.tasks:
            raise UserError(f"unknown task {task!r}: this reward model knows {', '.join(self.tasks)}")
        return self.tasks.index(task)

    @staticmethod
    def score_from_logits(logits: torch.Tensor) -> torch.Tensor:
        """A scalar reward from either head: the score itself, or the expected tier (0 = bad ... 2 = good)."""
        if logits.dim() == 1:
            return logits
        return (logits.softmax(-1) * torch.arange(3, device=logits.device, dtype=logits.dtype)).sum(-1)

    # ------------------------------------------------------------------ persistence
    def card(self) -> dict[str, Any]:
        card = {"kind": "reward_model", "head": self.head_kind, "pooling": self.pooling,
                "base_model": self.base_model, "backbone_config": self.backbone.config.to_dict()}
        if self.tasks:
            card |= {"tasks": self.tasks, "task_conditioning": self.task_conditioning}
            if self.task_marker:
                card["task_marker"] = self.task_marker
        return card

    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        save_state(state, directory / WEIGHTS)
        card = self.card() | (extra or {})
        (directory / MODEL_CARD).write_text(json.dumps(card, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory

    @classmethod
    def load(cls, directory: str | Path, attn_implementation: str | None = None) -> "RewardModel":
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        card = read_card(directory, "reward_model")
        if card.get("method") in NO_NETWORK_METHODS:
            raise UserError(f"{directory}: a {card['method']} reward model has no network of its own to load; "
                            "score it with `ahf eval rm` (training.rm.score_reward_model)")
        settings = dict(card["backbone_config"])
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        attn = attn_implementation or "sdpa"  # scoring uses padded batches: SDPA works on every device
        backbone = AutoModel.from_config(config, attn_implementation=attn, trust_remote_code=False)
        model = cls(backbone, head=card["head"], pooling=card["pooling"], base_model=card.get("base_model"),
                    tasks=card.get("tasks"), task_conditioning=card.get("task_conditioning"),
                    task_marker=card.get("task_marker"))
        missing, unexpected = model.load_state_dict(load_state(directory / WEIGHTS), strict=False)
        missing = [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]
        if missing or unexpected:
            raise UserError(f"{directory}: weights do not match the model card "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model


# reward models whose folder holds no backbone + head (training/probe.py, training/ensemble.py)
NO_NETWORK_METHODS = ("probe", "ensemble")


def read_card(directory: str | Path, kind: str | None = None) -> dict:
    """The model card of an ahf model directory; with `kind`, refuse a card of another kind."""
    path = Path(directory) / MODEL_CARD
    if not path.exists():
        raise UserError(f"{directory}: not an ahf model directory (no {MODEL_CARD})")
    card = json.loads(path.read_text())
    if kind is not None and card.get("kind") != kind:
        raise UserError(f"{directory}: is a {card.get('kind')!r}, expected a {kind!r}")
    return card


def update_card(directory: str | Path, fields: dict) -> None:
    """Add (or replace) top-level fields of a directory's model card."""
    path = Path(directory) / MODEL_CARD
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=2, default=str))


def save_causal_lm(directory: Path, state: dict, model_config, tokenizer, card: dict | None = None) -> Path:
    """A Hugging Face directory (config.json + model.safetensors + tokenizer), loadable by from_pretrained;
    with `card`, also an `ahf_model.json` of kind causal_lm."""
    directory.mkdir(parents=True, exist_ok=True)
    if getattr(model_config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_state(state, directory / WEIGHTS)
    model_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    if card:
        (directory / MODEL_CARD).write_text(json.dumps({"kind": "causal_lm", **card}, indent=2, default=str))
    return directory


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage (GPT-2 ties wte and lm_head): store contiguous copies."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise UserError(f"weights not found: {path}")
    return load_file(str(path))
