"""Report sections drawn from a store: corpus, dialog acts, votes, reply sentiment, preference pairs.

Every read goes through `mining.store.Store` (SQL over the declared tables with `rows` / `value`, turns
with their dialog context through `turn_rows`, `has_table`, `meta`), so the sections follow the store's
interface whatever its internals. Aggregates, bins, quantiles and rank correlations run inside DuckDB and
point clouds are sampled, so a store of millions of turns gives a report of the same size.
"""

from __future__ import annotations

from pathlib import Path

from ahf.report import figures as F
from ahf.report.page import Example, Figure, Section, clip
from mining.store import Store, StoreError

TOP_SUBREDDITS = 12  # subreddits shown by name in per-subreddit figures (the largest)
SAMPLE_POINTS = 4_000  # points of a scatter plot (a seeded reservoir sample beyond that)
EXAMPLES_PER_GROUP = 3
TIERS = ("good", "ok", "bad")
CONTEXT_CHARS, REPLY_CHARS = 420, 700
IDS = "(SELECT unnest(?::VARCHAR[]))"  # a list parameter as a set of ids, for `IN`


def store_sections(path: str | Path) -> list[Section]:
    """The five store sections; a section whose table is missing says what to run to fill it."""
    from mining.stats import store_stats

    try:
        stats = store_stats(path)
        store = Store(path, read_only=True)
    except StoreError as exc:
        return [Section("corpus", "Corpus", "What the store holds.", missing=str(exc))]
    with store:
        sections = [corpus(store, stats)]
        for id_, title, lead, table, run, draw in DRAWN_FROM_TABLES:
            section = Section(id_, title, lead)
            if store.has_table(table):
                draw(store, section)
            else:
                section.missing = f"The store has no `{table}` table: run {run} to fill it, then write the report " \
                                  "again."
            sections.append(section)
    return sections


# ----------------------------------------------------------------------------- helpers

def _rank(column: str) -> str:
    """The average rank of `column` among the rows (ties share the mean of their ranks), as Spearman's ρ wants."""
    return f"(rank() OVER (ORDER BY {column}) + (count(*) OVER (PARTITION BY {column}) - 1) / 2.0)"


def _spearman(store: Store, source: str, a: str, b: str) -> float | None:
    """Spearman's ρ of columns `a` and `b` over the rows of `source` (a SELECT) that have both."""
    return store.value(f"SELECT corr(ra, rb) FROM (SELECT {_rank(a)} AS ra, {_rank(b)} AS rb FROM ({source}) "
                       f"WHERE {a} IS NOT NULL AND {b} IS NOT NULL)")


def _binned(store: Store, source: str, column: str, lo: float, hi: float, bins: int, params=None,
            group: str = "''") -> tuple[list[float], dict[str, list[int]]]:
    """Histogram counts of `column` over `source` (a SELECT) in `bins` equal bins on [lo, hi] (values
    outside go to the end bins), per `group`; computed in the store. Returns (edges, {group: counts})."""
    width = (hi - lo) / bins or 1.0
    rows = store.rows(f"""SELECT {group} AS g, least(greatest(floor(({column} - {lo}) / {width}), 0), {bins - 1})::INT,
                                 count(*) FROM ({source}) WHERE {column} IS NOT NULL GROUP BY ALL""", params)
    out: dict[str, list[int]] = {}
    for g, b, n in rows:
        out.setdefault(str(g), [0] * bins)[b] = n
    return [lo + i * width for i in range(bins + 1)], out


def _top_subreddits(store: Store, table: str) -> list[str]:
    return [s for (s,) in store.rows(f"SELECT subreddit FROM {table} GROUP BY subreddit "
                                     f"ORDER BY count(*) DESC, subreddit LIMIT {TOP_SUBREDDITS}")]


def _turn_texts(store: Store, ids: list[str]) -> dict[str, dict]:
    """comment_id -> the turn's row with its `context` (Store.turn_rows), for a few ids."""
    if not ids:
        return {}
    return {row["comment_id"]: row for row in store.turn_rows(f"WHERE comment_id IN {IDS}", [ids]).to_pylist()}


def _context(text: str | None) -> str:
    """The end of a turn's dialog context, or why there is none."""
    return clip(text, CONTEXT_CHARS, keep_end=True) or "(none: the post is not in the store)"


