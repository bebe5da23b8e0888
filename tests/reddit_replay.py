"""A loopback stand-in for reddit.com that replays recorded Reddit API responses.

reddit.com is the one component of the crawl that cannot exist on a test machine, so this is a
real HTTP server (`http.server` on 127.0.0.1, a free port, in a thread) that answers the requests
PRAW makes with the responses recorded in betamax cassettes (`../shared/data/reddit-api/*.json`,
from PRAW's own test suite). Everything between `ahf crawl` and the socket is the real thing:
praw, prawcore, requests, OAuth, rate-limit headers.

How requests are answered:
- `POST /api/v1/access_token`: checks HTTP Basic credentials (when the server was given some; 401
  otherwise, as Reddit does) and returns a fresh bearer token. Recorded token exchanges are not
  replayed (their tokens are placeholders).
- Every other request must carry `Authorization: bearer <that token>` (else 401), and is matched
  to a recorded interaction by method + path (trailing `/` ignored) + query parameters (order
  insensitive, `raw_json` ignored: prawcore adds it everywhere). `POST /api/morechildren` is
  matched by its `children` form field (as a set of ids), since every call has the same path.
  A request recorded several times is answered with its recordings in order, the last repeating.
- SYNTHESIZED, not recorded: `GET /r/<name>/new` is built from the submission objects found in
  the recorded `/comments/<id>` responses of that subreddit, newest first, honouring `limit` and
  `after`. The cassettes hold no subreddit listing for their threads, and the crawl needs one to
  start from. It is the only response this server makes up besides the token.
- Tests may add headers to answers (`extra_headers`, e.g. X-Ratelimit-*) or replace an answer by an
  error status (`fail_with`, e.g. 429); both are plain callables of (method, path). `token_answer`
  (status, content type, body) replaces the token, e.g. by a proxy's HTML login page.
- Anything else gets a 404 with a JSON error body and is kept in `unmatched`, so a test can
  assert that the crawl asked for nothing the recording does not hold.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from base64 import b64decode
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

TOKEN_PATH = "/api/v1/access_token"
MORECHILDREN_PATH = "/api/morechildren"
_IGNORED_PARAMS = {"raw_json"}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "set-cookie"}


def _norm_path(path: str) -> str:
    return path.rstrip("/") or "/"


def _request_key(method: str, path: str, query: str, form: str | None) -> tuple:
    params = frozenset((k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in _IGNORED_PARAMS)
    children: frozenset = frozenset()
    if _norm_path(path) == MORECHILDREN_PATH:
        fields = dict(parse_qsl(form or ""))
        children = frozenset(c for c in fields.get("children", "").split(",") if c)
        params = frozenset()  # only `children` tells morechildren calls apart
    return method.upper(), _norm_path(path), params, children


@dataclass
class Recorded:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    """One request the server saw and the status it answered."""

    method: str
    path: str
    query: str
    form: str | None
    status: int
    matched: bool
    at: float  # time.monotonic() when the request arrived


@dataclass
class _Routes:
    recorded: dict[tuple, list[Recorded]] = field(default_factory=lambda: defaultdict(list))
    served: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))
    submissions: dict[str, dict[str, dict]] = field(default_factory=lambda: defaultdict(dict))


def _load(cassettes: list[Path]) -> _Routes:
    routes = _Routes()
    for path in cassettes:
        for interaction in json.loads(Path(path).read_text())["interactions"]:
            request, response = interaction["request"], interaction["response"]
            url = urlsplit(request["uri"])
            if _norm_path(url.path) == TOKEN_PATH:
                continue
            body = (response.get("body") or {}).get("string", "")
            headers = {k: v[0] if isinstance(v, list) else v for k, v in (response.get("headers") or {}).items()
                       if k.lower() not in _HOP_HEADERS}
            key = _request_key(request["method"], url.path, url.query, request.get("body"))
            routes.recorded[key].append(Recorded(response["status"]["code"], headers, body.encode()))
            _collect_submissions(url.path, body, routes)
    return routes


def _collect_submissions(path: str, body: str, routes: _Routes) -> None:
    """Remember the submission object of each recorded `/comments/<id>` response."""
    parts = _norm_path(path).split("/")
    if len(parts) != 3 or parts[1] != "comments":
        return
    try:
        listing = json.loads(body)[0]
    except (ValueError, IndexError, KeyError, TypeError):
        return
    for child in listing.get("data", {}).get("children", []):
        if child.get("kind") == "t3":
            data = child["data"]
            routes.submissions[data["subreddit"].lower()][data["id"]] = child


class RedditReplay:
    """The stand-in for reddit.com. Use as a context manager; `url` is its base URL."""

    def __init__(self, cassettes: list[Path], client_id: str | None = None, client_secret: str | None = None,
                 extra_headers: Callable[[str, str], dict[str, str]] | None = None,
                 fail_with: Callable[[str, str], int | None] | None = None,
                 token_answer: tuple[int, str, bytes] | None = None):
        self.routes = _load(cassettes)
        self.credentials = (client_id, client_secret) if client_id else None
        # (method, path) -> headers added to that answer, e.g. X-Ratelimit-* to exercise prawcore's limiter
        self.extra_headers = extra_headers or (lambda method, path: {})
        # (method, path) -> an error status to answer instead (e.g. 429 Too Many Requests), or None
        self.fail_with = fail_with or (lambda method, path: None)
        self.token_answer = token_answer  # (status, content type, body) answered instead of a token
        self.token = secrets.token_hex(16)
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="reddit-replay", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def unmatched(self) -> list[Exchange]:
        return [e for e in self.exchanges if not e.matched]

    def api_requests(self) -> list[Exchange]:
        return [e for e in self.exchanges if _norm_path(e.path) != TOKEN_PATH]

    def __enter__(self) -> RedditReplay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ answering

    def answer(self, method: str, path: str, query: str, form: str | None,
               headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, bool]:
        if _norm_path(path) == TOKEN_PATH and method == "POST":
            return self._token(headers)
        if headers.get("authorization") != f"bearer {self.token}":
            return _json(401, {"message": "Unauthorized", "error": 401}) + (True,)
        if (status := self.fail_with(method, path)) is not None:
            return _json(status, {"message": "injected by the test", "error": status}) + (True,)
        if method == "GET" and _is_new_listing(path):
            return self._new_listing(path, query) + (True,)
        key = _request_key(method, path, query, form)
        with self._lock:
            recordings = self.routes.recorded.get(key)
            if not recordings:
                return _json(404, {"message": "Not Found", "error": 404}) + (False,)
            index = min(self.routes.served[key], len(recordings) - 1)
            self.routes.served[key] += 1
        rec = recordings[index]
        return rec.status, rec.headers, rec.body, True

    def _token(self, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, bool]:
        if self.token_answer is not None:
            status, content_type, body = self.token_answer
            return status, {"Content-Type": content_type}, body, True
        if self.credentials is not None:
            auth = headers.get("authorization", "")
            try:
                given = b64decode(auth.removeprefix("Basic ")).decode().split(":", 1)
            except ValueError:
                given = []
            if not auth.startswith("Basic ") or tuple(given) != self.credentials:
                return _json(401, {"message": "Unauthorized", "error": 401}) + (True,)
        body = {"access_token": self.token, "token_type": "bearer", "expires_in": 3600, "scope": "*"}
        return _json(200, body) + (True,)

    def _new_listing(self, path: str, query: str) -> tuple[int, dict[str, str], bytes]:
        """SYNTHESIZED `/r/<name>/new` from the recorded submissions (see the module docstring)."""
        name = _norm_path(path).split("/")[2].lower()
        params = dict(parse_qsl(query))
        things = sorted(self.routes.submissions.get(name, {}).values(),
                        key=lambda t: (-t["data"]["created_utc"], t["data"]["id"]))
        if "after" in params:
            names = [t["data"]["name"] for t in things]
            start = names.index(params["after"]) + 1 if params["after"] in names else len(things)
            things = things[start:]
        limit = int(params.get("limit", 25))
        page, rest = things[:limit], things[limit:]
        after = page[-1]["data"]["name"] if rest and page else None
        listing = {"kind": "Listing", "data": {"after": after, "before": None, "dist": len(page),
                                               "children": page}}
        return _json(200, listing)


def _is_new_listing(path: str) -> bool:
    parts = _norm_path(path).split("/")
    return len(parts) == 4 and parts[1] == "r" and parts[3] == "new"


def _json(status: int, value: object) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json; charset=UTF-8"}, json.dumps(value).encode()


def _handler_for(replay: RedditReplay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as requests' session expects

        def _serve(self) -> None:
            arrived = time.monotonic()
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            form = self.rfile.read(length).decode() if length else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out_headers, body, matched = replay.answer(self.command, url.path, url.query, form, headers)
            with replay._lock:
                replay.exchanges.append(Exchange(self.command, url.path, url.query, form, status, matched,
                                                 arrived))
            self.send_response(status)
            for key, value in {**out_headers, **replay.extra_headers(self.command, url.path)}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:  # the client asked for it (prawcore does on token requests): say so,
                self.send_header("Connection", "close")  # or its pool reuses a socket we are closing
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass  # the exchanges list is the log; stderr stays clean for the tests that read it

    return Handler
