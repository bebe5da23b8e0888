"""The report's content model (sections of figures, tables and example texts) and its HTML page.

The page is one Jinja2 template (`templates/report.html.j2`, shipped as package data) with autoescaping on:
every text that comes from Reddit is escaped, and a Content-Security-Policy forbids scripts and every
fetch but the page's own data URIs, so the file opens anywhere (file:// included) without a request.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import jinja2
from markupsafe import Markup, escape

from ahf import __version__


@dataclass
class Figure:
    title: str
    caption: str  # one line: what the figure shows
    src: str  # a data URI (figures.render)
    wide: bool = False  # spans the page's width (several panels side by side)


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list]


@dataclass
class Example:
    """One example (a turn, a pair): its facts (scores, ids) and its texts (context, reply, ...)."""
    title: str
    facts: list[tuple[str, object]]
    texts: list[tuple[str, str]]


@dataclass
class Section:
    id: str
    title: str
    lead: str  # one line: what the section shows
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    facts: list[tuple[str, object]] = field(default_factory=list)  # headline counts, shown as tiles
    notes: list[str] = field(default_factory=list)
    missing: str | None = None  # the section could not be drawn: why, and what to run

    def summary(self) -> dict:
        return {"id": self.id, "title": self.title, "figures": len(self.figures), "examples": len(self.examples),
                "missing": self.missing}


def clip(text: str | None, limit: int, keep_end: bool = False) -> str:
    """`text` cut to about `limit` characters at a word boundary, marked with an ellipsis."""
    text = (text or "").strip()
    if len(text) <= limit:
        return text
    if keep_end:  # a context: its last part leads into the reply
        cut = text[-limit:]
        return "… " + cut[cut.find(" ") + 1:] if " " in cut else "… " + cut
    cut = text[:limit]
    return (cut[:cut.rfind(" ")] if " " in cut else cut) + " …"


def number(value) -> str:
    """Thousands separators for integers, three decimals for fractions, as given otherwise."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def code_spans(text: str) -> Markup:
    """`text` escaped, with its `backticked` parts set as code."""
    parts = str(escape(text)).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def render_page(sections: list[Section], inputs: list[tuple[str, str]]) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("ahf.report", "templates"),
                             autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = number
    env.filters["code"] = code_spans
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env.get_template("report.html.j2").render(sections=sections, inputs=inputs, version=__version__,
                                                     generated=generated)