def _labels(store: Store, ids: list[str]) -> dict[str, dict]:
    if not ids or not store.has_table("labels"):
        return {}
    rows = store.rows(f"SELECT comment_id, tier, adjusted, reward, reply_sentiment_mean FROM labels "
                      f"WHERE comment_id IN {IDS}", [ids])
    return {r[0]: {"tier": r[1], "adjusted": r[2], "reward": r[3], "reply sentiment": r[4]} for r in rows}




# ----------------------------------------------------------------------------- corpus

def corpus(store: Store, stats: dict) -> Section:
    section = Section("corpus", "Corpus", "What the store holds: posts, comments, threads, the dialog turns built "
                      "from them, how deep the replies go, and where they come from.")
    turns = stats["turns"]
    facts = [("posts", stats["posts"]), ("comments", stats["comments"]), ("threads", stats["threads"]),
             ("threads without their post", stats["threads_without_post"]), ("orphan replies", stats["orphans"]),
             ("deleted / removed bodies", stats["deleted_bodies"]), ("turns", turns)]
    section.facts = [(k, v) for k, v in facts if v is not None]
    section.notes.append(
        "What the ingest skipped is not recorded in the store: `ahf ingest --json` reports it per input file "
        "(`skipped`: reason → count, with file:line examples). The counts above are `ahf stats --json`'s.")
    if turns is None:
        section.missing = "The store has no `turns` table: run `ahf turns` to fill it, then write the report again."
        return section
    section.notes.append(f"{stats['comments'] - turns:,} of the {stats['comments']:,} stored comments are not "
                         "turns (deleted, bot or too short replies ...): `ahf turns --json` counts them by reason "
                         "(`filtered`).")
    if stats["turns_stale"]:
        section.notes.append("Posts or comments were written after the turns were built: run `ahf turns` to bring "
                             "the turns (and the tables built from them) up to date.")
    depth = stats["depth"]
    if depth:
        section.figures.append(Figure(
            "Turns by reply depth",
            f"Turns at each depth of the comment tree (1: a direct reply to the post); {turns:,} turns in all.",
            F.render(lambda ax: F.bars(ax, list(depth), {"turns": list(depth.values())}, value_label="turns"))))
    subs = stats["subreddits"][:TOP_SUBREDDITS]
    if subs:
        names = [str(s["subreddit"]) for s in subs]
        series = {k: [s[k] for s in subs] for k in ("posts", "comments", "turns")}
        section.figures.append(Figure(
            "Per subreddit",
            f"Posts, comments and turns of the {len(subs)} largest of {len(stats['subreddits']):,} subreddits "
            "(by comments).",
            F.render(lambda ax: F.bars(ax, names, series, horizontal=True, value_label="rows"),
                     size=(5.6, 1.2 + 0.32 * len(names)))))
    span = store.rows("SELECT min(created_utc), max(created_utc) FROM turns")[0]
    if span[0] is not None:
        days = (span[1] - span[0]) / 86_400
        unit, fmt = ("day", "%Y-%m-%d") if days <= 92 else ("month", "%Y-%m") if days <= 3_660 else ("year", "%Y")
        periods = store.rows(f"SELECT strftime(to_timestamp(created_utc), '{fmt}') AS period, count(*) FROM turns "
                             "WHERE created_utc IS NOT NULL GROUP BY period ORDER BY period")

        def draw(ax):
            labels, counts = [p for p, _ in periods], [n for _, n in periods]
            ax.bar(range(len(labels)), counts, 0.9, color=F.PALETTE[0])
            step = max(1, len(labels) // 8)
            ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=30, ha="right")
            ax.set_ylabel("turns")
            ax.grid(axis="x", visible=False)
        section.figures.append(Figure("Turns over time", f"Turns per {unit} of the reply's creation, "
                                      f"{periods[0][0]} to {periods[-1][0]}.", F.render(draw)))
    return section


# ----------------------------------------------------------------------------- dialog acts

