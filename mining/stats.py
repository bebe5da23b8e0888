"""`ahf stats`: what a store holds: threads, turns, reply depths, per-subreddit counts."""

from __future__ import annotations

from pathlib import Path

from mining.store import COMMENTS_VERSION, Store


def store_stats(store_dir: str | Path) -> dict:
    with Store(store_dir, read_only=True) as store:
        stats = {"store": str(store_dir), "posts": store.count("posts"), "comments": store.count("comments"),
                 **store.thread_counts()}
        stats["deleted_bodies"] = store.value(
            "SELECT count(*) FROM comments WHERE body IN ('[deleted]', '[removed]')")
        if not store.has_table("turns"):
            stats["turns"] = None
            return stats
        stats["turns"] = store.count("turns")
        # posts or comments written after the turns were built: the turns do not show them yet
        stats["turns_stale"] = store.meta("turns_comments_version") != store.meta(COMMENTS_VERSION)
        stats["depth"] = {str(d): n for d, n in store.rows(
            "SELECT depth, count(*) FROM turns GROUP BY depth ORDER BY depth")}
        stats["subreddits"] = [
            {"subreddit": s, "posts": p, "comments": c, "turns": t}
            for s, p, c, t in store.rows(
                """
                WITH c AS (SELECT subreddit, count(*) n FROM comments GROUP BY ALL),
                     p AS (SELECT subreddit, count(*) n FROM posts GROUP BY ALL),
                     t AS (SELECT subreddit, count(*) n FROM turns GROUP BY ALL)
                SELECT coalesce(c.subreddit, p.subreddit, t.subreddit) AS s,
                       coalesce(p.n, 0), coalesce(c.n, 0), coalesce(t.n, 0)
                FROM c FULL JOIN p USING (subreddit) FULL JOIN t USING (subreddit)
                ORDER BY 3 DESC, 1
                """
            )
        ]
        replies = store.rows("SELECT avg(n_siblings), max(n_siblings), avg(n_children) FROM turns")[0]
        stats["mean_siblings"], stats["max_siblings"], stats["mean_children"] = (
            round(replies[0] or 0, 3), replies[1] or 0, round(replies[2] or 0, 3))
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"store {stats['store']}",
             f"  posts {stats['posts']:,}  comments {stats['comments']:,}  threads {stats['threads']:,} "
             f"({stats['threads_without_post']:,} without their post)  orphan replies {stats['orphans']:,}  "
             f"deleted/removed bodies {stats['deleted_bodies']:,}"]
    if stats["turns"] is None:
        lines.append("  no turns yet: run `ahf turns`")
        return "\n".join(lines)
    lines.append(f"  turns {stats['turns']:,}  mean siblings {stats['mean_siblings']}  "
                 f"mean children {stats['mean_children']}")
    if stats["turns_stale"]:
        lines.append("  [yellow]warning:[/yellow] comments or posts were written after the turns were built: "
                     "run `ahf turns` to bring them up to date")
    lines.append("  depth: " + "  ".join(f"{d}:{n:,}" for d, n in stats["depth"].items()))
    lines.append("  subreddit                    posts   comments      turns")
    for row in stats["subreddits"][:20]:
        lines.append(f"  {str(row['subreddit'])[:24]:<24} {row['posts']:>9,} {row['comments']:>10,} {row['turns']:>10,}")
    if len(stats["subreddits"]) > 20:
        lines.append(f"  ... {len(stats['subreddits']) - 20} more subreddits (--json lists all)")
    return "\n".join(lines)
