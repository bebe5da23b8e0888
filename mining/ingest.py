"""`ahf ingest`: stream files into the store, accounting for every record read.

Invariant of the report: `records_read == ingested + sum(skipped.values())`, per file and in total.
A file that cannot be read to its end (truncated or corrupt compression, invalid JSON document)
is reported in `errors` with where it stopped; the batches committed before that point stay, and
nothing already in the store is lost. Then, unless told not to, the turns are rebuilt on the same
open store (mining.turns), so no other process can slip in between the two.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ahf.console import UserError

from mining.normalize import ParsedBlock, ParserPool, RowBuffer, SkipRecord, normalize_record
from mining.readers import Document, InputError, LineBlock, read_items, split_lines
from mining.reddit_api import iter_document
from mining.store import ROW_GROUP_ROWS, Store, task_threads, usable_cores
from mining.turns import TurnConfig, TurnReport, rebuild_turns

DEFAULT_BATCH_ROWS = 2 * ROW_GROUP_ROWS  # 245,760
MAX_EXAMPLES_PER_REASON = 3
_SUFFIXES = {".zst", ".ndjson", ".jsonl", ".json", ".gz", ".bz2", ".xz", ".txt"}


@dataclass
class FileReport:
    path: str
    records_read: int = 0
    ingested: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    bytes: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        examples = self.skip_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(where)


@dataclass
class IngestReport:
    files: list[FileReport] = field(default_factory=list)
    seconds: float = 0.0
    store: dict[str, int] = field(default_factory=dict)
    turns: TurnReport | None = None  # the rebuild after loading (None: not asked for)

    @property
    def records_read(self) -> int:
        return sum(f.records_read for f in self.files)

    @property
    def ingested(self) -> int:
        return sum(f.ingested for f in self.files)

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for f in self.files:
            total.update(f.skipped)
        return dict(sorted(total.items()))

    @property
    def errors(self) -> list[str]:
        return [f.error for f in self.files if f.error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "records_read": self.records_read,
            "ingested": self.ingested,
            "skipped": self.skipped,
            **self.store,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.records_read / self.seconds) if self.seconds else None,
            "files": [
                {**{k: v for k, v in asdict(f).items() if k != "skipped"}, "skipped": dict(f.skipped)}
                for f in self.files
            ],
            **({"turns": self.turns.to_dict()} if self.turns else {}),
        }


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories expand to the data files inside them, sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES))
        elif path.exists():
            out.append(path)
        else:
            raise UserError(f"no such file or directory: {path}")
    return out


Sink = Callable[[pa.Table, pa.Table], None]  # takes one batch: (comments, posts)


class _Batcher:
    """Collects rows and hands them to `sink` (the store's upsert, or a Ray task's Parquet files)
    every `batch_rows` rows: the batches are the same whoever receives them.

    With `background=True` the sink runs in a writer thread (DuckDB releases the GIL), so that
    parsing the next batch overlaps writing this one; at most one batch is being written while the
    next one fills, which keeps memory at two batches whatever the input size.
    """

    def __init__(self, sink: Sink, batch_rows: int, background: bool = False):
        self.sink, self.batch_rows, self.rows = sink, whole_row_groups(batch_rows), RowBuffer()
        self._writer = _Writer(sink) if background else None

    def maybe_flush(self) -> None:
        while len(self.rows) >= self.batch_rows:
            self.flush(self.batch_rows)

    def flush(self, limit: int | None = None) -> None:
        if len(self.rows):
            if self._writer:
                self._writer.submit(*self.rows.take(limit))
            else:
                self.sink(*self.rows.take(limit))

    def close(self) -> None:
        """Commit what is left and wait for the writer; re-raises a failed write."""
        try:
            self.flush()
        finally:
            if self._writer:
                self._writer.close()

    def abandon(self) -> None:
        """On an unexpected error: let the batch being written finish, drop the rows not yet sent."""
        if self._writer:
            self._writer.close(raise_error=False)


def whole_row_groups(batch_rows: int) -> int:
    """Batches above one DuckDB row group are cut to whole groups (250,000 -> 245,760 rows).

    A commit that ends in a partial row group leaves it to the next checkpoint to merge with the
    next commit's rows: on 1M comments in 250,000-row batches that rewrite cost 0.9 CPU s and
    left a file 50 % larger (docs/bench/ingest.md).
    """
    if batch_rows < ROW_GROUP_ROWS:
        return max(1, batch_rows)
    return batch_rows - batch_rows % ROW_GROUP_ROWS


class _Writer:
    """A thread that hands the batches given to it to the sink, one at a time, in order."""

    def __init__(self, sink: Sink):
        self._sink = sink
        self._batches: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._batches.get()
            try:
                if batch is None:
                    return
                if self._error is None:  # after a failure, drop the rest: the caller re-raises
                    self._sink(*batch)
            except BaseException as exc:
                self._error = exc
            finally:
                batch = None  # free the rows before waiting for the next batch
                self._batches.task_done()

    def submit(self, comments, posts) -> None:
        self._batches.join()  # the previous batch is committed (or failed)
        self._raise()
        self._batches.put((comments, posts))

    def close(self, raise_error: bool = True) -> None:
        self._batches.put(None)
        self._thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _ingest_lines(block: LineBlock, parsed: ParsedBlock | None, report: FileReport, rows: RowBuffer, name: str,
                  retrieved_default: int | None) -> None:
    """Add a block's rows: the fast path's `parsed` rows (None: DuckDB refused the block), else line by line."""
    if parsed is None:
        _ingest_line_by_line(block, report, rows, name, retrieved_default)
        return
    report.records_read += block.n_lines  # DuckDB read one object per line: no blank lines
    report.ingested += block.n_lines - len(parsed.slow)  # the slow lines count as they turn out
    for piece in parsed.pieces():
        if isinstance(piece, tuple):
            rows.add_tables(*piece)
            continue
        where = f"{name}:{block.first_line + piece}"  # a line the fast path left to the record path
        try:
            record = orjson.loads(parsed.line(piece))
        except orjson.JSONDecodeError:
            report.skip("bad_json", where)
            continue
        _add_record(record, where, report, rows, retrieved_default)


def _ingest_line_by_line(block: LineBlock, report: FileReport, rows: RowBuffer, name: str,
                         retrieved_default: int | None) -> None:
    for line_no, line in split_lines(block):
        if not line.strip():
            continue  # blank lines are not records
        report.records_read += 1
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            report.skip("bad_json", f"{name}:{line_no}")
            continue
        _add_record(record, f"{name}:{line_no}", report, rows, retrieved_default)


def _add_walked(item: dict | str, where: str, report: FileReport, rows: RowBuffer,
                retrieved_default: int | None) -> None:
    """An item of mining.reddit_api.iter_document: a record, or the reason it yields for a stub."""
    if isinstance(item, str):  # a reason from the API walker (a `more` stub...), never a record's value
        report.skip(item, where)
        return
    _add_record(item, where, report, rows, retrieved_default)


def _add_record(record, where: str, report: FileReport, rows: RowBuffer, retrieved_default: int | None) -> None:
    """One decoded value: a row, or a counted skip (a line that is a string, a number... is `not_an_object`)."""
    try:
        kind, row = normalize_record(record, retrieved_default)
    except SkipRecord as skip:
        report.skip(skip.reason, where)
        return
    rows.add_row(kind, row)
    report.ingested += 1


def ingest_file(sink: Sink, path: Path, batch_rows: int = DEFAULT_BATCH_ROWS,
                on_bytes: Callable[[int], None] | None = None,
                retrieved_default: int | None = None, parsers: ParserPool | None = None) -> FileReport:
    """Read one file into batches for `sink` (a store's `upsert`, or a writer of Parquet parts)."""
    if parsers is None:
        with ParserPool(parse_threads()) as own:
            return ingest_file(sink, path, batch_rows, on_bytes, retrieved_default, own)
    report = FileReport(str(path), bytes=path.stat().st_size)
    batcher = _Batcher(sink, batch_rows, background=True)
    # Blocks are parsed ahead in the pool's threads and taken back in order, so rows keep line order.
    in_flight: deque[tuple[LineBlock, Future | None]] = deque()

    def finish_oldest() -> None:
        block, parsed = in_flight.popleft()
        _ingest_lines(block, parsed.result() if parsed else None, report, batcher.rows, str(path), retrieved_default)
        if on_bytes:
            on_bytes(block.size)
        batcher.maybe_flush()

    try:
        try:
            for item in read_items(path):
                if isinstance(item, LineBlock):
                    fast = retrieved_default is None  # (API records need the record path's default stamp)
                    in_flight.append((item, parsers.submit(item.parts, item.n_lines) if fast else None))
                    if len(in_flight) > parsers.size:
                        finish_oldest()
                else:
                    while in_flight:
                        finish_oldest()
                    _ingest_document(item, report, batcher, str(path), retrieved_default)
                    batcher.maybe_flush()
        except InputError as exc:
            report.error = str(exc)  # the records read before the damage are still committed
        while in_flight:
            finish_oldest()
    except BaseException:
        batcher.abandon()
        raise
    batcher.close()
    return report


class _ParquetParts:
    """A sink that writes each batch as two Parquet files (comments, posts) in `folder`, in order:
    a Ray task's output, which the driver upserts batch by batch, so the store sees the same batches.
    With `table_dirs` (a Delta store) the files go straight into the tables' folders instead, as
    uncommitted Delta files the driver commits (mining.delta_store.DeltaStore.commit_files): then no
    row passes through the driver."""

    def __init__(self, folder: Path, table_dirs: dict[str, str] | None = None):
        self.folder, self.table_dirs, self.parts = folder, table_dirs, []
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, comments: pa.Table, posts: pa.Table) -> None:
        if self.table_dirs:
            from mining.delta_store import write_table_file

            self.parts.append((write_table_file(self.table_dirs["comments"], comments),
                               write_table_file(self.table_dirs["posts"], posts)))
            return
        stem = self.folder / f"batch-{len(self.parts):06d}"
        pq.write_table(comments, f"{stem}.comments.parquet", compression="none")
        pq.write_table(posts, f"{stem}.posts.parquet", compression="none")
        self.parts.append((f"{stem}.comments.parquet", f"{stem}.posts.parquet"))


