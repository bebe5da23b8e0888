"""The embedded store: one DuckDB file per store directory (see docs/store.md for why DuckDB).

Every stage reads and writes a store through this class, never through a connection of its own:

- raw rows: `upsert` merges a batch of posts and comments (one row per Reddit id: the copy with
  the newest `retrieved_utc` wins, ties go to the later write), one transaction per batch, so a
  killed ingest leaves the store as it was after its last committed batch;
- derived tables (`turns`, `acts`, `labels`, ...; mining.schema has them all): `replace_tables`
  builds each from SQL or Arrow with its declared schema and swaps them in together, in one
  transaction with the meta entries (the configs they were built with), so a failed stage leaves
  the previous ones;
- reads: `rows` / `value` / `arrow` / `reader` run a stage's SQL over the tables (DuckDB is the
  query engine, stages keep their SQL); `turn_rows` gives turns with their dialog context, the
  one definition of mining.schema.turn_rows_sql; `execute` runs a stage's work statements (temp
  tables, work tables it fills partition by partition).

The id columns carry no primary key (schema 2): its index cost a third of the ingest's store
writes and held ~40 bytes per id in memory. Each batch is merged set-wise instead (`Store.upsert`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from ahf.console import UserError
from mining.schema import (
    COMMENT_SCHEMA,
    MUTABLE_COMMENT_COLUMNS,
    MUTABLE_POST_COLUMNS,
    POST_SCHEMA,
    SCHEMAS,
    THREAD_KEYS,
    create_table_sql,
    turn_rows_sql,
)

DB_NAME = "ahf.duckdb"
# meta key: a counter that every committed upsert raises; derived tables record the value they
# were built from, so a reader can tell when they are older than the rows (`ahf stats`).
COMMENTS_VERSION = "comments_version"
SCHEMA_VERSION = 2  # 1: comments and posts had a PRIMARY KEY on id (such stores still work, as they are)
ROW_GROUP_ROWS = 122_880  # DuckDB's row group: commits of whole groups are never rewritten later


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All statements inside commit together, or none does (the previous tables stay)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def new_store_format() -> str:
    """The format of a store created now: `AHF_STORE_FORMAT` (delta | duckdb), Delta Lake by default: the one
    format that a laptop and a Ray cluster both write (docs/store.md)."""
    value = os.environ.get("AHF_STORE_FORMAT", "delta")
    if value not in ("duckdb", "delta"):
        raise StoreError(f"AHF_STORE_FORMAT={value!r}: choose duckdb or delta")
    return value


def usable_cores() -> int:
    """The cores this process may run on (taskset, a cpuset), which can be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def task_threads() -> int | None:
    """The CPUs a Ray task was given (Ray sets OMP_NUM_THREADS to them in its workers), or None
    outside one: a task's DuckDB and parsers use that many threads, so tasks never oversubscribe."""
    value = os.environ.get("OMP_NUM_THREADS")
    return int(value) if value and value.isdigit() and int(value) > 0 else None


class StoreError(UserError):
    """The store cannot be opened or is not there; the CLI prints the message."""


def _merge_sql(table: str, schema: pa.Schema, mutable: tuple[str, ...], source: str) -> list[str]:
    """Statements that merge a batch with repeated or already stored ids, as an upsert would.

    Within the batch the newest copy of each id wins (the later line on a tie); a stored row takes
    its mutable columns from that copy when it is at least as new, and keeps the rest as created.
    """
    names = ", ".join(schema.names)
    winners = (f"(SELECT {names} FROM {source} QUALIFY row_number() OVER "
               "(PARTITION BY id ORDER BY coalesce(retrieved_utc, -1) DESC, _seq DESC) = 1)")
    updates = ", ".join(f"{c} = w.{c}" for c in mutable)
    return [
        f"UPDATE {table} SET {updates} FROM {winners} AS w WHERE {table}.id = w.id "
        f"AND coalesce(w.retrieved_utc, -1) >= coalesce({table}.retrieved_utc, -1)",
        f"INSERT INTO {table} SELECT {names} FROM {winners} AS w "
        f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.id = w.id)",
    ]