def acts(store: Store, section: Section) -> None:
    counts = {a: (n, c) for a, n, c in store.rows("SELECT act, count(*), avg(confidence) FROM acts GROUP BY act")}
    known = [a for (a,) in store.rows("SELECT act FROM act_types")] if store.has_table("act_types") else []
    order = [a for a in known if a != "other"] + sorted(set(counts) - set(known) - {"other"}) + \
        (["other"] if "other" in counts or "other" in known else [])
    if not counts:
        section.missing = "The `acts` table is empty: the store had no turns when `ahf acts tag` ran."
        return
    total = sum(n for n, _ in counts.values())
    section.figures.append(Figure(
        "Turns per act", f"Turns tagged with each act ({total:,} turns; `other`: below the tagger's min_confidence).",
        F.render(lambda ax: F.bars(ax, order, {"turns": [counts.get(a, (0, 0))[0] for a in order]},
                                   value_label="turns", annotate=True))))
    subs = _top_subreddits(store, "turns")
    shares = {(s, a): n for s, a, n in store.rows(
        f"SELECT t.subreddit, a.act, count(*) FROM acts a JOIN turns t USING (comment_id) "
        f"WHERE t.subreddit IN {IDS} GROUP BY ALL", [subs])}
    per_sub = {s: sum(shares.get((s, a), 0) for a in order) or 1 for s in subs}
    series = {a: [shares.get((s, a), 0) / per_sub[s] for s in subs] for a in order}
    colours = dict(zip(order, F.PALETTE)) | {"other": "#C8C8C8"}
    section.figures.append(Figure(
        "Acts per subreddit", f"Share of each subreddit's turns tagged with each act ({len(subs)} largest subreddits).",
        F.render(lambda ax: (F.bars(ax, subs, series, horizontal=True, stacked=True, colours=colours,
                                    value_label="share of turns", legend_below=True), ax.set_xlim(0, 1)),
                 size=(5.6, 1.9 + 0.3 * len(subs)))))
    quantiles = dict(store.rows("SELECT act, quantile_cont(confidence, [0.05, 0.25, 0.5, 0.75, 0.95]) FROM acts "
                                "WHERE confidence IS NOT NULL GROUP BY act"))
    present = [a for a in order if a in quantiles]
    section.figures.append(Figure(
        "Confidence", "The tagger's confidence per act (box: quartiles and median; whiskers: 5th to 95th "
        "percentile; mean: " + ", ".join(f"{a} {counts[a][1]:.2f}" for a in present) + ").",
        F.render(lambda ax: F.boxes(ax, present, [quantiles[a] for a in present], [colours[a] for a in present],
                                    "confidence", horizontal=True), size=(5.6, 1.2 + 0.35 * len(present)))))
    picked = store.rows(f"""SELECT act, comment_id, confidence FROM acts WHERE act <> 'other'
                            QUALIFY row_number() OVER (PARTITION BY act ORDER BY confidence DESC, comment_id)
                                    <= {EXAMPLES_PER_GROUP}""")
    ids = [c for _, c, _ in picked]
    texts, labels = _turn_texts(store, ids), _labels(store, ids)
    for act in order:
        for a, cid, confidence in sorted((p for p in picked if p[0] == act), key=lambda p: (-p[2], p[1])):
            turn = texts.get(cid)
            if turn is None:
                continue
            section.examples.append(Example(
                f"{act} · r/{turn['subreddit']} · turn {cid}",
                [("confidence", round(confidence, 3)), ("score", turn["score"]), ("depth", turn["depth"]),
                 *[(k, round(v, 3) if isinstance(v, float) else v) for k, v in labels.get(cid, {}).items()]],
                [("context", _context(turn["context"])),
                 ("reply", clip(turn["reply"], REPLY_CHARS))]))


# ----------------------------------------------------------------------------- votes

