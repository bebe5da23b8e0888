"""The `ahf crawl` verb (registered by mining/cli.py): a thin layer over `mining.crawl.crawl`."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.markup import escape

from ahf.args import add_config, add_json, add_store
from ahf.console import emit, progress_bar


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "crawl", help="crawl live Reddit threads with PRAW into the store (resumable; see docs/crawl.md)",
        description="Credentials: praw_client_id / praw_client_secret / praw_user_agent in the environment, "
                    "or a praw.ini section named with --site. They are never printed or stored.")
    p.add_argument("--subreddit", metavar="NAME", help="walk r/NAME/new (newest first, at most ~1,000 posts)")
    p.add_argument("--submission", action="append", metavar="ID", default=None,
                   help="crawl this thread (id or URL); repeatable")
    p.add_argument("--limit", type=int, help="take at most N posts from the listing")
    p.add_argument("--since", metavar="DATE", help="stop at posts created before DATE (YYYY-MM-DD or unix s)")
    p.add_argument("--min-age-hours", type=float, help="leave posts younger than this for a later run")
    p.add_argument("--max-requests", type=int, metavar="N", help="start no new thread after N HTTP requests")
    p.add_argument("--refresh", action="store_true", help="re-crawl threads already marked finished")
    p.add_argument("--site", help="praw.ini section with the credentials")
    p.add_argument("--oauth-url", help="API base URL (default https://oauth.reddit.com)")
    p.add_argument("--reddit-url", help="token endpoint base URL (default https://www.reddit.com)")
    add_store(p)
    p.add_argument("--no-turns", action="store_true", help="skip rebuilding threads and turns afterwards")
    add_config(p, "crawl")
    p.add_argument("--mining-config", metavar="FILE", help="mining config YAML for the turns rebuild "
                                                           "(default: configs/mining.yaml)")
    add_json(p)
    p.set_defaults(handler=run_crawl)


def _config(args):
    from ahf.config import load_config
    from mining.crawl import CrawlConfig, parse_since

    config = load_config(CrawlConfig, "crawl", args.config, args.set)
    flags = {
        "subreddit": args.subreddit, "submissions": args.submission, "limit": args.limit,
        "since": parse_since(args.since) if args.since else None, "min_age_hours": args.min_age_hours,
        "max_requests": args.max_requests, "refresh": args.refresh or None, "site": args.site,
        "oauth_url": args.oauth_url, "reddit_url": args.reddit_url,
    }
    return CrawlConfig.model_validate({**config.model_dump(), **{k: v for k, v in flags.items() if v is not None}})


def _utc(timestamp: int | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def run_crawl(args) -> int:
    from mining.crawl import crawl

    from ahf.config import load_config
    from mining.turns import MiningConfig

    config = _config(args)
    turns = load_config(MiningConfig, "mining", args.mining_config).turns
    with progress_bar("crawl", unit="threads", enabled=not args.json) as advance:
        report = crawl(args.store, config, progress=advance, rebuild=not args.no_turns, turn_config=turns)
    result = report.to_dict()
    where = f"r/{report.subreddit}" if report.subreddit else "given threads"
    lines = [
        f"{where}: crawled {report.crawled:,} threads ({report.comments_crawled:,} comments), "
        f"skipped {report.skipped_done:,} already finished, {report.too_young:,} too young; "
        f"{report.requests:,} requests; stopped: {report.stopped}",
        f"read {report.records_read:,} records: ingested {report.ingested:,}, "
        f"skipped {sum(report.skipped.values()):,} {escape(str(dict(report.skipped))) if report.skipped else ''}",
        f"store {args.store}: {report.store['comments']:,} comments, {report.store['posts']:,} posts",
    ]
    if report.possible_gap:
        start, end = (_utc(t) for t in report.possible_gap)
        span = f"between {start} and {end}" if start else f"before {end}"
        lines.append(f"[yellow]warning:[/yellow] r/{report.subreddit}/new ended at its ~1,000-item cap; posts "
                     f"created {span} may be missing (use a dump for history, see docs/crawl.md)")
    lines += [f"[red]error:[/red] {escape(e)}" for e in report.errors]
    emit(result, args.json, "\n".join(lines))
    return 0 if report.ok else 1
