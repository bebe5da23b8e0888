"""The store as Delta Lake tables: partitioned Parquet with atomic commits, for many readers and writers.

The same interface as the DuckDB-file store (mining.store.Store, which this class extends): every
stage's SQL runs unchanged on an in-memory DuckDB connection whose views read the tables' Parquet
files (DuckDB's own Parquet reader; no DuckDB extension is needed). Layout of a store directory:

    delta/<table>/   one Delta table per table of mining.schema (comments, posts, turns, acts, ...)
    delta/meta/      key/value rows (JSON values): schema version, the configs and the table versions
                     the derived tables were published at

Why Delta Lake (the `deltalake` package, delta-rs): each write is one commit in the table's log, so
a writer killed at any moment leaves the last committed version readable (files of an unfinished
write are never listed); readers and writers of different processes or machines need no lock;
files written by many workers are committed in one transaction; any Parquet tool reads the data.

Rules kept from the DuckDB store: one row per Reddit id, the newest `retrieved_utc` winning (ties to
the later write; a Delta MERGE of each batch's winners), mutable columns updated, the rest as
created. Derived tables are replaced together: each new table is written as a new version, then one
commit of `meta` publishes all their versions at once; readers read the versions `meta` names, so a
failure between the two keeps the previous tables. `comments_version` is the raw tables' versions.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mining.schema import COMMENT_SCHEMA, MUTABLE_COMMENT_COLUMNS, MUTABLE_POST_COLUMNS, POST_SCHEMA, SCHEMAS
from mining.store import COMMENTS_VERSION, ROW_GROUP_ROWS, SCHEMA_VERSION, Store, StoreError

DELTA_DIR = "delta"
RAW = {"comments": (COMMENT_SCHEMA, MUTABLE_COMMENT_COLUMNS), "posts": (POST_SCHEMA, MUTABLE_POST_COLUMNS)}
META_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])
_PUBLISHED = "published_versions"  # meta key: {table: version} of the derived tables readers see


def _writer_properties():
    """Row groups of DuckDB's size: DuckDB reads a Parquet file's row groups in parallel, one thread each,
    and delta-rs would otherwise write a table of 865k turns as one row group (one thread: measured label
    at 0.59x of the DuckDB file at 1M comments)."""
    from deltalake import WriterProperties

    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS)


def write_table_file(table_dir: str | Path, rows: pa.Table) -> dict | None:
    """Write `rows` as one new Parquet file in a Delta table's folder, not yet committed (no reader lists
    it until `DeltaStore.commit_files` does): what a Ray ingest task writes, so that the driver commits
    files instead of re-encoding every row. Returns the file's add action (path relative to the table,
    size, time, statistics); None for no rows."""
    if not rows.num_rows:
        return None
    name = f"part-ahf-{uuid.uuid4().hex}.snappy.parquet"
    path = Path(table_dir) / name
    pq.write_table(rows, path, row_group_size=ROW_GROUP_ROWS, compression="snappy")
    written = path.stat()
    return {"path": name, "size": written.st_size, "partition_values": {},
            "modification_time": int(written.st_mtime * 1000), "data_change": True,
            "stats": json.dumps(_file_stats(rows))}


def _file_stats(rows: pa.Table) -> dict:
    """Delta's per-file statistics: row and null counts of every column, min / max of the numeric ones
    (strings are left out: Delta truncates them, and nothing here prunes by them)."""
    stats = {"numRecords": rows.num_rows, "minValues": {}, "maxValues": {},
             "nullCount": {name: rows.column(name).null_count for name in rows.column_names}}
    for name in rows.column_names:
        column = rows.column(name)
        if pa.types.is_integer(column.type) and column.null_count < rows.num_rows:
            bounds = pc.min_max(column)
            stats["minValues"][name], stats["maxValues"][name] = bounds["min"].as_py(), bounds["max"].as_py()
    return stats


def is_delta_store(path: str | Path) -> bool:
    return (Path(path) / DELTA_DIR / "comments" / "_delta_log").is_dir()


class DeltaStore(Store):
    """A store directory of Delta tables; see the module docstring. Open it through `Store(...)`."""

    format = "delta"

    def __init__(self, path: str | Path, read_only: bool = False, create: bool = True):
        self.path = Path(path)
        if not is_delta_store(self.path) and (read_only or not create):
            raise StoreError(f"no store at {self.path}; run `ahf ingest` first")
        self.read_only = read_only
        if not is_delta_store(self.path):
            self._create()
        self._connect()

    # ------------------------------------------------------------------ tables and views

    def _table_dir(self, table: str) -> Path:
        return self.path / DELTA_DIR / table

    def task_table_dirs(self) -> dict[str, str]:
        """The folders of the raw tables, where Ray ingest tasks write their files (`write_table_file`)."""
        return {table: str(self._table_dir(table)) for table in RAW}

    def _create(self) -> None:
        from deltalake import DeltaTable

        for table, (schema, _) in RAW.items():
            DeltaTable.create(str(self._table_dir(table)), schema=schema, mode="ignore")
        self._write_meta_rows({"schema_version": SCHEMA_VERSION})

    def _connect(self) -> None:
        self.con = duckdb.connect()
        self.con.execute("SET enable_progress_bar = false")
        self._follow_affinity()
        # Parquet footers read once per file: Delta never rewrites a file in place, so the cache cannot go stale
        self.con.execute("SET enable_object_cache = true")
        self._refresh()

    def _refresh(self, tables: list[str] | None = None) -> None:
        """(Re)point each table's view at its current files: the raw tables' latest version, the derived
        tables' published one."""
        published = self._meta_values().get(_PUBLISHED, {})
        root = self.path / DELTA_DIR
        names = tables or sorted(p.name for p in root.iterdir() if (p / "_delta_log").is_dir() and p.name != "meta")
        for table in names:
            if table not in RAW and table not in published:
                continue  # written but never published (a run that failed before its meta commit)
            self._view(table, published.get(table))

    def _view(self, table: str, version: int | None) -> None:
        from deltalake import DeltaTable

        delta = DeltaTable(str(self._table_dir(table)), version=version)
        files = delta.file_uris()
        if files:
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            select = f"SELECT * FROM read_parquet([{listed}])"
        else:  # an empty table: its columns, no rows
            schema = SCHEMAS.get(table) or pa.schema(delta.schema().to_arrow())
            self.con.register(f"_empty_{table}", pa.Table.from_batches([], schema=pa.schema(schema)))
            select = f"SELECT * FROM _empty_{table}"
        self.con.execute(f"CREATE OR REPLACE VIEW {table} AS {select}")

    # ------------------------------------------------------------------ meta

    def _meta_values(self) -> dict[str, Any]:
        from deltalake import DeltaTable

        path = self._table_dir("meta")
        if not (path / "_delta_log").is_dir():
            return {}
        rows = DeltaTable(str(path)).to_pyarrow_table().to_pylist()
        return {row["key"]: json.loads(row["value"]) for row in rows}

    def _write_meta_rows(self, values: dict[str, Any]) -> None:
        """One commit replacing the meta table: the new values merged into the current ones."""
        from deltalake import write_deltalake

        merged = self._meta_values() | values
        table = pa.table({"key": list(merged), "value": [json.dumps(v) for v in merged.values()]}, schema=META_SCHEMA)
        write_deltalake(str(self._table_dir("meta")), table, mode="overwrite")

    def meta(self, key: str) -> Any:
        if key == COMMENTS_VERSION:  # the raw tables' versions: any write to them changes it
            from deltalake import DeltaTable

            return ".".join(str(DeltaTable(str(self._table_dir(t))).version()) for t in RAW)
        return self._meta_values().get(key)

    # ------------------------------------------------------------------ writes

    def upsert(self, comments: pa.Table, posts: pa.Table) -> None:
        """Each kind's batch in one commit: appended when all its ids are new, else a MERGE of the
        batch's newest copy of each id into the table (mutable columns when at least as new)."""
        for table, rows in (("comments", comments), ("posts", posts)):
            self._upsert_table(table, rows)

    def _upsert_table(self, table: str, rows: pa.Table) -> None:
        from deltalake import DeltaTable, write_deltalake

        if not rows.num_rows:
            return
        schema, mutable = RAW[table]
        path = str(self._table_dir(table))
        if not self._needs_merge(table, rows):
            write_deltalake(path, rows, mode="append", writer_properties=_writer_properties())
            self._refresh([table])
            return
        winners = self._winners(rows, schema)
        updates = {c: f"s.{c}" for c in mutable}
        (DeltaTable(path).merge(source=winners, predicate="t.id = s.id", source_alias="s", target_alias="t",
                                writer_properties=_writer_properties())
         .when_matched_update(updates=updates,
                              predicate="coalesce(s.retrieved_utc, -1) >= coalesce(t.retrieved_utc, -1)")
         .when_not_matched_insert_all().execute())
        self._refresh([table])  # the next batch's check must see this one's rows

    def commit_files(self, batches: list[tuple[dict | None, dict | None]]) -> dict[str, str]:
        """Take the files one ingest task wrote into the raw tables' folders (`write_table_file`; one
        (comments, posts) pair per batch, in the input's order). A table's files are committed as they
        are, in one transaction, when none of their ids repeats or is stored already (a dump read for
        the first time); otherwise their batches are upserted one by one, as `upsert` takes them (newest
        retrieval wins, ties to the later batch), and the files are deleted: never committed, never read.
        Returns how each table took them: `committed` or `merged`."""
        from deltalake import DeltaTable
        from deltalake.transaction import AddAction

        how = {}
        for index, table in enumerate(RAW):
            actions = [batch[index] for batch in batches if batch[index]]
            if not actions:
                continue
            folder = self._table_dir(table)
            paths = [folder / action["path"] for action in actions]
            if self._files_need_merge(table, paths, sum(json.loads(a["stats"])["numRecords"] for a in actions)):
                for path in paths:
                    self._upsert_table(table, pq.read_table(path))
                    path.unlink()
                how[table] = "merged"
            else:
                DeltaTable(str(folder)).create_write_transaction([AddAction(**a) for a in actions], mode="append",
                                                                 schema=RAW[table][0])
                how[table] = "committed"
                self._refresh([table])
        return how

    def _files_need_merge(self, table: str, paths: list[Path], rows: int) -> bool:
        """`_needs_merge` for rows still in (uncommitted) Parquet files."""
        listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
        repeated, stored = self.con.execute(
            f"""SELECT (SELECT count(DISTINCT id) FROM read_parquet([{listed}])) < {int(rows)},
                       EXISTS (SELECT 1 FROM {table} WHERE id IN (SELECT id FROM read_parquet([{listed}])))"""
        ).fetchall()[0]
        return repeated or stored

    def _winners(self, rows: pa.Table, schema: pa.Schema) -> pa.Table:
        """The newest copy of each id in the batch (the later line on a tie), as the DuckDB store keeps it."""
        numbered = rows.append_column("_seq", pa.array(range(rows.num_rows), type=pa.int64()))
        with self.registered("_batch", numbered):
            return self.arrow(f"SELECT {', '.join(schema.names)} FROM _batch QUALIFY row_number() OVER "
                              "(PARTITION BY id ORDER BY coalesce(retrieved_utc, -1) DESC, _seq DESC) = 1")

    def replace_tables(self, sources: dict[str, str | tuple[str, Any] | pa.Table],
                       meta: dict[str, Any] | None = None) -> None:
        """Write each table as a new version (its declared schema), then publish all of them, with the
        `meta` entries, in one commit of the meta table."""
        from deltalake import DeltaTable, write_deltalake

        versions = {}
        for name, source in sources.items():
            data = self._materialise(name, source)
            path = str(self._table_dir(name))
            write_deltalake(path, data, mode="overwrite", schema_mode="overwrite", writer_properties=_writer_properties())
            versions[name] = DeltaTable(path).version()
        published = self._meta_values().get(_PUBLISHED, {}) | versions
        self._write_meta_rows({**(meta or {}), _PUBLISHED: published})
        self._refresh(list(versions))

    def _materialise(self, name: str, source) -> pa.RecordBatchReader:
        """The new rows as a stream of batches in the table's declared schema (a wrong column is an
        error here), so that a large table never sits in memory whole."""
        if isinstance(source, pa.Table):
            reader = source.to_reader()
        else:
            select, params = source if isinstance(source, tuple) else (source, None)
            reader = self.con.sql(select, params=params).to_arrow_reader(100_000)
        schema = SCHEMAS.get(name)
        if schema is None:
            return reader
        missing = set(schema.names) - set(reader.schema.names)
        if missing:
            raise StoreError(f"{name}: the new rows lack the columns {sorted(missing)}")
        return pa.RecordBatchReader.from_batches(schema, (batch.select(schema.names).cast(schema) for batch in reader))

    @contextmanager
    def partitioned(self, tables: tuple[str, ...], part: int, parts: int, copy: bool = False,
                    joined: tuple[str, ...] = ()):
        """As the DuckDB store's (the rows of the threads of partition `part`), `joined` tables narrowed too: a
        partition then reads only its threads' files' rows of them (label's replies join on `comments`: 3.24 ->
        2.67 s, 4 partitions at 1M comments), not every row from Parquet. With `copy` each table is
        read from its Parquet files once, into a temp table, also when there is one partition: for SQL that
        reads a table many times (the tree walk reads `comments` seven times), as DuckDB scans its own
        tables faster than Parquet files. Measured at 1M comments: turns 7.0 -> 6.0 s with the copy; label
        and export, which read each table once or twice, were slower with it (2.8 -> 3.0 s, 1.9-2.6 -> 3.0 s)."""
        tables = tables + joined
        if not copy:
            with super().partitioned(tables, part, parts):
                yield
            return
        from mining.schema import THREAD_KEYS

        catalog = self.value("SELECT current_database()")
        for table in tables:
            where = f" WHERE hash({THREAD_KEYS[table]}) % {int(parts)} = {int(part)}" if parts > 1 else ""
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {catalog}.main.{table}{where}")
        try:
            yield
        finally:
            for table in tables:
                self.con.execute(f"DROP TABLE IF EXISTS temp.main.{table}")

    @contextmanager
    def released(self, engine_name: str):
        """Nothing to release: Delta tables take any number of readers beside a writer."""
        yield

    def close(self) -> None:
        self.con.close()


