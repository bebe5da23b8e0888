"""Where a stage's per-partition work runs: in this process (`local`) or on a Ray cluster (`ray`).

A stage splits its work into partitions (files, groups of threads, batches of texts) and hands one
module-level function and the partitions' descriptions to `Engine.map`; the results come back in
the partitions' order, whatever engine ran them. The local engine calls the function in a loop;
the Ray engine runs it as Ray tasks (at most `2 x workers` in flight, so memory stays bounded) on a
cluster started with `ray start --head` (`address="auto"` or `ray://HOST:10001`), or on a local Ray
instance it starts itself when given no address. The function is the same object either way: there
is no second implementation of any rule.

Ray ships the function by reference: its module must be importable on every node (install ahf there,
as docs/scaling.md shows). Arguments and results travel through Ray's object store, so they should be
descriptions (paths, partition numbers, configs) and Arrow tables, not open connections.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from ahf.console import UserError

EngineName = Literal["local", "ray"]
ENGINES = ("local", "ray")


class LocalEngine:
    """The partitions one after another, in this process."""

    name = "local"

    def __init__(self) -> None:
        self.workers = 1

    def partitions(self, items: int, per_partition: int) -> int:
        """One: this process runs a stage whole (DuckDB parallelises inside it)."""
        return 1

    def map(self, fn: Callable, items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield fn(item)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Undo what `ray.init` does to this process's fatal-signal handlers: it enables Python's faulthandler,
    which then runs before the JVM's SIGSEGV handler when the JVM (pyserini's Lucene) started first. The JVM
    takes SIGSEGV for its own implicit null checks; faulthandler reports such a fault as fatal and re-raises
    it, and the JVM aborts ("Fatal Python error: Segmentation fault", seen building a Lucene index after a
    Ray build in one process). Ray's own absl handler is kept off by RAY_DISABLE_FAILURE_SIGNAL_HANDLER."""
    import faulthandler

    was_enabled = faulthandler.is_enabled()
    try:
        yield
    finally:
        if not was_enabled and faulthandler.is_enabled():
            faulthandler.disable()  # restores the handlers it replaced, the JVM's among them


class RayEngine:
    """The partitions as Ray tasks: on the cluster at `address`, or on a local instance started here
    with `num_cpus` (default: this machine's cores). A Ray already initialised in this process (a test
    session's cluster, a user's notebook) is used as it is, and left running."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        # Ray's driver would install a SIGSEGV handler over the JVM's (pyserini runs Lucene in this process,
        # and the JVM takes SIGSEGV for its own null checks): read when ray first loads its constants
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        try:
            import ray
        except ImportError as exc:
            raise UserError("--engine ray needs Ray: pip install 'ahf[scale]' (or 'ray[data]')") from exc
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance on loopback
            try:
                with keep_signal_handlers():
                    ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                             log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: {exc}") from exc
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Callable, Any] = {}

    def partitions(self, items: int, per_partition: int) -> int:
        """Enough partitions for `per_partition` items each, and at least one per worker."""
        return max(self.workers, -(-items // per_partition))

    def map(self, fn: Callable, items: Iterable[Any]) -> Iterator[Any]:
        remote = self._remote.setdefault(fn, self._ray.remote(fn))
        pending: deque = deque()
        for item in items:
            pending.append(remote.remote(item))
            if len(pending) >= 2 * self.workers:
                yield self._get(pending.popleft())
        while pending:
            yield self._get(pending.popleft())

    def _get(self, ref) -> Any:
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            raise (cause or exc) from None  # a UserError in a task is the user's error, as locally

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_engine(name: str = "local", address: str | None = None) -> LocalEngine | RayEngine:
    """`local` or `ray` (at `address`, or a local instance). Use as a context manager."""
    if name == "local":
        if address:
            raise UserError("--ray-address goes with --engine ray")
        return LocalEngine()
    if name == "ray":
        return RayEngine(address)
    raise UserError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