def votes(store: Store, section: Section) -> None:
    labelled, adjusted = store.rows("SELECT count(*), count(adjusted) FROM labels")[0]
    if not adjusted:
        section.missing = (f"None of the {labelled:,} labelled turns is in a group large enough for a tier "
                           "(`votes.min_replies` in configs/labels.yaml).")
        return
    joined = "SELECT t.score, t.delay_post_s, t.post_score, l.adjusted, l.tier, l.subreddit " \
             "FROM labels l JOIN turns t USING (comment_id) WHERE l.adjusted IS NOT NULL"
    points = store.rows(f"SELECT score, adjusted, tier FROM ({joined}) "
                        f"USING SAMPLE reservoir({SAMPLE_POINTS} ROWS) REPEATABLE (7)")
    rho = _spearman(store, joined, "score", "adjusted")

    def scatter(ax):
        for tier in TIERS:
            xs = [s for s, _, t in points if t == tier]
            ax.scatter(xs, [a for _, a, t in points if t == tier], s=7, alpha=0.6, label=tier,
                       color=F.TIER_COLOURS[tier], rasterized=len(points) > F.POINTS_RASTERISED, linewidths=0)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("raw score (net votes, symlog)")
        ax.set_ylabel("adjusted ranking")
        ax.legend(loc="best", markerscale=2)
    sample = f"a sample of {len(points):,} of {adjusted:,}" if len(points) < adjusted else f"all {adjusted:,}"
    section.figures.append(Figure(
        "Raw score and adjusted ranking",
        f"Each point a labelled turn ({sample}), coloured by tier; Spearman ρ = {_fmt(rho)}.", F.render(scatter)))
    subs = _top_subreddits(store, "labels")
    tiers = {(s, t or "unlabelled"): n for s, t, n in store.rows(
        f"SELECT subreddit, tier, count(*) FROM labels WHERE subreddit IN {IDS} GROUP BY ALL", [subs])}
    names = (*TIERS, "unlabelled")
    per_sub = {s: sum(tiers.get((s, t), 0) for t in names) or 1 for s in subs}
    series = {t: [tiers.get((s, t), 0) / per_sub[s] for s in subs] for t in names}
    section.figures.append(Figure(
        "Tiers per subreddit",
        "Share of each subreddit's turns per tier (quantiles of the adjusted ranking); unlabelled: groups below "
        "votes.min_replies.",
        F.render(lambda ax: (F.bars(ax, subs, series, horizontal=True, stacked=True, colours=F.TIER_COLOURS,
                                    value_label="share of turns", legend_below=True), ax.set_xlim(0, 1)),
                 size=(5.6, 1.9 + 0.3 * len(subs)))))
    confounds = [(_confound(store, joined, col), label) for col, label in
                 (("delay_post_s", "posting delay after the post"), ("post_score", "post score"))]
    absent = [label for c, label in confounds if not c]
    confounds = [(c, label) for c, label in confounds if c]
    if absent:
        section.notes.append(f"No confound figure for the {' and the '.join(absent)}: no labelled turn has one "
                             "(their posts are not in the store).")
    if confounds:
        def draw(axes):
            for ax, ((before, after, bins), label) in zip(axes, confounds):
                xs = list(range(1, len(bins) + 1))
                ax.plot(xs, [b[1] for b in bins], "o-", label=f"raw score (ρ {_fmt(before)})", color=F.PALETTE[3])
                ax.plot(xs, [b[2] for b in bins], "o-", label=f"adjusted (ρ {_fmt(after)})", color=F.PALETTE[0])
                ax.axhline(0.5, color="#888888", linewidth=0.8, linestyle="--")
                ax.set_ylim(0, 1)
                ax.set_xticks(xs, [_short(b[0]) for b in bins], rotation=30, ha="right")
                ax.set_xlabel(f"{label} (median of each decile)")
                ax.legend(loc="best")
            axes[0].set_ylabel("mean percentile")
        section.figures.append(Figure(
            "Confounds, before and after adjustment",
            "Mean percentile of the raw score and of the adjusted ranking in each decile of " +
            " and of ".join(label for _, label in confounds) + "; flat at 0.5 means no confound (ρ: Spearman).",
            F.render(draw, size=(F.WIDE / 2 * len(confounds), 3.4), grid=(1, len(confounds))), wide=len(confounds) > 1))


def _confound(store: Store, joined: str, column: str) -> tuple[float, float, list] | None:
    """(ρ(score, column), ρ(adjusted, column), [(median of column, mean percentile of score, of adjusted)]
    per decile of column) over the labelled turns that have the column."""
    ranked = f"""SELECT {column} AS x, {_rank(column)} AS rx, {_rank('score')} AS rs, {_rank('adjusted')} AS ra,
                        count(*) OVER () AS n, ntile(10) OVER (ORDER BY {column}) AS decile
                 FROM ({joined}) WHERE {column} IS NOT NULL"""
    rows = store.rows(f"SELECT corr(rs, rx), corr(ra, rx) FROM ({ranked})")
    if not rows or rows[0][0] is None:
        return None
    bins = store.rows(f"SELECT median(x), avg((rs - 0.5) / n), avg((ra - 0.5) / n) FROM ({ranked}) "
                      "GROUP BY decile ORDER BY decile")
    return rows[0][0], rows[0][1], bins


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _short(value: float) -> str:
    value = float(value)
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


