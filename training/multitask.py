"""Joint multi-task reward models: one backbone trained on several pair files at once.

`ahf train rm --task stories=A.jsonl --task explanations=B.jsonl --out DIR` trains one model on all
tasks, with the task made visible in one of two ways (`multitask` in configs/train/rm.yaml):

- `task_token`: every prompt (and `rejected_prompt`) is prefixed with the marker text
  `[task: NAME]\\n`; one scalar head. The marker is plain text, so any tokenizer and any later
  fine-tune or merge handles it like the rest of the prompt.
- `task_head`: the prompts are unchanged; the head has one output per task and each pair reads
  its own task's column (a shared trunk with per-task linear heads).

Batches mix tasks (one shuffle over all pairs). `task_balance: equal` up-samples the smaller tasks
each epoch to the size of the largest (repeats drawn afresh per epoch); `proportional` uses every
pair once. Held-out pairs are split by prompt *within* each task (or come from
`eval_pairs: {task: file}`), and the result reports the evaluation per task.

The task list and the form are recorded in `ahf_model.json` (`tasks`, `task_conditioning`,
`task_marker`), so `ahf eval rm --task NAME` scores with the same conditioning.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

from ahf.console import UserError
from training import data as D

TASK_MARKER = "[task: {task}]\n"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_task_specs(specs: list[str]) -> dict[str, str]:
    """`["stories=a.jsonl", "explanations=b.jsonl"]` -> {name: file}, in the order given."""
    tasks: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--task expects NAME=FILE, got {spec!r}")
        if name in tasks:
            raise UserError(f"--task {name!r} given twice")
        tasks[name] = path
    return check_task_names(tasks)


def check_task_names(tasks: dict) -> dict:
    if len(tasks) < 2:
        raise UserError(f"joint training needs at least two tasks, got {list(tasks)} "
                        "(for one pairs file pass it as PAIRS, without --task)")
    for name in tasks:
        if not TASK_NAME.match(name):
            raise UserError(f"task name {name!r}: use letters, digits, '_', '.', '-' (it becomes part of the prompt)")
    return tasks


def task_marked(prompt: str, task: str, template: str = TASK_MARKER) -> str:
    """The task-token form of a prompt: the marker text in front of it."""
    return template.format(task=task) + prompt


def with_task_marker(pairs: list[D.Pair], task: str, template: str = TASK_MARKER) -> list[D.Pair]:
    """The task-token form: the marker text in front of every prompt the replies answer."""
    return [replace(p, prompt=task_marked(p.prompt, task, template),
                    rejected_prompt=None if p.rejected_prompt is None else task_marked(p.rejected_prompt, task,
                                                                                         template))
            for p in pairs]


def load_task_pairs(tasks: dict[str, str | Path], eval_pairs: dict[str, str] | None, eval_fraction: float,
                    seed: int, detok: bool) -> tuple[dict[str, list[D.Pair]], dict[str, list[D.Pair]], dict[str, dict]]:
    """Per task: train pairs, held-out pairs and the data record (lineage). Each task's file may be a pairs
    file or a pairs export; held-out = `eval_pairs[task]` when given, else the export's validation split,
    else a split by prompt within the task (each task's own seeded split, as single-task training makes)."""
    if eval_pairs is not None:
        unknown = sorted(set(eval_pairs) - set(tasks))
        if unknown:
            raise UserError(f"eval_pairs names tasks {unknown} that are not trained (tasks: {', '.join(tasks)})")
    train, held, data = {}, {}, {}
    for name, path in tasks.items():
        source = D.read_source(path, D.load_pairs, detok, ("pairs",))
        if eval_pairs and name not in eval_pairs:  # a mapping that leaves a task out: not evaluated, said plainly
            train[name], held[name], how = source.train, [], "none (not in eval_pairs)"
        else:
            train[name], held[name], how = D.held_out(source, (eval_pairs or {}).get(name), D.load_pairs, detok,
                                                      eval_fraction, seed)
        data[name] = source.data | {"eval": how}
    return train, held, data


def epoch_order(task_of: list[int], balance: str, rng: random.Random) -> list[int]:
    """Indices into the encoded pairs for one epoch (the batcher shuffles them). `equal`: each smaller
    task is repeated whole as often as fits, then topped up by a fresh random sample, until it has as
    many pairs as the largest task."""
    by_task: dict[int, list[int]] = {}
    for index, task in enumerate(task_of):
        by_task.setdefault(task, []).append(index)
    if balance == "proportional":
        return list(range(len(task_of)))
    if balance != "equal":
        raise UserError(f"task_balance must be proportional or equal, got {balance!r}")
    target = max(len(members) for members in by_task.values())
    order = []
    for task in sorted(by_task):
        members = by_task[task]
        repeats, rest = divmod(target, len(members))
        order += members * repeats + rng.sample(members, rest)
    return order
