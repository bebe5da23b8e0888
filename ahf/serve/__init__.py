"""`ahf serve`: browse a store in a local web app (docs/serve.md).

Search turns by dialog act, text (the hybrid BM25 + dense ranking of `ahf query`) and subreddit;
open a thread as an indented tree with each reply's act, tier, adjusted score, reply sentiment and
pairs; browse pairs by rule; download any selection as the TRL JSONL rows `ahf export` writes for
it. Starlette + Jinja2 templates + one stylesheet, all served by the app (no script, no CDN).

Python: `create_app(store_dir, index_dir=None)` is the ASGI app (run it with any ASGI server);
`running(app)` serves it from a thread on a free loopback port (tests, benchmarks). Heavy imports
(starlette, uvicorn, the index) happen inside the functions, so `ahf --help` stays fast.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ahf.args import add_config, add_json, add_store
from ahf.console import UserError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765


def create_app(store_dir: str | Path, index_dir: str | Path | None = None, export_config=None,
               allowed_hosts: list[str] | None = None):
    """The explorer's ASGI app over the store at `store_dir` (read-only, opened once), its indexes
    under `index_dir` (default STORE/index); `export_config` (feedback.labels.ExportConfig, default
    configs/labels.yaml) decides the download rows as it does `ahf export`'s. It answers loopback
    Host names only unless `allowed_hosts` says otherwise (["*"]: any). `app.close()` releases the store."""
    from ahf.serve.app import build_app

    return build_app(store_dir, index_dir, export_config, allowed_hosts)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that could resolve to any interface


def check_host(host: str, public: bool) -> None:
    if not is_loopback(host) and not public:
        raise UserError(f"--host {host} is not a loopback address: the explorer has no login, and anyone who "
                        "can reach it reads the whole store. Pass --public to serve it there anyway")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 takes a free one."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # response's headers and body (two writes) wait out the client's delayed ACK on a kept-alive
    # connection (40 ms a page)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                         server_header=False, proxy_headers=False))


@contextmanager
def running(app, host: str = DEFAULT_HOST, port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread (uvicorn) during the block; yields its base URL."""
    sock = listen(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ahf-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the explorer's server stopped while starting")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="browse a store in a local web app: search acts, threads, pairs; "
                                            "download selections as TRL JSONL")
    add_store(p)
    p.add_argument("--index-dir", metavar="DIR", help="the index root (default: STORE/index)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}); one that is not loopback needs --public")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    p.add_argument("--public", action="store_true",
                   help="allow a --host that other machines reach (e.g. 0.0.0.0). The explorer has no login "
                        "and no TLS: everyone who reaches the port reads every text and download of the store. "
                        "It also answers any Host name then, not only loopback ones")
    add_config(p, "labels")  # the export config: downloads are the rows `ahf export` writes with it
    add_json(p)
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    from rich.markup import escape

    from ahf.config import load_config
    from ahf.console import emit, stderr
    from feedback.labels import LabelConfig

    check_host(args.host, args.public)
    config = load_config(LabelConfig, "labels", args.config, args.set).export
    sock = listen(args.host, args.port)
    app = create_app(args.store, args.index_dir, config, allowed_hosts=["*"] if args.public else None)
    try:
        if not args.json:
            stderr.print("loading the search indexes…", highlight=False)
        app.state.explorer.warm()
    except UserError as exc:  # a busy store, or no index yet: the pages say so; serve anyway
        stderr.print(f"[yellow]note:[/yellow] {escape(str(exc))}", highlight=False)
    url = url_of(sock)
    emit({"url": url, "store": str(args.store), "public": args.public}, args.json,
         f"serving {args.store} at {url} (read-only; Ctrl-C stops)")
    server = _server(app)
    try:
        server.run(sockets=[sock])
    finally:
        app.close()
        sock.close()
    # Stopped by a signal (Ctrl-C, SIGTERM): uvicorn re-raises it after its graceful shutdown, which the CLI
    # turns into exit 130; that re-raise can land after the event loop's last step and be lost (once in a
    # CI run: exit 0), so the code does not depend on it
    return 130 if server.should_exit else 0
