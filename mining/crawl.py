"""`ahf crawl`: fetch live threads with PRAW into the store, resumably (see docs/crawl.md).

A thread is crawled whole: the submission, then `replace_more(limit=None)` until no
`MoreComments` stub is left, then every comment, converted to the dicts Reddit's API returns and
fed through the same `ingest_records` path as the dumps (same normalisation, same accounting:
`records_read == ingested + sum(skipped)`). Finished threads are written to `crawl_state` in the
store, so a re-run skips them without a request; per subreddit, `crawl_subreddits` keeps the
newest listed post that is in the store (moved only by walks that went all the way).

Credentials come only from PRAW's own places (`praw_client_id`, `praw_client_secret`,
`praw_user_agent` environment variables, or a `praw.ini` section chosen with `site`); they are
never part of the config, the report, the store or a log line.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import Field, field_validator

from ahf.config import StageConfig
from ahf.console import UserError
from mining.ingest import ingest_records, summary_counts
from mining.schema import CRAWL_STATE_SCHEMA, CRAWL_SUBREDDITS_SCHEMA
from mining.store import Store
from mining.turns import TurnConfig, TurnReport, rebuild_turns

log = logging.getLogger(__name__)

LISTING_CAP = 1000  # Reddit serves at most ~1,000 items of any listing, `new` included
TOKEN_PATH = "/api/v1/access_token"

class CrawlConfig(StageConfig):
    """What to crawl and how politely. No credentials here: PRAW reads them (env or praw.ini)."""

    subreddit: str | None = Field(None, description="walk r/NAME/new, newest first (at most ~1,000 posts)")
    submissions: list[str] = Field(default_factory=list, description="ids or URLs of threads to crawl")
    limit: int | None = Field(None, ge=1, description="at most this many posts from the `new` listing")
    since: int | None = Field(None, description="stop the `new` walk at posts created before this (unix s)")
    min_age_hours: float = Field(0.0, ge=0, description="leave younger posts for a later run (threads settle)")
    refresh: bool = Field(False, description="re-crawl threads already marked finished")
    max_requests: int | None = Field(None, ge=1, description="start no new thread after this many HTTP requests")
    site: str | None = Field(None, description="praw.ini section holding the credentials")
    oauth_url: str | None = Field(None, description="API base URL (default https://oauth.reddit.com)")
    reddit_url: str | None = Field(None, description="token endpoint base URL (default https://www.reddit.com)")
    timeout: int = Field(16, ge=1, description="seconds to wait for one HTTP response")
    listing_cap: int = Field(LISTING_CAP, ge=1, description="Reddit's listing cap, for the gap warning")

    @field_validator("since", mode="before")
    @classmethod
    def _since_as_unix(cls, value: Any) -> Any:
        # YAML and --set give dates (`since: 2024-01-31`) as date objects or strings
        return parse_since(str(value)) if isinstance(value, (str, date)) else value


@dataclass
class CrawlReport:
    subreddit: str | None = Field(None, description="walk r/NAME/new, newest first (at most ~1,000 posts)")
    listed: int = 0
    crawled: int = 0
    skipped_done: int = 0
    too_young: int = 0
    records_read: int = 0
    ingested: int = 0
    skipped: Counter = field(default_factory=Counter)
    comments_crawled: int = 0
    requests: int = 0
    ratelimit: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None
    newest_created_utc: int | None = None
    oldest_listed_utc: int | None = None
    possible_gap: list[int | None] | None = None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    store: dict[str, int] = field(default_factory=dict)
    turns: TurnReport | None = None  # the rebuild after a crawl that ingested anything

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "subreddit": self.subreddit,
            "records_read": self.records_read,
            "ingested": self.ingested,
            "skipped": dict(sorted(self.skipped.items())),
            "submissions": {"listed": self.listed, "crawled": self.crawled,
                            "skipped_done": self.skipped_done, "too_young": self.too_young},
            "comments_crawled": self.comments_crawled,
            "requests": self.requests,
            "ratelimit": self.ratelimit,
            "stopped": self.stopped,
            "newest_created_utc": self.newest_created_utc,
            "oldest_listed_utc": self.oldest_listed_utc,
            "possible_gap": self.possible_gap,
            **self.store,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            **({"turns": self.turns.to_dict()} if self.turns else {}),
        }


def parse_since(value: str) -> int:
    """`2015-08-17`, `2015-08-17T08:00:00` (UTC unless an offset is given) or unix seconds."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--since: expected a date (YYYY-MM-DD), a datetime or unix seconds, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


# ---------------------------------------------------------------- connecting

