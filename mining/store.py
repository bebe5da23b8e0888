"""The embedded store: one DuckDB file per store directory (see docs/store.md for why DuckDB).

Tables: `posts` and `comments` (one row per Reddit id: the copy with the newest `retrieved_utc`
wins, ties go to the later write), and `turns` (derived, rebuilt by `mining.turns.build_turns`).
Every batch is one transaction, so a killed ingest leaves the store as it was after its last
committed batch, and re-ingesting the same files converges to the same rows as one clean run.

The id columns carry no primary key (schema 2): its index cost a third of the ingest's store
writes and held ~40 bytes per id in memory. Each batch is merged set-wise instead (`Store.upsert`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from ahf.console import UserError

from mining.schema import (
    COMMENT_SCHEMA,
    MUTABLE_COMMENT_COLUMNS,
    MUTABLE_POST_COLUMNS,
    POST_SCHEMA,
    duckdb_type,
)

DB_NAME = "ahf.duckdb"
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


class StoreError(UserError):
    """The store cannot be opened or is not there; the CLI prints the message."""


def _create_sql(table: str, schema: pa.Schema) -> str:
    columns = ", ".join(f"{f.name} {duckdb_type(f.type)}" for f in schema)
    return f"CREATE TABLE IF NOT EXISTS {table} ({columns})"


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
    """A store directory. Use as a context manager; `read_only=True` lets several readers share it."""

    def __init__(self, path: str | Path, read_only: bool = False, create: bool = True):
        self.path = Path(path)
        db = self.path / DB_NAME
        if read_only or not create:
            if not db.exists():
                raise StoreError(f"no store at {self.path} (expected {db}); run `ahf ingest` first")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(db), read_only=read_only)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open store {db}: {exc}") from exc
        self.read_only = read_only
        # DuckDB draws its progress bar on stdout, which belongs to `--json` output
        self.con.execute("SET enable_progress_bar = false")
        if not read_only:
            self._init_schema()

    def _init_schema(self) -> None:
        self.con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        self.con.execute(_create_sql("comments", COMMENT_SCHEMA))
        self.con.execute(_create_sql("posts", POST_SCHEMA))
        self.con.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", [str(SCHEMA_VERSION)]
        )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

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
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]

    def has_table(self, table: str) -> bool:
        return bool(
            self.con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
            ).fetchall()[0][0]
        )

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
