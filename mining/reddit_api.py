"""Walk Reddit API JSON (and BigQuery-style arrays, and recorded API cassettes) into records.

Yields `(where, record)` pairs: `record` is a post or comment dict as Reddit's API or Pushshift
writes it, or a `str` reason for an item that is counted as a skip (a `more` stub, a subreddit
`t5` object, an array item that is not a record...): every item of an array of records is
accounted for. Reasons come from a fixed set, whatever the document holds. `where` is a path-like
location inside the document for error messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

_WANTED_KINDS = {"t1", "t3"}
_REDDIT_KIND = re.compile(r"t[0-9]|Listing|more|LabeledMulti|LiveUpdate(Event)?|modaction|wikipage|UserList|TrophyList")


def iter_document(value: Any, where: str = "$") -> Iterator[tuple[str, dict | str]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            at = f"{where}[{i}]"
            if isinstance(item, list):
                yield from iter_document(item, at)
            elif not isinstance(item, dict):  # a string, number, true or null where records stand
                yield at, "not_an_object"
            elif "kind" in item:
                yield from _thing(item, at)
            elif "id" in item or "name" in item:
                yield at, item  # BigQuery / Pushshift record in an array
            elif "interactions" in item or "json" in item:
                yield from iter_document(item, at)
            else:  # an object in an array of records that is none
                yield at, "unknown_kind"
    elif isinstance(value, dict):
        if "interactions" in value:
            yield from _cassette(value, where)
        elif "kind" in value:
            yield from _thing(value, where)
        elif "json" in value:  # /api/morechildren
            data = value["json"].get("data") if isinstance(value["json"], dict) else None
            things = data.get("things") if isinstance(data, dict) else None
            if isinstance(things, list):
                yield from iter_document(things, f"{where}.json.data.things")
        elif "id" in value or "name" in value:
            yield where, value
        # other objects (an OAuth token, an error body) carry no records


def _thing(thing: Any, where: str) -> Iterator[tuple[str, dict | str]]:
    if not isinstance(thing, dict):
        yield where, "not_an_object"
        return
    kind, data = thing.get("kind"), thing.get("data")
    if kind == "Listing":
        children = data.get("children") if isinstance(data, dict) else None
        if not isinstance(children, list):
            yield where, "bad_listing"
            return
        for i, child in enumerate(children):
            yield from _thing(child, f"{where}.children[{i}]")
        return
    if kind == "more":
        yield where, "more_stub"
        return
    if kind not in _WANTED_KINDS or not isinstance(data, dict):
        known = isinstance(kind, str) and _REDDIT_KIND.fullmatch(kind)
        yield where, f"unsupported_kind:{kind if known else 'other'}"
        return
    yield where, data
    replies = data.get("replies")
    if isinstance(replies, dict):
        yield from _thing(replies, f"{where}.replies")


def _cassette(value: dict, where: str) -> Iterator[tuple[str, dict | str]]:
    interactions = value.get("interactions")
    for i, interaction in enumerate(interactions if isinstance(interactions, list) else []):
        response = interaction.get("response") if isinstance(interaction, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        body = body.get("string") if isinstance(body, dict) else None
        if not body or not isinstance(body, str):
            continue  # no recorded body: a request that returned nothing
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue  # non-JSON responses (HTML error pages) hold no records
        yield from iter_document(decoded, f"{where}.interactions[{i}]")