# ----------------------------------------------------------------------------- reply sentiment

def sentiment(store: Store, section: Section) -> None:
    labelled, scored = store.rows("SELECT count(*), count(reply_sentiment_mean) FROM labels")[0]
    if not scored:
        section.missing = f"None of the {labelled:,} labelled turns has a reply whose sentiment counts."
        return
    threshold = ((store.meta("labels_config") or {}).get("sentiment") or {}).get("positive_threshold", 0.05)
    edges, hist = _binned(store, "SELECT reply_sentiment_mean FROM labels", "reply_sentiment_mean", -1.0, 1.0, 40)
    section.figures.append(Figure(
        "Distribution",
        f"Mean VADER compound score of each turn's counted replies, for the {scored:,} of {labelled:,} labelled "
        "turns that have one.",
        F.render(lambda ax: (F.stairs(ax, edges, hist, "mean reply sentiment", "turns"),
                             ax.axvline(threshold, color="#888888", linewidth=0.8, linestyle="--")))))
    quantiles = {t: q for t, q in store.rows(
        "SELECT tier, quantile_cont(reply_sentiment_mean, [0.1, 0.25, 0.5, 0.75, 0.9]) FROM labels "
        "WHERE tier IS NOT NULL AND reply_sentiment_mean IS NOT NULL GROUP BY tier")}
    positive = {t: (p, n) for t, p, n in store.rows(
        f"SELECT tier, avg((reply_sentiment_mean >= {float(threshold)})::INT), count(*) FROM labels "
        "WHERE tier IS NOT NULL AND reply_sentiment_mean IS NOT NULL GROUP BY tier")}
    tiers = [t for t in TIERS if t in quantiles]
    if tiers:
        rho = _spearman(store, "SELECT * FROM labels", "adjusted", "reply_sentiment_mean")

        def by_tier(ax):
            F.boxes(ax, tiers, [quantiles[t] for t in tiers], [F.TIER_COLOURS[t] for t in tiers],
                    "mean reply sentiment")
            ax.set_xlabel("tier (box: quartiles, whiskers: 10th to 90th percentile)")

        def positive_share(ax):
            F.bars(ax, tiers, {"positive": [positive[t][0] for t in tiers]}, value_label="share of turns",
                   annotate=False)
            for bar, t in zip(ax.patches, tiers):
                bar.set_color(F.TIER_COLOURS[t])
            ax.bar_label(ax.containers[0], fmt="{:.2f}", fontsize=7, padding=2)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("tier")
        section.figures.append(Figure(
            "Sentiment by tier", f"Reply sentiment of the turns in each vote tier; Spearman ρ(adjusted ranking, "
            f"reply sentiment) = {_fmt(rho)} over {sum(n for _, n in positive.values()):,} turns.",
            F.render(by_tier)))
        section.figures.append(Figure(
            "Positive replies by tier", f"Share of each tier's turns whose replies are positive on average "
            f"(mean compound ≥ {threshold}, the labels' positive_threshold).", F.render(positive_share)))


# ----------------------------------------------------------------------------- pairs