def _counting_requestor():
    import prawcore

    class CountingRequestor(prawcore.Requestor):
        """prawcore's requestor, counting every HTTP request (token requests included)."""

        def __init__(self, *args, counter: Counter, **kwargs):
            super().__init__(*args, **kwargs)
            self.counter = counter

        def request(self, *args, **kwargs):
            self.counter["requests"] += 1
            response = super().request(*args, **kwargs)
            if response.status_code == 200 and response.url.split("?")[0].endswith(TOKEN_PATH):
                _check_token_answer(response)
            return response

    return CountingRequestor


def _check_token_answer(response) -> None:
    """A 200 from the token endpoint that holds no token (a proxy's or captive portal's page, a wrong
    --reddit-url) is named with what came back; prawcore would fail on it with a JSON traceback."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and ("error" in payload or {"access_token", "expires_in", "scope"} <= payload.keys()):
        return  # a token, or an OAuth error prawcore reports itself
    start = " ".join(response.text[:160].split())
    raise UserError(f"the token endpoint {response.url} answered HTTP 200 with "
                    f"{response.headers.get('Content-Type', 'no content type')} ({len(response.content):,} bytes: "
                    f"{start!r}) instead of a token; check --reddit-url (is a proxy or login page in the way?)")


def _is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _require_https(reddit_config) -> None:
    """The client secret (and a script app's password) go to these URLs: refused over plain http unless
    they stay on this machine (loopback hosts, as a local stand-in for Reddit)."""
    for name in ("reddit_url", "oauth_url"):
        url = getattr(reddit_config, name)
        parts = urlsplit(url)
        if parts.scheme != "https" and not _is_loopback(parts.hostname):
            raise UserError(f"{name} {url} is not https: the Reddit credentials would cross the network in clear "
                            "text. Use https (plain http only to a loopback host: 127.0.0.1, localhost, ::1)")


def connect(config: CrawlConfig, counter: Counter):
    """A read-only `praw.Reddit`; credentials are looked up by PRAW, missing ones are a UserError."""
    import praw
    from praw.exceptions import MissingRequiredAttributeException

    urls = {k: v for k, v in (("oauth_url", config.oauth_url), ("reddit_url", config.reddit_url)) if v}
    try:
        reddit = praw.Reddit(
            site_name=config.site,
            check_for_updates=False,
            timeout=config.timeout,
            requestor_class=_counting_requestor(),
            requestor_kwargs={"counter": counter},
            **urls,
        )
    except configparser.NoSectionError:
        raise UserError(f"no praw.ini section named {config.site!r} (looked in the current directory and "
                        "$XDG_CONFIG_HOME or ~/.config); see docs/crawl.md") from None
    except MissingRequiredAttributeException as exc:
        # PRAW's message names the missing setting only; we add where to put it.
        setting = str(exc).split("'")[1] if "'" in str(exc) else "a credential"
        raise UserError(
            f"Reddit credentials missing: {setting} is not set. Set praw_client_id, praw_client_secret and "
            "praw_user_agent in the environment, or put client_id / client_secret / user_agent in a praw.ini "
            "section and pass --site NAME (see docs/crawl.md)."
        ) from None
    _require_https(reddit.config)  # as PRAW resolved them: flags, config or praw.ini
    return reddit


def _fatal(exc: Exception, config: CrawlConfig) -> UserError | None:
    """Errors that would fail every thread alike become one UserError (no secret is in any of them)."""
    from prawcore.exceptions import OAuthException, RequestException, ResponseException

    if isinstance(exc, OAuthException):
        return UserError(f"Reddit refused the credentials: {exc.error}")
    if isinstance(exc, ResponseException) and exc.response.request.url.split("?")[0].endswith(TOKEN_PATH):
        return UserError(f"Reddit refused the credentials (HTTP {exc.response.status_code} on {TOKEN_PATH}); "
                         "check client_id / client_secret")
    if isinstance(exc, RequestException):
        return UserError(f"cannot reach Reddit at {config.oauth_url or 'https://oauth.reddit.com'}: "
                         f"{exc.original_exception.__class__.__name__}")
    return None


# ---------------------------------------------------------------- praw objects -> API dicts

def _name(value: Any) -> str | None:
    # Redditor and Subreddit print as their names; str() never triggers a lazy fetch.
    return None if value is None else str(value)


def _author(value: Any) -> str:
    # PRAW turns Reddit's "[deleted]" author into None; write it back as the API (and every dump)
    # has it, so a thread stores the same rows whether it was crawled or ingested from a file.
    return "[deleted]" if value is None else str(value)


def post_record(submission) -> dict:
    """The fields of a Reddit API `t3` the store keeps, read from what PRAW already holds."""
    data = vars(submission)  # attribute access could trigger an extra request for a missing field
    return {
        "id": data["id"], "title": data.get("title"), "selftext": data.get("selftext"),
        "author": _author(data.get("author")), "score": data.get("score"),
        "created_utc": data.get("created_utc"), "subreddit": _name(data.get("subreddit")),
        "over_18": data.get("over_18"), "num_comments": data.get("num_comments"),
        "link_flair_text": data.get("link_flair_text"), "url": data.get("url"),
    }


def comment_record(comment) -> dict:
    """The fields of a Reddit API `t1` the store keeps."""
    data = vars(comment)
    return {
        "id": data["id"], "link_id": data.get("link_id"), "parent_id": data.get("parent_id"),
        "author": _author(data.get("author")), "body": data.get("body"), "score": data.get("score"),
        "created_utc": data.get("created_utc"), "subreddit": _name(data.get("subreddit")),
        "distinguished": data.get("distinguished"), "stickied": data.get("stickied"),
    }


def thread_records(submission) -> list[tuple[str, dict]]:
    """The post and every comment of a thread, all `MoreComments` stubs resolved."""
    forest = submission.comments  # fetches /comments/<id>
    forest.replace_more(limit=None)
    records = [(f"t3_{submission.id}", post_record(submission))]
    records += [(f"t1_{c.id}", comment_record(c)) for c in forest.list()]
    return records


# ---------------------------------------------------------------- state

class CrawlState:
    """`crawl_state` (one row per finished thread) and `crawl_subreddits` (the newest listed post in
    the store per subreddit): small tables kept in memory and written back whole through
    `Store.replace_tables` after every change, so any store format keeps them."""

    def __init__(self, store: Store):
        self.store = store
        self.done = {row["submission_id"]: row for row in self._load("crawl_state", CRAWL_STATE_SCHEMA)}
        self.walks = {row["subreddit"]: row for row in self._load("crawl_subreddits", CRAWL_SUBREDDITS_SCHEMA)}

    def _load(self, table: str, schema: pa.Schema) -> list[dict]:
        if not self.store.has_table(table):
            return []
        return self.store.arrow(f"SELECT {', '.join(schema.names)} FROM {table}").to_pylist()

    def _save(self, table: str, rows: dict[str, dict], schema: pa.Schema) -> None:
        self.store.replace_tables({table: pa.Table.from_pylist(list(rows.values()), schema=schema)})

    def is_done(self, submission_id: str) -> bool:
        return submission_id in self.done

    def mark_done(self, submission_id: str, subreddit: str | None, created_utc: int | None, comments: int) -> None:
        self.done[submission_id] = {"submission_id": submission_id, "subreddit": subreddit,
                                    "created_utc": created_utc, "comments": comments, "finished_utc": int(time.time())}
        self._save("crawl_state", self.done, CRAWL_STATE_SCHEMA)

    def newest(self, subreddit: str) -> int | None:
        return (self.walks.get(subreddit.lower()) or {}).get("newest_created_utc")

    def record_walk(self, subreddit: str, newest_seen: int | None) -> int | None:
        newest = max(x for x in (self.newest(subreddit), newest_seen, -1) if x is not None)
        newest = None if newest < 0 else newest
        self.walks[subreddit.lower()] = {"subreddit": subreddit.lower(), "newest_created_utc": newest,
                                         "last_walk_utc": int(time.time())}
        self._save("crawl_subreddits", self.walks, CRAWL_SUBREDDITS_SCHEMA)
        return newest


# ---------------------------------------------------------------- the crawl

def _targets(reddit, config: CrawlConfig) -> Iterator[tuple[str, Any]]:
    """("given", submission) for --submission, then ("listed", submission) from `new`."""
    for ref in config.submissions:
        yield "given", reddit.submission(url=ref) if "/" in ref else reddit.submission(id=ref.removeprefix("t3_"))
    if config.subreddit:
        yield from (("listed", s) for s in reddit.subreddit(config.subreddit).new(limit=config.limit))


def crawl(store_dir: str | Path, config: CrawlConfig, progress: Callable[[int], None] | None = None,
          rebuild: bool = True, turn_config: TurnConfig | None = None) -> CrawlReport:
    """Crawl the threads `config` names into the store at `store_dir`; see the module docstring.
    When anything was ingested and `rebuild` is on, the turns are rebuilt with `turn_config`
    (None: configs/mining.yaml) on the same open store."""
    if not config.subreddit and not config.submissions:
        raise UserError("nothing to crawl: give --subreddit NAME and/or --submission ID")
    counter: Counter = Counter()
    reddit = connect(config, counter)
    report = CrawlReport(subreddit=config.subreddit)
    started = time.perf_counter()
    with Store(store_dir) as store:
        state = CrawlState(store)
        previous_newest = state.newest(config.subreddit) if config.subreddit else None
        try:
            _walk(reddit, config, store, state, report, counter, progress)
        except Exception as exc:
            fatal = _fatal(exc, config)
            if fatal is None:
                raise
            raise fatal from None
        finally:
            report.requests = counter["requests"]
        if config.subreddit:
            _record_walk(config, state, report, previous_newest)
        report.ratelimit = {k: v for k, v in reddit.auth.limits.items() if v is not None}
        report.store = summary_counts(store)
        if rebuild and report.ingested:
            report.turns = rebuild_turns(store, turn_config)
    report.seconds = time.perf_counter() - started
    return report


def _walk(reddit, config: CrawlConfig, store: Store, state: CrawlState, report: CrawlReport,
          counter: Counter, progress: Callable[[int], None] | None) -> None:
    from prawcore.exceptions import PrawcoreException

    now = time.time()
    report.stopped = "listing_end" if config.subreddit else "done"
    targets = _targets(reddit, config)
    while True:
        try:
            origin, submission = next(targets)
        except StopIteration:
            break
        except PrawcoreException as exc:  # the listing itself failed (banned, private, no such subreddit)
            if _fatal(exc, config):
                raise
            report.errors.append(f"r/{config.subreddit}/new: {exc.__class__.__name__}: {exc}")
            report.stopped = "listing_error"
            break
        created = int(vars(submission)["created_utc"]) if origin == "listed" else None
        if created is not None:
            report.listed += 1
            report.oldest_listed_utc = created
            if config.since is not None and created < config.since:
                report.stopped = "since"
                break
            if now - created < config.min_age_hours * 3600:
                report.too_young += 1
                continue
        outcome = _visit(submission, config, store, state, report, counter)
        if outcome in ("max_requests", "rate_limited"):
            report.stopped = outcome
            break
        if outcome == "crawled" and progress:
            progress(1)
        if created is not None and outcome in ("crawled", "done"):  # a listed post now in the store
            report.newest_created_utc = max(report.newest_created_utc or created, created)
    if report.stopped == "listing_end" and config.limit is not None and report.listed >= config.limit:
        report.stopped = "limit"


def _visit(submission, config: CrawlConfig, store: Store, state: CrawlState, report: CrawlReport,
           counter: Counter) -> str:
    """Crawl one thread unless it is finished: "done", "crawled", "error", or a reason to stop."""
    from praw.exceptions import PRAWException
    from prawcore.exceptions import PrawcoreException, TooManyRequests

    if not config.refresh and state.is_done(submission.id):
        report.skipped_done += 1
        return "done"
    if config.max_requests is not None and counter["requests"] >= config.max_requests:
        return "max_requests"
    try:
        records = thread_records(submission)
    # praw asserts on server replies it did not expect (a vanished "continue this thread"):
    # that is one broken thread, not a broken crawl.
    except (PrawcoreException, PRAWException, AssertionError) as exc:
        if _fatal(exc, config):
            raise
        report.errors.append(f"{submission.id}: {exc.__class__.__name__}: {exc}")
        # after a 429 the next thread would get the same answer: stop, resumable
        return "rate_limited" if isinstance(exc, TooManyRequests) else "error"
    _store_thread(store, state, report, submission, records)
    return "crawled"


def _store_thread(store: Store, state: CrawlState, report: CrawlReport, submission, records) -> None:
    data = vars(submission)
    subreddit = _name(data.get("subreddit"))
    source = f"crawl:r/{subreddit}"
    result = ingest_records(store, iter(records), source=source, retrieved_default=int(time.time()))
    report.records_read += result.records_read
    report.ingested += result.ingested
    report.skipped.update(result.skipped)
    comments = len(records) - 1
    report.comments_crawled += comments
    report.crawled += 1
    created = data.get("created_utc")
    # marked after its rows are committed: a crash in between only means crawling it again
    state.mark_done(submission.id, subreddit, None if created is None else int(created), comments)
    log.info("crawled %s (%s): %d comments", submission.id, source, comments)


def _record_walk(config: CrawlConfig, state: CrawlState, report: CrawlReport, previous_newest: int | None) -> None:
    """Warn when `new` ran out at its cap before reaching known ground; keep the newest post stored.

    Only a walk that went all the way (to the listing's end or to `since`) moves the mark: after
    a walk cut short by --limit, --max-requests or an error, older posts are still unvisited.
    """
    oldest = report.oldest_listed_utc
    reached_cap = report.stopped == "listing_end" and report.listed >= config.listing_cap
    floor = max(x for x in (previous_newest, config.since, -1) if x is not None)
    if reached_cap and oldest is not None and oldest > floor:
        report.possible_gap = [None if floor < 0 else floor, oldest]
    if report.stopped in ("listing_end", "since"):
        report.newest_created_utc = state.record_walk(config.subreddit, report.newest_created_utc)
    else:
        report.newest_created_utc = previous_newest