@dataclass
class IngestTask:
    """One input file. Locally `sink` is the open store's upsert (and the parser pool and progress
    are shared); a Ray task gets `out`, a folder under the store's scratch for its batches."""

    path: str
    batch_rows: int
    sink: Sink | None = None
    out: str | None = None
    table_dirs: dict[str, str] | None = None  # a Delta store's raw tables: the task writes its files there
    parsers: ParserPool | None = None
    on_bytes: Callable[[int], None] | None = None


def ingest_partition(task: IngestTask) -> tuple[FileReport, list[tuple]]:
    """Read one file into batches, the same function for every engine: to the store directly (local)
    or to Parquet parts (a Ray task); returns the file's accounting and the parts written."""
    path = Path(task.path)
    if task.sink is not None:
        return ingest_file(task.sink, path, task.batch_rows, task.on_bytes, parsers=task.parsers), []
    parts = _ParquetParts(Path(task.out), task.table_dirs)
    with ParserPool(task_threads() or parse_threads(), task.out) as parsers:  # a task's CPUs, not its node's
        report = ingest_file(parts, path, task.batch_rows, parsers=parsers)
    return report, parts.parts


def parse_threads() -> int:
    """Parser threads for the ingest: the parse is its longest stage, so two on 2 cores (the
    decompressor and the store writer fill the rest); at most 4."""
    return max(1, min(4, usable_cores()))


