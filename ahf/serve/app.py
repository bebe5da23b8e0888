"""The explorer's web app (Starlette + Jinja2; no JavaScript): pages, downloads, validation, headers.

Pages: `/` (the store at a glance), `/search` (turns by act, text and subreddit: `ahf query`'s
ranking), `/thread/{post_id}` (the thread as an indented tree), `/pairs` (pairs by rule),
`/pair?chosen=&rejected=` (one pair side by side). Downloads (TRL JSONL, `ahf export`'s rows):
`/download/search`, `/download/thread/{post_id}`, `/download/pairs`, each with `format=`.

Every parameter is checked before the store is asked (a bad one: 400 with a message; an unknown
id: 404; a busy store or a stage not run yet: 503); every text is escaped by Jinja2's autoescape,
and the Content-Security-Policy allows no script at all. Requests whose Host is not a loopback
name are refused unless the app was made with `allowed_hosts=["*"]` (`ahf serve --public`): a web
page the user visits elsewhere cannot reach the explorer through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from ahf.console import UserError
from mining.store import StoreError
from ahf.serve.explore import (
    FORMATS,
    MAX_K,
    MAX_PAGE,
    MAX_TEXT,
    BadRequest,
    Explorer,
    NotFound,
    Unavailable,
    check_id,
)

HERE = Path(__file__).parent
LOG = logging.getLogger("ahf.serve")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                 b"base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
STATUS = {BadRequest: 400, NotFound: 404, Unavailable: 503, StoreError: 503}


def link(path: str, **params) -> str:
    """A URL of this app: `path` with the non-empty `params` as its query string."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


def thread_link(post_id: str, comment_id: str | None = None) -> str:
    return f"/thread/{quote(post_id, safe='')}" + (f"#c-{comment_id}" if comment_id else "")


def pair_link(chosen_id: str, rejected_id: str) -> str:
    return link("/pair", chosen=chosen_id, rejected=rejected_id)


def _number(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def _utc(stamp) -> str:
    return "–" if stamp is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def _plural(n: int, noun: str, many: str | None = None) -> str:
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def _tail(text: str | None, chars: int = 600) -> str:
    text = text or ""
    return text if len(text) <= chars else "…" + text[-chars:]


# ---------------------------------------------------------------------------------------- parameters

def _text(request, name: str, limit: int = MAX_TEXT) -> str | None:
    value = request.query_params.get(name)
    if value is None or not value.strip():
        return None
    if len(value) > limit:
        raise BadRequest(f"{name} is {len(value):,} characters long; at most {limit} are allowed")
    if "\x00" in value:
        raise BadRequest(f"{name} contains a NUL character")
    return value.strip()


def _int(request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"\s*[+-]?\d{1,12}\s*", raw) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high:,}, got {raw[:40]!r}")
    return int(raw)


def _format(request) -> str:
    fmt = request.query_params.get("format", "pointwise")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {fmt[:40]!r}")
    return fmt


def _search_params(request, explorer: Explorer) -> dict:
    return {"act": explorer.check_act(_text(request, "act", 100)), "text": _text(request, "text"),
            "k": _int(request, "k", 10, 1, MAX_K),
            "subreddit": explorer.check_subreddit(_text(request, "subreddit", 100))}


def _pairs_params(request, explorer: Explorer) -> dict:
    rule = _text(request, "rule", 100) or next(iter(explorer.summary.pairs), None)
    return {"rule": explorer.check_rule(rule), "subreddit": explorer.check_subreddit(_text(request, "subreddit", 100))}


# ---------------------------------------------------------------------------------------- the app

