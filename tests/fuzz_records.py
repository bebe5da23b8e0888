"""Mutated real Reddit records and the checks every stage must pass on them (issue 12).

Shared by tests/test_fuzz.py (hypothesis, a bounded number of examples in CI) and bench/fuzz.py
(100k+ records, reports what it finds). A case is a list of real records, some mutated (types,
ranges, unicode, surrogates, control bytes, truncation, duplicate keys, NaN, deep nesting), written
in one of the formats `ahf ingest` reads; `check_case` ingests it into a fresh store and runs every
later stage, asserting: no traceback, exact accounting, skip reasons from the fixed set, a store
that turns, label and export still process.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
import time
from pathlib import Path

import orjson
import zstandard

FORMATS = ("ndjson", "zst", "gz", "bz2", "xz", "api_listing", "bigquery", "zst_truncated")
FIELDS = ("id", "link_id", "parent_id", "author", "body", "score", "created_utc", "subreddit", "distinguished",
          "stickied", "retrieved_on", "retrieved_utc", "title", "selftext", "over_18", "num_comments",
          "link_flair_text", "url", "name", "_meta", "kind", "replies")
_NOW = int(time.time())
INTS = (0, -1, 1, 7, 2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64, 10**30,
        1_117_583_999, 1_117_584_000, _NOW + 30 * 86_400, 1_134_365_188)
TEXTS = ("", " ", "[deleted]", "[removed]", "t1_", "t3_", "t1_abc", "t3_x", "\x00", "a\x1fb", "\u202eevil",
         "😀" * 50, "x" * 70_000, "NaN", "1e400", "-9223372036854775809", "true", "null", "[1]", '{"a": 1}',
         "\\ud800", "AutoModerator", "1134365188.5")
# what a skip reason may be: a fixed vocabulary, whatever the input says
REASON = re.compile(r"bad_json|not_an_object|missing_id|unknown_kind|more_stub|bad_listing"
                    r"|(missing_field|bad_type|bad_value):[a-z_0-9]+|unsupported_kind:[A-Za-z0-9]+")


def real_records(shared_data: Path, per_file: int = 150) -> list[dict]:
    """The first records of each real dump (comments, posts, drifted schemas) and the BigQuery export."""
    records = []
    for path in sorted((shared_data / "pushshift").rglob("*.zst")):
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open(path, "rb"))
        head = reader.read(4 << 20).split(b"\n")[:per_file]
        records += [orjson.loads(line) for line in head if line.strip().startswith(b"{")]
    bigquery = json.loads((shared_data / "bigquery" / "r_MachineLearning_82ymmx.json").read_text())
    records += [r for r in bigquery if isinstance(r, dict)][:per_file]
    return records


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(INTS)
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return rng.choice((float("nan"), float("inf"), -float("inf"), -0.0, 1e308, 1.5, 1_134_365_188.9))
    if kind == 3:
        return rng.choice(TEXTS)
    if kind == 4:
        return "".join(chr(rng.choice((rng.randint(0, 0x7f), rng.randint(0x80, 0xd7ff), rng.randint(0xe000, 0x10ffff))))
                       for _ in range(rng.randint(0, 30)))
    if kind == 5:
        return rng.choice((True, False, None))
    if kind == 6 and depth < 3:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7 and depth < 3:
        return {rng.choice(FIELDS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(INTS + TEXTS)


def mutate(record: dict, rng: random.Random) -> bytes:
    """One NDJSON line from `record` with 1-3 mutations of its fields or of its bytes."""
    record = dict(record)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS + tuple(record))
        action = rng.randrange(3)
        if action == 0:
            record[field] = random_value(rng)
        elif action == 1:
            record.pop(field, None)
        else:
            record[rng.choice(TEXTS[:12])] = record.pop(field, None)
    line = json.dumps(record, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
    return _mutate_bytes(line, rng) if rng.random() < 0.3 else line


def _mutate_bytes(line: bytes, rng: random.Random) -> bytes:
    action = rng.randrange(6)
    if action == 0:  # cut short
        return line[: rng.randint(0, len(line))]
    if action == 1:  # stray bytes: invalid UTF-8, NUL, escape characters
        at = rng.randint(0, len(line))
        return line[:at] + rng.choice((b"\xff", b"\x00", b"\x1b[2J", b"\xc3", b"\xed\xa0\x80")) + line[at:]
    if action == 2 and line.endswith(b"}"):  # a duplicate key
        return line[:-1] + b', "score": "twice", "created_utc": 1}'
    if action == 3:  # a lone surrogate escape
        return line.replace(b'"', b'"\\udc00', 1)
    if action == 4:  # nesting deeper than any parser allows
        return b'{"a":' * 2000 + b"1" + b"}" * 2000
    return b"\xef\xbb\xbf" + line  # a byte-order mark


def make_case(records: list[dict], rng: random.Random, n: int, fmt: str) -> tuple[bytes, str, int]:
    """(file bytes, file name, expected records_read or -1 when only the identity can be checked)."""
    chosen = [rng.choice(records) for _ in range(n)]
    if fmt == "api_listing":  # a Reddit API listing: records wrapped as things, some mutated in place
        things = [{"kind": rng.choice(("t1", "t3", "t5", "more", "weird")), "data": _mutated_object(r, rng)}
                  for r in chosen]
        return _json_bytes({"kind": "Listing", "data": {"children": things}}), "listing.json", -1
    if fmt == "bigquery":  # BigQuery's JSON: an array of records whose values are all strings
        rows = [{k: None if v is None else str(v) for k, v in r.items()} for r in chosen]
        for row in rows:
            if rng.random() < 0.3:
                row[rng.choice(FIELDS)] = str(random_value(rng))
        return _json_bytes(rows), "bigquery.json", n
    # NDJSON: the first lines clean or not, mutated lines anywhere; blank lines are not records
    lines = [mutate(r, rng) if rng.random() < 0.5 else orjson.dumps(r) for r in chosen]
    data = b"".join(line + b"\n" for line in lines)
    expected = -1 if fmt == "zst_truncated" else sum(1 for line in data.split(b"\n") if line.strip())
    compress = {"zst": zstandard.ZstdCompressor().compress, "zst_truncated": zstandard.ZstdCompressor().compress,
                "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}.get(fmt)
    if compress is None:
        return data, "records.ndjson", expected
    packed = compress(data)
    if fmt == "zst_truncated":
        packed = packed[: rng.randint(1, max(1, len(packed) - 1))]
    return packed, f"records.ndjson.{fmt.split('_')[0]}", expected


def _json_bytes(value) -> bytes:
    """A document as a hostile writer may make it: lone surrogates as escapes, NaN as a bare word."""
    return json.dumps(value, allow_nan=True).encode()


def _mutated_object(record: dict, rng: random.Random):
    """`record`, or (30 %) a mutation of it that still decodes to JSON (any value, not only objects)."""
    if rng.random() >= 0.3:
        return record
    try:
        return json.loads(mutate(record, rng))
    except (ValueError, RecursionError):
        return record


def check_case(data: bytes, name: str, expected: int, work: Path) -> dict:
    """Ingest the case into a fresh store under `work` and run every later stage; raises AssertionError
    (or the stage's exception) on a broken promise. Returns the ingest's skip counts."""
    from feedback.export import export_dataset
    from feedback.labels import label_store
    from mining.ingest import ingest
    from mining.stats import store_stats

    path = work / name
    path.write_bytes(data)
    store = work / "store"
    report = ingest([path], store)  # turns rebuilt on the same store
    (file,) = report.files
    assert file.records_read == file.ingested + sum(file.skipped.values()), file
    if expected >= 0:
        assert file.records_read == expected, (file.records_read, expected)
    assert all(REASON.fullmatch(reason) for reason in file.skipped), dict(file.skipped)
    assert file.error is None or name.endswith(".zst") and "zstd" in file.error, file.error
    turns = report.turns
    assert turns.comments == turns.turns + sum(turns.filtered.values())
    label_store(store)
    for fmt in ("pairs", "pointwise", "sft"):
        export_dataset(store, fmt, work / f"export-{fmt}", force=True)
    store_stats(store)
    return dict(file.skipped)