def _ingest_document(doc: Document, report: FileReport, batcher: _Batcher, name: str,
                     retrieved_default: int | None) -> None:
    for where, record in iter_document(doc.value):
        report.records_read += 1
        _add_walked(record, f"{name}:{where}", report, batcher.rows, retrieved_default)
        batcher.maybe_flush()


def ingest_records(store: Store, records: Iterator[tuple[str, dict | str]], source: str,
                   retrieved_default: int | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> FileReport:
    """Ingest already-decoded records (e.g. from a live crawl); `(where, record)` as `iter_document` yields."""
    report = FileReport(source)
    batcher = _Batcher(store.upsert, batch_rows)
    for where, record in records:
        report.records_read += 1
        _add_walked(record, f"{source}:{where}", report, batcher.rows, retrieved_default)
        batcher.maybe_flush()
    batcher.close()
    return report


def ingest(paths: Iterable[str | Path], store_dir: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS,
           progress: Callable[[int], None] | None = None, rebuild: bool = True,
           turn_config: TurnConfig | None = None, engine=None) -> IngestReport:
    """Ingest files into the store at `store_dir`, then (`rebuild`) rebuild its turns with
    `turn_config` (None: configs/mining.yaml); returns the accounting report.

    Files are the partitions: on the local engine they stream into the store one after another; on
    Ray each is read by a task into Parquet batches under the store's scratch folder, and this
    process upserts them in the files' order, batch by batch, so the store takes the same batches
    in the same order (newest retrieval wins, ties to the later write) whichever engine read them.
    """
    from ahf.engine import LocalEngine

    engine = engine or LocalEngine()
    files = expand_paths(paths)
    started = time.perf_counter()
    report = IngestReport()
    with Store(store_dir) as store:
        # scratch (parser pipes, a Ray task's batches) lives in the store: what a kill -9 leaves
        # behind is removed by the next run
        shutil.rmtree(store.scratch, ignore_errors=True)
        store.scratch.mkdir()
        try:
            with _bulk_load(store):
                report.files = _load(store, files, batch_rows, progress, engine)
        finally:
            shutil.rmtree(store.scratch, ignore_errors=True)
        report.store = summary_counts(store)
        if rebuild:
            report.turns = rebuild_turns(store, turn_config, engine)
    report.seconds = time.perf_counter() - started
    return report


def _load(store: Store, files: list[Path], batch_rows: int, progress, engine) -> list[FileReport]:
    if engine.name == "local":
        with ParserPool(parse_threads(), store.scratch) as parsers:
            tasks = [IngestTask(str(path), batch_rows, sink=store.upsert, parsers=parsers, on_bytes=progress)
                     for path in files]
            return [file_report for file_report, _ in engine.map(ingest_partition, tasks)]
    # A store many can write (Delta) has the tasks write its tables' files; the DuckDB file takes their rows
    table_dirs = store.task_table_dirs()
    tasks = [IngestTask(str(path), batch_rows, out=str(store.scratch / f"file-{i:05d}"), table_dirs=table_dirs)
             for i, path in enumerate(files)]
    reports = []
    for (file_report, parts), task in zip(engine.map(ingest_partition, tasks), tasks):
        store.commit_files(parts)  # in the file's order: later writes win ties, as locally
        shutil.rmtree(task.out, ignore_errors=True)
        if progress:
            progress(file_report.bytes)
        reports.append(file_report)
    return reports


@contextmanager
def _bulk_load(store: Store) -> Iterator[None]:
    """The ingest is already a pipeline (decompress thread, parse threads, writer thread): DuckDB's
    own threads compete with it for the cores. On 2 cores one DuckDB thread inserted a 250k-row
    batch with ~35 % less CPU than two (docs/bench/ingest.md). Queries after the load get them all."""
    store.execute(f"SET threads = {max(1, usable_cores() // 2)}")
    try:
        yield
    finally:
        store.execute(f"SET threads = {usable_cores()}")


def summary_counts(store: Store) -> dict[str, int]:
    return {"comments": store.count("comments"), "posts": store.count("posts"), **store.thread_counts()}
