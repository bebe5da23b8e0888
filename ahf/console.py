"""What every command shares: `--json` output, progress bars on stderr, and errors as messages."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """An error the user can fix; the CLI prints its message (no traceback) and exits with `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def emit(result: Any, as_json: bool, human: str | None = None) -> None:
    """Print a command's result: one JSON object on stdout with --json, else a human summary."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()
    elif human is not None:
        Console(soft_wrap=True).print(human, highlight=False)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None = None, unit: str = "items",
                 enabled: bool = True) -> Iterator[Any]:
    """Yields `advance(n)`; draws on stderr only when it is a terminal (never mixes into --json)."""
    if not enabled or not stderr.is_terminal:
        yield lambda n=1: None
        return
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn()]
    columns += [TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns += [TimeElapsedColumn()]
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