def migrate_to_delta(store_dir: str | Path) -> dict:
    """Copy a DuckDB-file store (schema 2, or 1) into Delta tables beside it, then switch the store to
    them: `ahf.duckdb` is kept as `ahf.duckdb.migrated` (delete it when satisfied). Returns the rows
    copied per table; the copy is checked row count by row count before the switch."""
    import shutil

    from deltalake import DeltaTable, write_deltalake

    from mining.store import DB_NAME

    store_dir = Path(store_dir)
    if is_delta_store(store_dir):
        raise StoreError(f"{store_dir} is already a Delta store")
    if not (store_dir / DB_NAME).exists():
        raise StoreError(f"no DuckDB store at {store_dir} (expected {store_dir / DB_NAME})")
    started = time.perf_counter()
    staging = store_dir / f"{DELTA_DIR}.migrating"  # renamed to `delta` only when the copy is complete
    shutil.rmtree(staging, ignore_errors=True)
    counts: dict[str, int] = {}
    con = duckdb.connect(str(store_dir / DB_NAME), read_only=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()]
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        for table in tables:
            if table == "meta":
                continue
            # streamed batch by batch: a store larger than memory migrates too
            reader = con.sql(f"SELECT * FROM {table}").to_arrow_reader(100_000)
            counts[table] = 0

            def batches(reader=reader, table=table):
                for batch in reader:
                    if table in SCHEMAS:
                        batch = batch.select(SCHEMAS[table].names).cast(SCHEMAS[table])
                    counts[table] += batch.num_rows
                    yield batch

            schema = SCHEMAS[table] if table in SCHEMAS else reader.schema
            write_deltalake(str(staging / table), pa.RecordBatchReader.from_batches(schema, batches()),
                            mode="overwrite", writer_properties=_writer_properties())
    finally:
        con.close()
    values = {k: json.loads(v) if _is_json(v) else v for k, v in meta.items()}
    values[_PUBLISHED] = {t: 0 for t in counts if t not in RAW}
    rows = pa.table({"key": list(values), "value": [json.dumps(v) for v in values.values()]}, schema=META_SCHEMA)
    write_deltalake(str(staging / "meta"), rows, mode="overwrite")
    copied = {t: DeltaTable(str(staging / t)).count() for t in counts}
    if copied != counts:
        raise StoreError(f"the Delta copy has {copied} rows, the DuckDB store {counts}; the DuckDB file is untouched")
    staging.rename(store_dir / DELTA_DIR)
    (store_dir / DB_NAME).rename(store_dir / f"{DB_NAME}.migrated")
    wal = store_dir / f"{DB_NAME}.wal"
    if wal.exists():
        wal.rename(store_dir / f"{DB_NAME}.wal.migrated")
    return {"store": str(store_dir), "format": "delta", "tables": counts,
            "seconds": round(time.perf_counter() - started, 3)}


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
        return True
    except ValueError:
        return False
