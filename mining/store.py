"""The embedded store: one DuckDB file per store directory (see docs/store.md for why DuckDB).

Tables: `posts` and `comments` (one row per Reddit id, upserted: the copy with the newest
`retrieved_utc` wins, ties go to the later write), and `turns` (derived, rebuilt by
`mining.turns.build_turns`). Every batch is one transaction, so a killed ingest leaves the store
as it was after its last committed batch, and re-ingesting the same files converges to the
same rows as one clean run.
"""

from __future__ import annotations

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
SCHEMA_VERSION = 1


class StoreError(UserError):
    """The store cannot be opened or is not there; the CLI prints the message."""


def _create_sql(table: str, schema: pa.Schema) -> str:
    columns = ", ".join(
        f"{f.name} {duckdb_type(f.type)}{' PRIMARY KEY' if f.name == 'id' else ''}" for f in schema
    )
    return f"CREATE TABLE IF NOT EXISTS {table} ({columns})"


def _upsert_sql(table: str, schema: pa.Schema, mutable: tuple[str, ...]) -> str:
    names = ", ".join(schema.names)
    updates = ", ".join(f"{c} = excluded.{c}" for c in mutable)
    # Within one batch keep the newest copy of each id (later line on a tie); across batches the
    # WHERE clause keeps the stored row if it was retrieved later than the incoming one.
    return (
        f"INSERT INTO {table} SELECT {names} FROM batch "
        f"QUALIFY row_number() OVER (PARTITION BY id ORDER BY coalesce(retrieved_utc, -1) DESC, "
        f"_seq DESC) = 1 "
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
        """Write one batch atomically."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            for table, rows, schema, mutable in (
                ("comments", comments, COMMENT_SCHEMA, MUTABLE_COMMENT_COLUMNS),
                ("posts", posts, POST_SCHEMA, MUTABLE_POST_COLUMNS),
            ):
                if rows.num_rows == 0:
                    continue
                batch = rows.append_column("_seq", pa.array(range(rows.num_rows), type=pa.int64()))
                self.con.register("batch", batch)
                try:
                    self.con.execute(_upsert_sql(table, schema, mutable))
                finally:
                    self.con.unregister("batch")
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def count(self, table: str) -> int:
        if not self.has_table(table):
            return 0
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def has_table(self, table: str) -> bool:
        return bool(
            self.con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
            ).fetchone()[0]
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
