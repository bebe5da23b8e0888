"""The embedded store: one DuckDB file per store directory (see docs/store.md for why DuckDB).

Tables: `posts` and `comments` (one row per Reddit id, upserted: the copy with the newest
`retrieved_utc` wins, ties go to the later write), and `turns` (derived, rebuilt by
`mining.turns.build_turns`). Every batch is one transaction, so a killed ingest leaves the store
as it was after its last committed batch, and re-ingesting the same files converges to the
same rows as one clean run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from ahf.console import UserError

from mining.schema import (
    COMMENT_SCHEMA,
    MUTABLE_COMMENT_COLUMNS,
    MUTABLE_POST_COLUMNS,
    POST_SCHEMA,
    duckdb_type,
)

DB_NAME = "ahf.duckdb"
SCHEMA_VERSION = 1


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
    columns = ", ".join(
        f"{f.name} {duckdb_type(f.type)}{' PRIMARY KEY' if f.name == 'id' else ''}" for f in schema
    )
    return f"CREATE TABLE IF NOT EXISTS {table} ({columns})"


def _upsert_sql(table: str, schema: pa.Schema, mutable: tuple[str, ...], source: str, dedupe: bool) -> str:
    names = ", ".join(schema.names)
    updates = ", ".join(f"{c} = excluded.{c}" for c in mutable)
    # Within one batch keep the newest copy of each id (later line on a tie); across batches the
    # WHERE clause keeps the stored row if it was retrieved later than the incoming one.
    # ON CONFLICT may touch a row only once per statement, hence the QUALIFY when ids repeat.
    qualify = (
        "QUALIFY row_number() OVER (PARTITION BY id ORDER BY coalesce(retrieved_utc, -1) DESC, "
        "_seq DESC) = 1 "
    ) if dedupe else ""
    return (
        f"INSERT INTO {table} SELECT {names} FROM {source} {qualify}"
        f"ON CONFLICT (id) DO UPDATE SET {updates} "
        f"WHERE coalesce(excluded.retrieved_utc, -1) >= coalesce({table}.retrieved_utc, -1)"
    )


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
        """Write one batch atomically.

        First as a plain INSERT, which costs about a third of the upsert: when no id of the batch
        is already stored or repeated within it (a dump read for the first time), that is the
        whole job. A duplicate key aborts it early (DuckDB checks each 2,048-row chunk as it
        inserts it); the transaction is then rolled back and the batch written again as an upsert.
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
        try:
            self._write(batches, plain=True)
        except duckdb.ConstraintException:
            self._write(batches, plain=False)

    def _write(self, batches: list, plain: bool) -> None:
        # The batches are registered outside the transaction: a failed statement aborts it, and
        # nothing but ROLLBACK may run in an aborted transaction.
        statements = []
        for table, rows, schema, mutable in batches:
            view = f"batch_{table}"
            if plain:
                sql = f"INSERT INTO {table} SELECT {', '.join(schema.names)} FROM {view}"
            else:
                dedupe = pc.count_distinct(rows["id"]).as_py() < rows.num_rows
                rows = rows.append_column("_seq", pa.array(range(rows.num_rows), type=pa.int64()))
                sql = _upsert_sql(table, schema, mutable, view, dedupe)
            self.con.register(view, rows)
            statements.append((view, sql))
        try:
            with transaction(self.con):
                for _, sql in statements:
                    self.con.execute(sql)
        finally:
            for view, _ in statements:
                self.con.unregister(view)

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
        """Threads (distinct posts seen through either a post or a comment) and orphan replies."""
        threads, orphans, posts_missing = self.con.execute(
            """
            WITH ids AS (SELECT 't3_' || id AS link_id FROM posts
                         UNION SELECT link_id FROM comments)
            SELECT (SELECT count(*) FROM ids),
                   (SELECT count(*) FROM comments c WHERE c.parent_id LIKE 't1\\_%' ESCAPE '\\'
                      AND NOT EXISTS (SELECT 1 FROM comments p WHERE p.id = substr(c.parent_id, 4))),
                   (SELECT count(DISTINCT c.link_id) FROM comments c
                      WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.id = substr(c.link_id, 4)))
            """
        ).fetchone()
        return {"threads": threads, "orphans": orphans, "threads_without_post": posts_missing}
