"""Walk Reddit API JSON (and BigQuery-style arrays, and recorded API cassettes) into records.

Yields `(where, record)` pairs: `record` is a post or comment dict as Reddit's API or Pushshift
writes it, or a `str` reason for an item that is counted as a skip (a `more` stub, a subreddit
`t5` object...). `where` is a path-like location inside the document for error messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

_WANTED_KINDS = {"t1", "t3"}


def iter_document(value: Any, where: str = "$") -> Iterator[tuple[str, dict | str]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict) and "kind" in item:
                yield from _thing(item, f"{where}[{i}]")
            elif isinstance(item, dict) and ("id" in item or "name" in item):
                yield f"{where}[{i}]", item  # BigQuery / Pushshift record in an array
            else:
                yield from iter_document(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        if "interactions" in value:
            yield from _cassette(value, where)
        elif "kind" in value:
            yield from _thing(value, where)
        elif "json" in value:  # /api/morechildren
            things = (value.get("json") or {}).get("data", {}).get("things", [])
            yield from iter_document(things, f"{where}.json.data.things")
        elif "id" in value or "name" in value:
            yield where, value
        # other objects (an OAuth token, an error body) carry no records


def _thing(thing: dict, where: str) -> Iterator[tuple[str, dict | str]]:
    kind, data = thing.get("kind"), thing.get("data")
    if kind == "Listing":
        for i, child in enumerate((data or {}).get("children", [])):
            yield from _thing(child, f"{where}.children[{i}]")
        return
    if kind == "more":
        yield where, "more_stub"
        return
    if kind not in _WANTED_KINDS or not isinstance(data, dict):
        yield where, f"unsupported_kind:{kind}"
        return
    yield where, data
    replies = data.get("replies")
    if isinstance(replies, dict):
        yield from _thing(replies, f"{where}.replies")


def _cassette(value: dict, where: str) -> Iterator[tuple[str, dict | str]]:
    for i, interaction in enumerate(value.get("interactions", [])):
        body = ((interaction.get("response") or {}).get("body") or {}).get("string", "")
        if not body:
            continue
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue  # non-JSON responses (HTML error pages) hold no records
        yield from iter_document(decoded, f"{where}.interactions[{i}]")