def pairs(store: Store, section: Section) -> None:
    by_rule = store.rows("SELECT rule, count(*), count(DISTINCT post_id) FROM pairs GROUP BY rule ORDER BY rule")
    if not by_rule:
        section.missing = "The `pairs` table is empty: no sibling replies met the rules (configs/labels.yaml)."
        return
    rules = [r for r, _, _ in by_rule]
    colours = dict(zip(rules, F.PALETTE))
    subs = _top_subreddits(store, "turns")
    per_sub = {(s, r): n for s, r, n in store.rows(
        f"SELECT t.subreddit, p.rule, count(*) FROM pairs p JOIN turns t ON t.comment_id = p.chosen_id "
        f"WHERE t.subreddit IN {IDS} GROUP BY ALL", [subs])}
    subs = [s for s in subs if any(per_sub.get((s, r)) for r in rules)]

    def by_rule_bars(ax):
        F.bars(ax, rules, {"pairs": [n for _, n, _ in by_rule]}, value_label="pairs", annotate=True)
        for bar, r in zip(ax.patches, rules):
            bar.set_color(colours[r])

    section.figures.append(Figure(
        "Pairs by rule", ", ".join(f"{r}: {n:,} pairs from {p:,} posts" for r, n, p in by_rule) + ".",
        F.render(by_rule_bars)))
    if subs:
        section.figures.append(Figure(
            "Pairs per subreddit", f"Pairs of each rule in the {len(subs)} largest subreddits (by turns).",
            F.render(lambda ax: F.bars(ax, subs, {r: [per_sub.get((s, r), 0) for s in subs] for r in rules},
                                       horizontal=True, stacked=True, colours=colours, value_label="pairs"),
                     size=(5.6, max(3.2, 1.2 + 0.3 * len(subs))))))
    top = store.value("SELECT quantile_cont(margin, 0.99) FROM pairs") or 1.0
    edges, hist = _binned(store, "SELECT rule, margin FROM pairs", "margin", 0.0, float(top), 30, group="rule")
    section.figures.append(Figure(
        "Margins", "Margin per rule, to the 99th percentile (shp: ln of the score ratio; time_adjacent: "
        "ln(1 + score difference)).",
        F.render(lambda ax: F.stairs(ax, edges, hist, "margin", "pairs", colours))))
    points = store.rows(f"SELECT rule, chosen_score, rejected_score FROM pairs "
                        f"USING SAMPLE reservoir({SAMPLE_POINTS} ROWS) REPEATABLE (7)")

    def scores(ax):
        for rule in rules:
            mine = [(c, r) for g, c, r in points if g == rule]
            ax.scatter([r for _, r in mine], [c for c, _ in mine], s=7, alpha=0.5, label=rule,
                       color=colours[rule], linewidths=0, rasterized=len(points) > F.POINTS_RASTERISED)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("rejected reply's score (symlog)")
        ax.set_ylabel("chosen reply's score (symlog)")
        ax.legend(loc="best", markerscale=2)
    total = sum(n for _, n, _ in by_rule)
    section.figures.append(Figure(
        "Scores of the two replies", f"Each point a pair ({'a sample of ' if len(points) < total else 'all '}"
        f"{len(points):,} of {total:,}): the rejected reply's score against the chosen one's.", F.render(scores)))
    picked = store.rows(f"""SELECT rule, chosen_id, rejected_id, margin, chosen_score, rejected_score,
                                   rejected_created_utc - chosen_created_utc
                            FROM pairs QUALIFY row_number() OVER (PARTITION BY rule
                                                 ORDER BY margin DESC, chosen_id, rejected_id) <= {EXAMPLES_PER_GROUP}
                            ORDER BY rule, margin DESC, chosen_id, rejected_id""")
    texts = _turn_texts(store, sorted({i for p in picked for i in p[1:3]}))
    for rule, chosen, rejected, margin, c_score, r_score, earlier in picked:
        if chosen not in texts or rejected not in texts:
            continue
        section.examples.append(Example(
            f"{rule} · r/{texts[chosen]['subreddit']} · {chosen} over {rejected}",
            [("margin", round(margin, 3)), ("chosen score", c_score), ("rejected score", r_score),
             ("chosen posted", f"{_duration(-earlier)} after" if earlier < 0 else f"{_duration(earlier)} before")],
            [("prompt", _context(texts[chosen]["context"])),
             ("chosen", clip(texts[chosen]["reply"], REPLY_CHARS)),
             ("rejected", clip(texts[rejected]["reply"], REPLY_CHARS))]))


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds} s"


# The sections drawn from a derived table: (id, title, what the section shows, the table it needs, what fills
# that table, the function that draws it into the section).
DRAWN_FROM_TABLES = (
    ("acts", "Dialog acts", "Which turns the tagger found as each dialog act (story, explanation, question and "
     "answer, summary), where, how sure it was, and the turns it was surest of.", "acts",
     "`ahf index` and `ahf acts tag`", acts),
    ("votes", "Votes", "Net votes against the confound-adjusted ranking that sets each turn's tier "
     "(docs/feedback.md): rank among siblings, corrected for how early the reply came.", "labels", "`ahf label`",
     votes),
    ("sentiment", "Reply sentiment", "How the direct replies to each turn feel (VADER compound, own and bot "
     "replies left out), and whether that agrees with the vote tiers.", "labels", "`ahf label`", sentiment),
    ("pairs", "Preference pairs", "Sibling replies paired by the SHP rule (A scored at least min_ratio times B "
     "although posted no earlier) and by time adjacency, with their margins.", "pairs", "`ahf label`", pairs),
)
