"""The dataset card (`README.md`) of an export: counts, distributions with PNG plots, config, provenance."""

from __future__ import annotations

import json
from pathlib import Path

_FORMAT_TEXT = {
    "pairs": "Preference pairs for reward modelling / DPO: `prompt`, `chosen`, `rejected`, `margin` "
             "(TRL's RewardTrainer subtracts `margin` inside its loss). `rule` says which rule made the pair.",
    "pointwise": "Pointwise labels: `prompt`, `completion`, `label` (true when the tier is good), `tier` "
                 "(good / ok / bad by quantiles of the adjusted ranking), `reward` (adjusted vote and reply "
                 "sentiment combined).",
    "sft": "Supervised fine-tuning rows: `prompt`, `completion` (replies of the exported tiers).",
}


def _plot_counts(table: dict, by: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(table)
    values = sorted({v for per in table.values() for v in per})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(splits))
    for k, split in enumerate(splits):
        xs = [i + k * width for i in range(len(values))]
        ax.bar(xs, [table[split].get(v, 0) for v in values], width, label=split)
    ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(values))], [str(v) for v in values])
    ax.set_ylabel("rows")
    ax.set_title(f"rows by {by} and split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_hist(values: list[float], name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=40)
    ax.set_xlabel(name)
    ax.set_ylabel("rows")
    ax.set_title(f"{name} (sample of up to 20,000 rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_card(out: Path, fmt: str, report, config, labels_config: dict | None, provenance: dict,
               counts: dict) -> None:
    plots = out / "plots"
    plots.mkdir()
    lines = [f"# ahf export: {fmt}", "", _FORMAT_TEXT[fmt], "",
             "Text is Reddit users' content, mined from the store listed under Provenance. "
             "Check the terms of the source data before sharing or training a released model on it.", "",
             "## Splits (by post id: no post in two splits)", "",
             "| split | rows | posts |", "|---|---:|---:|"]
    lines += [f"| {s} | {report.rows[s]:,} | {report.posts[s]:,} |" for s in report.rows]
    lines += ["", f"Candidates {report.candidates:,}; dropped: " +
              ", ".join(f"{k} {v:,}" for k, v in report.dropped.items()) + "."]
    if report.act:
        lines += [f"Filtered to turns tagged with act `{report.act}`."]
    lines += ["", "Files: `{split}.jsonl`, `{split}.parquet`, `dataset/` "
              "(`datasets.load_from_disk(\"dataset\")`).", ""]
    by, table = counts["by"], counts["table"]
    lines += [f"## Distribution by {by}", "", "| split | " + " | ".join(sorted({v for p in table.values() for v in p}))
              + " |"]
    values = sorted({v for p in table.values() for v in p})
    lines += ["|---|" + "---:|" * len(values)]
    lines += [f"| {s} | " + " | ".join(f"{table[s].get(v, 0):,}" for v in values) + " |" for s in table]
    if table:
        _plot_counts(table, by, plots / f"{by}.png")
        lines += ["", f"![rows by {by}](plots/{by}.png)"]
    for name, sample in counts["values"].items():
        if sample:
            _plot_hist(sample, name, plots / f"{name}.png")
            lines += ["", f"![{name}](plots/{name}.png)"]
    lines += ["", "Top subreddits: " + ", ".join(f"{k} ({v:,})" for k, v in counts["subreddits"].items()), ""]
    lines += ["## Config", "", "Export (`configs/labels.yaml: export`):", "", "```json",
              json.dumps(config.model_dump(mode="json"), indent=1), "```", "",
              "Labels (the store's `meta.labels_config`, written by `ahf label`):", "", "```json",
              json.dumps(labels_config, indent=1) if labels_config else "(not recorded)",
              "```", "", "## Provenance", "", "```json", json.dumps(provenance, indent=1), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