def build_app(store_dir: str | Path, index_dir: str | Path | None = None, export_config=None,
              allowed_hosts: list[str] | None = None):
    """The ASGI app over the store at `store_dir` (opened read-only once, see Explorer).
    `allowed_hosts`: the Host names it answers (default: loopback names only; ["*"]: any)."""
    import jinja2
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    explorer = Explorer(store_dir, index_dir, export_config)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(number=_number, utc=_utc, tail=_tail, plural=_plural)
    env.globals.update(link=link, thread_link=thread_link, pair_link=pair_link, formats=FORMATS, max_k=MAX_K,
                       max_text=MAX_TEXT, explorer=explorer, store_dir=str(explorer.store_dir))

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(summary=explorer.summary, **context), status_code=status)

    def home(request):
        explorer.ensure_open()
        return page("home.html", title="ahf explorer")

    def search(request):
        explorer.ensure_open()
        if not request.query_params.get("act"):
            return page("search.html", title="search", params={"act": None, "text": None, "k": 10, "subreddit": None},
                        hits=None)
        params = _search_params(request, explorer)
        hits = explorer.search(**params)
        return page("search.html", title=f"search: {params['act']}", params=params, hits=hits)

    def thread(request):
        post_id = check_id(request.path_params["post_id"], "the thread id")
        data = explorer.thread(post_id)
        title = data["post"]["title"] if data["post"] else f"thread {post_id}"
        return page("thread.html", title=title, thread=data)

    def pairs(request):
        explorer.ensure_open()
        params = _pairs_params(request, explorer)
        page_no = _int(request, "page", 1, 1, MAX_PAGE)
        data = explorer.pairs_page(params["rule"], params["subreddit"], page_no)
        if page_no > data["pages"]:
            raise NotFound(f"page {page_no} is past the last page ({data['pages']}) of these pairs")
        return page("pairs.html", title=f"pairs: {params['rule']}", pairs=data)

    def pair(request):
        chosen = check_id(request.query_params.get("chosen"), "chosen")
        rejected = check_id(request.query_params.get("rejected"), "rejected")
        return page("pair.html", title="pair", pair=explorer.pair(chosen, rejected))

    def download(ids: list[str], fmt: str, name: str, rules: list[str] | None = None):
        body, rows = explorer.export_rows(fmt, ids, rules)

        def chunks():
            with body:
                while chunk := body.read(1 << 16):
                    yield chunk

        filename = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"ahf-{name}-{fmt}.jsonl")
        return StreamingResponse(chunks(), media_type="application/x-ndjson", headers={
            "content-disposition": f'attachment; filename="{filename}"', "x-ahf-rows": str(rows)})

    def download_search(request):
        explorer.ensure_open()
        params, fmt = _search_params(request, explorer), _format(request)
        return download(explorer.search_ids(**params), fmt, f"search-{params['act']}")

    def download_thread(request):
        post_id = check_id(request.path_params["post_id"], "the thread id")
        fmt = _format(request)
        return download(explorer.thread_ids(post_id), fmt, f"thread-{post_id}")

    def download_pairs(request):
        explorer.ensure_open()
        params = _pairs_params(request, explorer)
        if request.query_params.get("format", "pairs") != "pairs":
            raise BadRequest("the pairs page downloads its pairs: format=pairs")
        return download(explorer.pair_ids(**params), "pairs", f"pairs-{params['rule']}", rules=[params["rule"]])

    def user_error(request, exc: UserError):
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400)
        return page("error.html", status=status, title="error", message=str(exc), status_code=status)

    def http_error(request, exc: HTTPException):
        message = {404: f"no page at {request.url.path}", 405: "this page only answers GET"}.get(
            exc.status_code, exc.detail)
        return page("error.html", status=exc.status_code, title="error", message=message,
                    status_code=exc.status_code)

    def server_error(request, exc: Exception):
        LOG.exception("internal error on %s", request.url.path)
        return PlainTextResponse("internal error (the server's log has the details)", status_code=500)

    routes = [
        Route("/", home), Route("/search", search), Route("/thread/{post_id}", thread), Route("/pairs", pairs),
        Route("/pair", pair), Route("/download/search", download_search),
        Route("/download/thread/{post_id}", download_thread), Route("/download/pairs", download_pairs),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        UserError: user_error, HTTPException: http_error, Exception: server_error})
    app.state.explorer = explorer
    return Guard(app, allowed_hosts)


class Guard:
    """ASGI middleware: answers only Host names in `allowed_hosts` (loopback by default; "*": any)
    and adds the security headers (no script, no framing, no sniffing) to every response."""

    def __init__(self, app, allowed_hosts: list[str] | None = None):
        self.app, self.state = app, app.state
        self.allowed = None if allowed_hosts and "*" in allowed_hosts else \
            {h.lower() for h in (allowed_hosts or LOOPBACK_NAMES)}

    def close(self) -> None:
        self.state.explorer.close()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
        if self.allowed is not None and host not in self.allowed and not host.startswith("127."):
            body = b"this explorer answers loopback requests only (Host: localhost or 127.0.0.1); see ahf serve --public"
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), *SECURITY_HEADERS]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """The name of a Host header without its port ('[::1]:8765' -> '::1')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