class Store:
    """A store directory. Use as a context manager; `read_only=True` lets several readers share it.

    Two formats behind this one interface: Delta Lake tables (mining.delta_store.DeltaStore: many writers,
    for a laptop and a Ray cluster alike; the default for a new store) and one DuckDB file (this class; the
    format of stores made before). `Store(path)` opens whichever the directory holds; a new store takes
    `AHF_STORE_FORMAT` (delta | duckdb)."""

    format = "duckdb"

    def __new__(cls, path: str | Path, read_only: bool = False, create: bool = True):
        if cls is Store:
            from mining.delta_store import DeltaStore, is_delta_store

            fresh = not (Path(path) / DB_NAME).exists() and not is_delta_store(path)
            if is_delta_store(path) or fresh and create and not read_only and new_store_format() == "delta":
                return super().__new__(DeltaStore)
        return super().__new__(cls)

    def __init__(self, path: str | Path, read_only: bool = False, create: bool = True):
        self.path = Path(path)
        db = self.path / DB_NAME
        if read_only or not create:
            if not db.exists():
                raise StoreError(f"no store at {self.path} (expected {db}); run `ahf ingest` first")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        self.read_only = read_only
        self._connect()
        if not read_only:
            self._init_schema()

    def _connect(self) -> None:
        db = self.path / DB_NAME
        try:
            self.con = duckdb.connect(str(db), read_only=self.read_only)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open store {db}: {exc}") from exc
        # DuckDB draws its progress bar on stdout, which belongs to `--json` output
        self.con.execute("SET enable_progress_bar = false")
        self._follow_affinity()

    def _follow_affinity(self) -> None:
        if usable_cores() < (os.cpu_count() or 1):  # DuckDB counts the machine's cores, not this process's
            self.con.execute(f"SET threads = {usable_cores()}")

    def _init_schema(self) -> None:
        self.con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        self.con.execute(create_table_sql("comments", COMMENT_SCHEMA, if_not_exists=True))
        self.con.execute(create_table_sql("posts", POST_SCHEMA, if_not_exists=True))
        self.con.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", [str(SCHEMA_VERSION)]
        )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # ------------------------------------------------------------------ partitions (ahf.engine)

    @classmethod
    @contextmanager
    def reading(cls, ref: str | Path | Store) -> Iterator[Store]:
        """The store a partition function reads: this process's open store as it is, or the store at a
        path opened read-only (a Ray task's, in another process) and closed afterwards."""
        if isinstance(ref, Store):
            yield ref
            return
        with cls(ref, read_only=True) as store:
            threads = task_threads()
            if threads:  # a task's share of its node, not every core of it
                store.execute(f"SET threads = {threads}")
            yield store

    @contextmanager
    def released(self, engine_name: str) -> Iterator[None]:
        """Let other processes read the store during the block (a DuckDB file has one writer, who
        excludes readers): closed and reopened for the Ray engine, untouched for the local one."""
        if engine_name == "local" or self.read_only:
            yield
            return
        self.con.close()
        try:
            yield
        finally:
            self._connect()

    @contextmanager
    def partitioned(self, tables: tuple[str, ...], part: int, parts: int, copy: bool = False,
                    joined: tuple[str, ...] = ()) -> Iterator[None]:
        """Inside the block, each of `tables` holds only the rows of the threads in partition `part`
        (`hash(THREAD_KEYS[table]) % parts == part`; temp views shadow the tables), so a stage's SQL
        runs unchanged on one partition of threads. `copy`: the block reads the tables many times, so
        a store whose tables are files copies them in once (mining.delta_store); here they are DuckDB's
        own tables already, and a copy was measured slower than the filtered scans. `joined`: tables the
        block only joins against, narrowed too by a store whose tables are files (each partition would read
        them whole); left whole here, where the filtered view costs more than the join's own scan (label,
        4 partitions at 1M comments: 2.17 -> 2.39 s narrowed)."""
        if parts == 1:
            yield
            return
        catalog = self.value("SELECT current_database()")
        for table in tables:
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS SELECT * FROM {catalog}.main.{table} "
                             f"WHERE hash({THREAD_KEYS[table]}) % {int(parts)} = {int(part)}")
        try:
            yield
        finally:
            for table in tables:
                self.con.execute(f"DROP VIEW IF EXISTS temp.main.{table}")

    def task_table_dirs(self) -> dict[str, str] | None:
        """Where a Ray ingest task writes its rows as the raw tables' own files (a store many can write);
        None here: a DuckDB file has one writer, so the tasks hand their batches to the driver."""
        return None

    def commit_files(self, batches: list[tuple]) -> None:
        """Take one ingest task's batches, in the input's order: here Parquet parts (comments, posts) in
        scratch, upserted one by one, so the store takes the same batches as on the local engine."""
        import pyarrow.parquet as pq

        for comments, posts in batches:
            self.upsert(pq.read_table(comments), pq.read_table(posts))

    @property
    def scratch(self) -> Path:
        """STORE/.tmp: files a run writes on its way (partition outputs, parser pipes), removed after it."""
        return self.path / ".tmp"

    @contextmanager
    def scratch_dir(self, name: str) -> Iterator[Path]:
        """A fresh folder under `scratch` for the block, removed afterwards (and `scratch` with it when empty)."""
        folder = self.scratch / f"{name}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.scratch.rmdir()

    def upsert(self, comments: pa.Table, posts: pa.Table) -> None:
        """Write one batch atomically: one row per id, the newest retrieval winning.

        A batch of new ids (a dump read for the first time) is one plain INSERT. Whether any id is
        repeated in the batch or already stored is asked first: within the batch by counting, in
        the store by a semi-join of the batch's ids against the table, which DuckDB's min/max
        filter on the batch's ids narrows to the row groups whose id range overlaps them (a dump's
        ids grow with time). Only such a batch takes the merge (`_merge_sql`).
        """
        batches = [
            (table, rows, schema, mutable)
            for table, rows, schema, mutable in (
                ("comments", comments, COMMENT_SCHEMA, MUTABLE_COMMENT_COLUMNS),
                ("posts", posts, POST_SCHEMA, MUTABLE_POST_COLUMNS),
            )
            if rows.num_rows
        ]
        if not batches:
            return
        # The batches are registered outside the transaction: a failed statement aborts it, and
        # nothing but ROLLBACK may run in an aborted transaction.
        statements = []
        for table, rows, schema, mutable in batches:
            view = f"batch_{table}"
            if self._needs_merge(table, rows):
                rows = rows.append_column("_seq", pa.array(range(rows.num_rows), type=pa.int64()))
                sql = _merge_sql(table, schema, mutable, view)
            else:
                sql = [f"INSERT INTO {table} SELECT {', '.join(schema.names)} FROM {view}"]
            self.con.register(view, rows)
            statements.append((view, sql))
        try:
            with transaction(self.con):
                for _, sql in statements:
                    for statement in sql:
                        self.con.execute(statement)
                self.con.execute("INSERT INTO meta VALUES (?, '1') ON CONFLICT (key) DO UPDATE "
                                 "SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS VARCHAR)", [COMMENTS_VERSION])
        finally:
            for view, _ in statements:
                self.con.unregister(view)

    def _needs_merge(self, table: str, rows: pa.Table) -> bool:
        """Whether an id of the batch repeats within it or is already in the table."""
        self.con.register("batch_ids", rows.select(["id"]))
        try:
            repeated, stored = self.con.execute(
                f"""SELECT (SELECT count(DISTINCT id) FROM batch_ids) < {rows.num_rows},
                           EXISTS (SELECT 1 FROM {table} WHERE id IN (SELECT id FROM batch_ids))"""
            ).fetchall()[0]
        finally:
            self.con.unregister("batch_ids")
        return repeated or stored

    def count(self, table: str) -> int:
        if not self.has_table(table):
            return 0
        return self.value(f"SELECT count(*) FROM {table}")

    def has_table(self, table: str) -> bool:
        return bool(self.value("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]))

    def require(self, table: str, hint: str) -> int:
        """The row count of `table`; a clear error (with what to run first) when it is not there."""
        if not self.has_table(table):
            raise StoreError(f"the store {self.path} has no `{table}` table: {hint}")
        return self.count(table)

    # ------------------------------------------------------------------ reads (a stage's SQL)

    def rows(self, sql: str, params: Any = None) -> list[tuple]:
        return self.con.execute(sql, params).fetchall()

    def value(self, sql: str, params: Any = None) -> Any:
        """The first column of the first row (None when there is no row)."""
        rows = self.con.execute(sql, params).fetchall()  # (DuckDB 2 wants every result finished)
        return rows[0][0] if rows else None

    def arrow(self, sql: str, params: Any = None) -> pa.Table:
        return self.con.sql(sql, params=params).to_arrow_table()

    def reader(self, sql: str, params: Any = None, batch_rows: int = 100_000) -> pa.RecordBatchReader:
        """A stream of record batches (temp tables included); read it to the end before other work on the store."""
        return self.con.sql(sql, params=params).to_arrow_reader(batch_rows)

    def turn_rows(self, where: str = "", params: Any = None, columns: str = "t.*") -> pa.Table:
        """Turns with their `context` and `parent_text` (mining.schema.turn_rows_sql), comment_id order."""
        self.require("turns", "run `ahf turns` (or `ahf ingest`) first")
        return self.arrow(turn_rows_sql(where, columns), params)

    def execute(self, sql: str, params: Any = None) -> None:
        """A stage's work statement (a temp table, an insert into its own work table)."""
        self.con.execute(sql, params)

    @contextmanager
    def registered(self, name: str, table: pa.Table) -> Iterator[str]:
        """`table` readable by SQL as `name` inside the block."""
        self.con.register(name, table)
        try:
            yield name
        finally:
            self.con.unregister(name)

    # ------------------------------------------------------------------ derived tables and meta

    def replace_tables(self, sources: dict[str, str | tuple[str, Any] | pa.Table],
                       meta: dict[str, Any] | None = None) -> None:
        """Build each table from its source (a SELECT, a (SELECT, params) pair, or an Arrow table),
        with its schema from mining.schema when it has one, and swap all of them in at once, with the
        `meta` entries, in one transaction: readers see the old tables or the new ones, and a failure
        keeps the old."""
        arrow = {name: f"_replace_{name}" for name, source in sources.items() if isinstance(source, pa.Table)}
        for name, view in arrow.items():
            self.con.register(view, sources[name])
        try:
            with transaction(self.con):
                for name, source in sources.items():
                    select, params = (f"SELECT * FROM {arrow[name]}", None) if name in arrow else \
                        source if isinstance(source, tuple) else (source, None)
                    self.con.execute(f"DROP TABLE IF EXISTS {name}__new")
                    if name in SCHEMAS:  # the declared types: a wrong column is an error here
                        self.con.execute(create_table_sql(f"{name}__new", SCHEMAS[name]))
                        self.con.execute(f"INSERT INTO {name}__new BY NAME {select}", params)
                    else:
                        self.con.execute(f"CREATE TABLE {name}__new AS {select}", params)
                    self.con.execute(f"DROP TABLE IF EXISTS {name}")
                    self.con.execute(f"ALTER TABLE {name}__new RENAME TO {name}")
                for key, value in (meta or {}).items():
                    self._write_meta(key, value)
        finally:
            for view in arrow.values():
                self.con.unregister(view)

    def meta(self, key: str) -> Any:
        """A meta value (JSON-decoded), or None when the key is not there."""
        raw = self.value("SELECT value FROM meta WHERE key = ?", [key]) if self.has_table("meta") else None
        return None if raw is None else json.loads(raw)

    def _write_meta(self, key: str, value: Any) -> None:
        self.con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         [key, json.dumps(value)])

    def thread_counts(self) -> dict[str, int]:
        """Threads (distinct posts seen through either a post or a comment) and orphan replies.

        Post ids and comment ids are unique, so each count is one hash join or aggregate over the
        store (~0.2 CPU s per million comments).
        """
        threads, orphans, posts_missing = self.con.execute(
            """
            WITH links AS MATERIALIZED (SELECT DISTINCT link_id FROM comments),
                 post_links AS (SELECT 't3_' || id AS link_id FROM posts)
            SELECT (SELECT count(*) FROM links)
                     + (SELECT count(*) FROM post_links p ANTI JOIN links l USING (link_id)),
                   (SELECT count(*) FROM comments c ANTI JOIN comments p ON p.id = substr(c.parent_id, 4)
                      WHERE prefix(c.parent_id, 't1_')),
                   (SELECT count(*) FROM links l ANTI JOIN post_links p USING (link_id))
            """
        ).fetchone()
        return {"threads": threads, "orphans": orphans, "threads_without_post": posts_missing}
