"""`ahf report`: one self-contained HTML page that shows what was mined and what was learnt from it.

Sections (docs/report.md says what each figure shows): corpus, dialog acts, votes, reply sentiment and
preference pairs from a store (`ahf.report.store_sections`), then one section per reward model and per
export given (`ahf.report.model_sections`). Figures are matplotlib SVGs embedded as data URIs, the page
is a Jinja2 template shipped with the package (`templates/report.html.j2`); the file needs nothing else,
so it opens from a file:// URL, offline, and can be mailed or archived as it is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ahf.console import UserError
from ahf.report.page import Section, Table, render_page


def build_report(out: str | Path, store: str | Path | None = None, models: list[str | Path] = (),
                 exports: list[str | Path] = (), pairs: str | Path | None = None,
                 validation: dict | None = None) -> dict:
    """Write the report to `out` (replaced atomically) and return what it holds (`ahf report --json`).

    `store`: the store directory (its five sections; a missing table is named with what to run);
    `models`: model directories (reward models get held-out accuracy by margin and length-controlled
    accuracy; `pairs` scores them on that pairs file instead of their own held-out pairs); `exports`:
    `ahf export` directories; `validation`: figures measured against a known truth (e.g. `ahf demo`'s),
    shown first as a table of name -> value.
    """
    from ahf.report.model_sections import export_section, model_section
    from ahf.report.store_sections import store_sections

    if store is None and not models and not exports:
        raise UserError("nothing to report: give --store, --model or --export")
    if pairs is not None and not Path(pairs).is_file():
        raise UserError(f"--pairs {pairs}: no such file")
    started = time.perf_counter()
    sections: list[Section] = []
    if validation:
        sections.append(Section("validation", "Validation", "The method measured against a known truth.",
                                tables=[Table("Figures of the run that wrote this report.", ["figure", "value"],
                                              [[k, v] for k, v in validation.items()])]))
    if store is not None:
        sections += store_sections(store)
    model_summaries, export_summaries = [], []
    for index, directory in enumerate(models, 1):
        section, summary = model_section(directory, index, pairs)
        sections.append(section)
        model_summaries.append(summary)
    for index, directory in enumerate(exports, 1):
        section, summary = export_section(directory, index)
        sections.append(section)
        export_summaries.append(summary)
    inputs = [("store", str(store))] if store is not None else []
    inputs += [("model", str(m)) for m in models] + [("export", str(e)) for e in exports]
    inputs += [("pairs", str(pairs))] if pairs is not None else []
    html = render_page(sections, inputs)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(html, encoding="utf-8")
    partial.replace(path)  # a reader never sees half a page
    return {"out": str(path), "bytes": len(html.encode("utf-8")),
            "figures": sum(len(s.figures) for s in sections), "sections": [s.summary() for s in sections],
            "models": model_summaries, "exports": export_summaries,
            "seconds": round(time.perf_counter() - started, 3)}
