"""What the explorer reads from a store: search hits, thread trees, pairs and TRL rows.

One `Explorer` per process holds one read-only `mining.store.Store` (opened once, on the first
request when a writer held the store at start-up) and one `index.query.ActSearcher` (the hybrid
BM25 + dense act search of `ahf query`, loaded once). A DuckDB connection serves one statement at a
time, so every read takes `Explorer.lock`. The store cannot change while it is open here: DuckDB
allows one writing process or many reading ones, so the summary read at opening stays true.

The TRL rows of a selection are `ahf export`'s: feedback.export's row SQL (`_ROWS_SQL`), its
duplicate rule (`_DEDUP`) and the one turn context (mining.schema.turn_rows_sql), restricted to the
selected turns and to the turns whose text could make one of them a duplicate (`export_rows`).
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from ahf.console import UserError
from mining.schema import CONTEXT_SEPARATOR, turn_rows_sql
from mining.store import Store, StoreError

FORMATS = ("pairs", "pointwise", "sft")
MAX_K = 100  # hits per search
MAX_TEXT = 500  # characters of search text
PAIRS_PER_PAGE = 20
MAX_PAGE = 100_000
MAX_THREAD_NODES = 2_000  # comments drawn on one thread page
EMPTY_DETAILS = {"post_id": None, "votes": None, "depth": None, "act": None, "confidence": None, "tier": None,
                 "adjusted": None, "sentiment": None, "reply_count": None, "pairs": 0}
ID_PATTERN = re.compile(r"[0-9A-Za-z_]{1,40}")  # Reddit's base36 ids (and the check set's prefixed ones)


class BadRequest(UserError):
    """A parameter the page cannot take (HTTP 400)."""


class NotFound(UserError):
    """An id the store does not hold (HTTP 404)."""


class Unavailable(UserError):
    """The store or its indexes cannot answer now (HTTP 503): busy, or a stage not run yet."""


@dataclass
class Summary:
    """What the store holds, read once when it is opened (it cannot change while open)."""

    turns: int = 0
    posts: int = 0
    comments: int = 0
    acts: dict[str, int] = field(default_factory=dict)  # act -> turns
    known_acts: list[str] = field(default_factory=list)  # every act the tagger knew (found or not)
    tiers: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)  # rule -> pairs
    subreddits: dict[str, int] = field(default_factory=dict)  # subreddit -> turns, most first
    tables: set[str] = field(default_factory=set)


def check_id(value: str | None, what: str) -> str:
    if not value or not ID_PATTERN.fullmatch(value):
        raise BadRequest(f"{what} must be a Reddit id (letters, digits, _; at most 40 characters), got {value!r}")
    return value


def _busy(exc: Exception) -> bool:
    return "lock" in str(exc).lower()


class Explorer:
    def __init__(self, store_dir: str | Path, index_dir: str | Path | None = None, export_config=None):
        from ahf.config import load_config
        from feedback.labels import LabelConfig

        self.store_dir = Path(store_dir)
        self.index_dir = Path(index_dir) if index_dir else None
        self.export_config = export_config or load_config(LabelConfig, "labels").export
        self.lock = threading.RLock()
        self._store: Store | None = None
        self._searcher = None
        self._pair_totals: dict[tuple[str, str | None], int] = {}
        self.summary = Summary()
        try:
            self.ensure_open()
        except Unavailable:
            pass  # a writer holds the store: the first request after it finishes opens it

    # ------------------------------------------------------------------ opening

    @contextmanager
    def reading(self) -> Iterator[Store]:
        """The open store, under the lock (opened here the first time it can be)."""
        with self.lock:
            if self._store is None:
                self._open()
            yield self._store

    def ensure_open(self) -> None:
        """Open the store if a writer held it until now; Unavailable while it still does."""
        with self.reading():
            pass

    def _open(self) -> None:
        try:
            store = Store(self.store_dir, read_only=True)
        except StoreError as exc:
            if _busy(exc):
                raise Unavailable(f"the store {self.store_dir} is busy: another process (an `ahf ingest`, "
                                  "`label`, `acts tag`...) is writing it, and DuckDB lets one process write or "
                                  "several read. Reload this page when it has finished.") from exc
            raise
        try:
            self.summary = self._read_summary(store)
            if "acts" in self.summary.tables:
                from index.query import ActSearcher

                self._searcher = ActSearcher(self.store_dir, self.index_dir)
                self.summary.known_acts = list(self._searcher.known_acts)
        except BaseException:
            store.close()
            raise
        self._store = store

    @staticmethod
    def _read_summary(store: Store) -> Summary:
        tables = {t for t in ("posts", "comments", "turns", "acts", "labels", "pairs") if store.has_table(t)}
        if "turns" not in tables:
            raise StoreError(f"the store {store.path} has no `turns` table: run `ahf turns` (or `ahf ingest`) first")
        s = Summary(tables=tables, turns=store.count("turns"), posts=store.count("posts"),
                    comments=store.count("comments"))
        s.subreddits = dict(store.rows("SELECT coalesce(subreddit, ''), count(*) FROM turns GROUP BY 1 ORDER BY 2 DESC, 1"))
        if "acts" in tables:
            s.acts = dict(store.rows("SELECT act, count(*) FROM acts GROUP BY act ORDER BY act"))
        if "labels" in tables:
            s.tiers = dict(store.rows("SELECT tier, count(*) FROM labels WHERE tier IS NOT NULL GROUP BY 1 ORDER BY 1"))
        if "pairs" in tables:
            s.pairs = dict(store.rows("SELECT rule, count(*) FROM pairs GROUP BY rule ORDER BY rule"))
        return s

    @property
    def searcher(self):
        """The ActSearcher of this store (None without acts): `ahf query`'s ranking, loaded once."""
        return self._searcher

    def warm(self) -> None:
        """Load the search engines now (JVM, Lucene, FAISS, the query encoder), not in the first search."""
        with self.reading():
            if self._searcher is not None and self.summary.acts:
                self._searcher.ranked(next(iter(self.summary.acts)), "warm up", k=1)

    def close(self) -> None:
        with self.lock:
            if self._searcher is not None:
                self._searcher.close()
            if self._store is not None:
                self._store.close()
            self._searcher = self._store = None

    # ------------------------------------------------------------------ parameters

    def check_act(self, act: str | None) -> str:
        if "acts" not in self.summary.tables:
            raise Unavailable(f"the store {self.store_dir} has no dialog acts yet: run `ahf index` and "
                              "`ahf acts tag` on it first")
        if act not in self.summary.known_acts:
            what = f"unknown act {act!r}" if act else "an act is required"
            raise BadRequest(f"{what}; the acts of this store: {', '.join(self.summary.known_acts)}")
        return act

    def check_subreddit(self, subreddit: str | None) -> str | None:
        if not subreddit:
            return None
        if subreddit not in self.summary.subreddits:
            raise BadRequest(f"no turn of this store is in the subreddit {subreddit[:100]!r}")
        return subreddit

    def check_rule(self, rule: str | None) -> str:
        if not self.summary.pairs:
            raise Unavailable(f"the store {self.store_dir} has no preference pairs: run `ahf label` on it first")
        if rule not in self.summary.pairs:
            what = f"unknown pair rule {rule!r}" if rule else "a pair rule is required"
            raise BadRequest(f"{what}; the rules of this store: {', '.join(self.summary.pairs)}")
        return rule

    # ------------------------------------------------------------------ search

    def search(self, act: str, text: str | None, k: int, subreddit: str | None) -> list[dict]:
        """`ahf query`'s hits (ActSearcher.query), each with its thread, labels and pair count."""
        with self.reading() as store:
            try:
                hits = [hit.to_dict() for hit in self._searcher.query(act, text, k, subreddit)]
            except UserError as exc:  # e.g. no index built yet
                raise Unavailable(str(exc)) from exc
            details = self._turn_details(store, [h["comment_id"] for h in hits])
        return [{**details[h["comment_id"]], **h} for h in hits]

    def _turn_details(self, store: Store, ids: list[str]) -> dict[str, dict]:
        """{id: its thread, votes, depth, act, labels and pair count} (None where the store has none)."""
        out = {cid: dict(EMPTY_DETAILS) for cid in ids}
        if not ids:
            return out
        sql = self._labelled_turns_sql("t.comment_id IN (SELECT unnest($ids))")
        for row in store.arrow(sql, {"ids": ids}).to_pylist():
            out[row["comment_id"]].update(row)
        for cid, n in self._pair_counts(store, ids).items():
            out[cid]["pairs"] = n
        return out

    def _labelled_turns_sql(self, where: str) -> str:
        """The turns `where` selects, with their act and labels (NULL where the store has none yet).
        The few turns are picked first and acts and labels filtered by them: no hash table over a
        whole table for a page of ten replies."""
        tables = self.summary.tables
        picked = "(SELECT comment_id FROM t)"
        return f"""
            WITH t AS MATERIALIZED (SELECT comment_id, post_id, score AS votes, depth FROM turns t WHERE {where})
            SELECT t.*,
                   {'a.act, a.confidence' if 'acts' in tables else 'NULL AS act, NULL AS confidence'},
                   {'l.tier, l.adjusted, l.reply_sentiment_weighted AS sentiment, l.reply_count'
                    if 'labels' in tables else
                    'NULL AS tier, NULL AS adjusted, NULL AS sentiment, NULL AS reply_count'}
            FROM t
            {f'LEFT JOIN (SELECT * FROM acts WHERE comment_id IN {picked}) a USING (comment_id)'
             if 'acts' in tables else ''}
            {f'LEFT JOIN (SELECT * FROM labels WHERE comment_id IN {picked}) l USING (comment_id)'
             if 'labels' in tables else ''}"""

    def _pair_counts(self, store: Store, ids: list[str]) -> dict[str, int]:
        if "pairs" not in self.summary.tables:
            return {}
        return dict(store.rows("""
            SELECT id, count(*) FROM (SELECT chosen_id AS id FROM pairs UNION ALL SELECT rejected_id FROM pairs)
            WHERE id IN (SELECT unnest($ids)) GROUP BY id""", {"ids": ids}))

    # ------------------------------------------------------------------ threads

    def thread(self, post_id: str) -> dict:
        """The post and its comments as a depth-first list (best score first among siblings), each
        with its turn's act, tier, adjusted score, reply sentiment and pairs."""
        tables = self.summary.tables
        with self.reading() as store:
            post = store.arrow("SELECT id, title, selftext, author, score, created_utc, subreddit FROM posts "
                               "WHERE id = $p", {"p": post_id}).to_pylist() if "posts" in tables else []
            comments = store.arrow("SELECT id, parent_id, author, body, score, created_utc FROM comments "
                                   "WHERE link_id = $link", {"link": f"t3_{post_id}"}).to_pylist()
            turns = store.arrow(self._labelled_turns_sql("t.post_id = $p"), {"p": post_id}).to_pylist()
            pairs = store.arrow("SELECT chosen_id, rejected_id, rule, margin FROM pairs WHERE post_id = $p "
                                "ORDER BY rule, margin DESC, chosen_id, rejected_id",
                                {"p": post_id}).to_pylist() if "pairs" in tables else []
        if not post and not comments:
            raise NotFound(f"no thread {post_id!r} in this store")
        turn_of = {t["comment_id"]: t for t in turns}
        membership: dict[str, list[dict]] = {}
        for p in pairs:
            membership.setdefault(p["chosen_id"], []).append({**p, "role": "chosen", "other": p["rejected_id"]})
            membership.setdefault(p["rejected_id"], []).append({**p, "role": "rejected", "other": p["chosen_id"]})
        nodes = [{**c, "depth": depth, "orphan": orphan, "turn": turn_of.get(c["id"]),
                  "pairs": membership.get(c["id"], [])}
                 for c, depth, orphan in _tree_order(comments, f"t3_{post_id}")]
        return {"post_id": post_id, "post": post[0] if post else None, "nodes": nodes[:MAX_THREAD_NODES],
                "total": len(nodes), "turns": len(turns), "pairs": pairs}

    # ------------------------------------------------------------------ pairs

    def pairs_page(self, rule: str, subreddit: str | None, page: int) -> dict:
        where, params = self._pairs_where(rule, subreddit)
        with self.reading() as store:
            key = (rule, subreddit)
            if key not in self._pair_totals:  # the store cannot change while open
                self._pair_totals[key] = store.value(f"SELECT count(*) FROM pairs p {where}", params)
            total = self._pair_totals[key]
            rows = store.arrow(f"""
                SELECT p.post_id, p.chosen_id, p.rejected_id, p.rule, p.margin, p.chosen_score, p.rejected_score
                FROM pairs p {where} ORDER BY p.margin DESC, p.chosen_id, p.rejected_id
                LIMIT {PAIRS_PER_PAGE} OFFSET $offset""", params | {"offset": (page - 1) * PAIRS_PER_PAGE}).to_pylist()
            ids = [r["chosen_id"] for r in rows] + [r["rejected_id"] for r in rows]
            turns = {r["comment_id"]: r for r in store.arrow(
                "SELECT comment_id, subreddit, reply FROM turns WHERE comment_id IN (SELECT unnest($ids))",
                {"ids": ids}).to_pylist()} if ids else {}
            contexts = self._contexts(store, [r["chosen_id"] for r in rows])
        for r in rows:
            chosen, rejected = turns.get(r["chosen_id"], {}), turns.get(r["rejected_id"], {})
            r.update(subreddit=chosen.get("subreddit"), chosen=chosen.get("reply", ""),
                     rejected=rejected.get("reply", ""), context=contexts.get(r["chosen_id"], ""))
        return {"rule": rule, "subreddit": subreddit, "page": page, "total": total, "rows": rows,
                "pages": max(1, -(-total // PAIRS_PER_PAGE))}

    @staticmethod
    def _pairs_where(rule: str, subreddit: str | None) -> tuple[str, dict]:
        """The pairs of `rule` (whose chosen reply is in `subreddit`: siblings share it), as SQL on `pairs p`."""
        if subreddit is None:
            return "WHERE p.rule = $rule", {"rule": rule}
        return ("WHERE p.rule = $rule AND p.chosen_id IN (SELECT comment_id FROM turns WHERE subreddit = $sub)",
                {"rule": rule, "sub": subreddit})

    def pair(self, chosen_id: str, rejected_id: str) -> dict:
        """One pair (under every rule that made it): the shared prompt and both replies with their labels."""
        if "pairs" not in self.summary.tables:
            raise Unavailable(f"the store {self.store_dir} has no preference pairs: run `ahf label` on it first")
        with self.reading() as store:
            rules = store.arrow("SELECT post_id, rule, margin, chosen_score, rejected_score FROM pairs "
                                "WHERE chosen_id = $c AND rejected_id = $r ORDER BY rule",
                                {"c": chosen_id, "r": rejected_id}).to_pylist()
            if not rules:
                raise NotFound(f"no pair with chosen {chosen_id!r} and rejected {rejected_id!r} in this store")
            texts = dict(store.rows("SELECT comment_id, reply FROM turns WHERE comment_id IN ($c, $r)",
                                    {"c": chosen_id, "r": rejected_id}))
            details = self._turn_details(store, [chosen_id, rejected_id])
            context = self._contexts(store, [chosen_id]).get(chosen_id, "")
        side = {cid: {**details[cid], "id": cid, "reply": texts.get(cid, "")} for cid in (chosen_id, rejected_id)}
        return {"post_id": rules[0]["post_id"], "rules": rules, "context": context,
                "chosen": side[chosen_id], "rejected": side[rejected_id]}

    @staticmethod
    def _contexts(store: Store, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = store.turn_rows("WHERE comment_id IN (SELECT unnest($ids))", {"ids": ids}, columns="t.comment_id")
        return dict(zip(rows["comment_id"].to_pylist(), rows["context"].to_pylist()))

    # ------------------------------------------------------------------ selections

    def search_ids(self, act: str, text: str | None, k: int, subreddit: str | None) -> list[str]:
        with self.reading():
            try:
                return [cid for cid, _ in self._searcher.ranked(act, text, k, subreddit)]
            except UserError as exc:
                raise Unavailable(str(exc)) from exc

    def thread_ids(self, post_id: str) -> list[str]:
        with self.reading() as store:
            ids = [r[0] for r in store.rows("SELECT comment_id FROM turns WHERE post_id = $p", {"p": post_id})]
            if not ids and not store.value("SELECT count(*) FROM comments WHERE link_id = $l", {"l": f"t3_{post_id}"}):
                raise NotFound(f"no thread {post_id!r} in this store")
        return ids

    def pair_ids(self, rule: str, subreddit: str | None) -> list[str]:
        """The chosen turns of the pairs of `rule` (in `subreddit`): with `rules=[rule]`, the pairs
        format of these turns is exactly those pairs (siblings share their subreddit)."""
        where, params = self._pairs_where(rule, subreddit)
        with self.reading() as store:
            return [r[0] for r in store.rows(f"SELECT DISTINCT p.chosen_id FROM pairs p {where}", params)]

    def export_rows(self, fmt: str, ids: list[str], rules: list[str] | None = None) -> tuple[IO[bytes], int]:
        """The JSONL rows `ahf export --format FMT` writes for the turns `ids` (for `pairs`: the pairs in
        which one of them is the chosen or the rejected reply, of `rules` when given), in the export's
        order, without the split column: a temporary file (at its start) and its row count.

        A row the export would drop stays dropped: an empty prompt, a pair of identical texts, or a
        duplicate of another row of the store (same prompt and texts; the export's tie order decides
        which copy stays). Duplicates share their reply text (pairs: their chosen text), so the
        rows are built for the selected turns and for every turn with the same text, and the
        export's duplicate rule runs over those."""
        from feedback.export import _DEDUP, _ROWS_SQL

        if fmt not in FORMATS:
            raise BadRequest(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        missing = {"pairs": ("labels", "pairs")}.get(fmt, ("labels",))
        if not set(missing) <= self.summary.tables:
            raise Unavailable(f"the store {self.store_dir} has no labels: run `ahf label` on it first")
        config = self.export_config
        params: dict = {"ids": list(ids)}
        selected = "(p.chosen_id IN (SELECT unnest($ids)) OR p.rejected_id IN (SELECT unnest($ids)))"
        if fmt == "pairs":
            # the rows are made, and deduplicated, over the export's rules; `rules` only picks among them
            params["rules"] = list(config.rules)
            params["shown"] = [r for r in config.rules if rules is None or r in rules]
            same_text = f"""SELECT c.reply FROM pairs p JOIN turns c ON c.comment_id = p.chosen_id
                            WHERE {selected} AND list_contains($shown, p.rule)"""
            kept = f"WHERE {selected.replace('p.', '')} AND list_contains($shown, rule)"
            order = "post_id, chosen_id, rejected_id, rule"
        else:
            params["tiers"] = list(config.tiers if fmt == "pointwise" else config.sft_tiers)
            same_text = "SELECT reply FROM turns WHERE comment_id IN (SELECT unnest($ids))"
            kept, order = "WHERE comment_id IN (SELECT unnest($ids))", "post_id, comment_id"
        key, tie_order = _DEDUP[fmt]
        context = turn_rows_sql("WHERE comment_id IN (SELECT unnest($peers))", columns="t.comment_id")
        rows = _ROWS_SQL[fmt].format(act_turns="AND t.comment_id IN (SELECT unnest($peers))",
                                     act_pairs="AND p.chosen_id IN (SELECT unnest($peers))")
        sql = f"""
            WITH export_context AS (SELECT comment_id, context FROM ({context})),
            candidates AS ({rows}),
            deduplicated AS (
                SELECT * FROM candidates
                WHERE prompt <> $sep {"AND chosen <> rejected" if fmt == "pairs" else ""}
                QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {tie_order}) = 1)
            SELECT * FROM deduplicated {kept} ORDER BY {order}"""
        out = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        count = 0
        with self.reading() as store:
            if ids:
                peers = [r[0] for r in store.rows(f"SELECT comment_id FROM turns WHERE reply IN ({same_text})",
                                                  {k: v for k, v in params.items() if k in ("ids", "shown")})]
                params |= {"peers": peers, "sep": CONTEXT_SEPARATOR}
                for batch in store.reader(sql, params, batch_rows=10_000):
                    for row in batch.to_pylist():
                        out.write(orjson.dumps(row) + b"\n")
                        count += 1
        out.seek(0)
        return out, count


def _tree_order(comments: list[dict], root: str) -> Iterator[tuple[dict, int, bool]]:
    """(comment, depth from 0, orphan) depth first from `root`, siblings by score (highest first),
    then time and id; then the comments whose parent is not in the thread (orphans), each with its
    replies; then any left (a parent cycle in hostile data), flat."""
    children: dict[str, list[dict]] = {}
    for c in comments:
        children.setdefault(c["parent_id"], []).append(c)
    for siblings in children.values():
        siblings.sort(key=lambda c: (-(c["score"] or 0), c["created_utc"] or 0, c["id"]))
    ids = {f"t1_{c['id']}" for c in comments}
    seen: set[str] = set()

    def walk(start: list[dict], orphan: bool) -> Iterator[tuple[dict, int, bool]]:
        stack = [(c, 0) for c in reversed(start)]
        while stack:
            c, depth = stack.pop()
            if c["id"] in seen:
                continue
            seen.add(c["id"])
            yield c, depth, orphan
            stack.extend((child, depth + 1) for child in reversed(children.get(f"t1_{c['id']}", [])))

    yield from walk(children.get(root, []), False)
    yield from walk([c for c in comments if c["parent_id"] != root and c["parent_id"] not in ids], True)
    yield from ((c, 0, True) for c in comments if c["id"] not in seen)
