"""Fuzz the whole pipeline with mutated real records, at volume, and report what it finds.

    python bench/fuzz.py --records 100000 [--per-case 500] [--seed 0] [--json] [--doc docs/bench/fuzz.md]

Each case is `--per-case` real records from ../shared/data (some mutated: types, ranges, unicode,
surrogates, control bytes, truncation, duplicate keys, NaN, deep nesting; tests/fuzz_records.py) in
one of the formats `ahf ingest` reads (plain NDJSON, zst, gz, bz2, xz, an API listing, a BigQuery
array, a truncated zst), ingested into a fresh store and taken through turns, label and the three
exports. A case fails when any stage raises or a promise breaks (exact accounting, skip reasons from
the fixed set). The CI test (tests/test_fuzz.py) runs the same checks on 40 small cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(os.environ.get("AHF_SHARED_DATA", REPO.parent / "shared" / "data"))

from fuzz_records import FORMATS, check_case, make_case, real_records  # noqa: E402


def run(records_goal: int, per_case: int, seed: int, progress: bool) -> dict:
    records = real_records(SHARED)
    rng = random.Random(seed)
    skipped, failures, by_format = Counter(), [], Counter()
    cases = done = 0
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ahf-fuzz-"))
    try:
        while done < records_goal:
            case_seed, fmt = rng.randrange(2**32), FORMATS[cases % len(FORMATS)]
            case_dir = work / f"case-{cases}"
            case_dir.mkdir()
            try:
                skipped.update(check_case(*make_case(records, random.Random(case_seed), per_case, fmt), case_dir))
            except Exception as exc:  # what the fuzzer found: kept with what reproduces it
                failures.append({"seed": case_seed, "format": fmt, "records": per_case,
                                 "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                 "where": traceback.format_exc().strip().splitlines()[-3:]})
            shutil.rmtree(case_dir, ignore_errors=True)
            cases, done = cases + 1, done + per_case
            by_format[fmt] += 1
            if progress and cases % 20 == 0:
                print(f"  {done:,} records, {cases} cases, {len(failures)} failures, "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"records": done, "cases": cases, "per_case": per_case, "seed": seed, "by_format": dict(by_format),
            "seconds": round(time.perf_counter() - started, 1), "failures": failures,
            "skipped": dict(skipped.most_common()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}


def to_markdown(result: dict) -> str:
    lines = ["# Fuzzing the pipeline (`bench/fuzz.py`)", "",
             f"{result['records']:,} real records in {result['cases']} cases of {result['per_case']} "
             f"(seed {result['seed']}; formats {result['by_format']}), each ingested into a fresh store and taken "
             f"through turns, label and the three exports: **{len(result['failures'])} failures** in "
             f"{result['seconds']:,} s on {result['machine']}.", "",
             "| skip reason | records |", "|---|---:|"]
    lines += [f"| `{reason}` | {n:,} |" for reason, n in result["skipped"].items()]
    if result["failures"]:
        lines += ["", "## Failures (reproduce: `make_case(real_records(...), random.Random(seed), records, format)`)", ""]
        lines += [f"- seed {f['seed']}, {f['format']}: {f['error']}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--per-case", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", help="write the report as Markdown here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.records, args.per_case, args.seed, progress=not args.json)
    if args.doc:
        Path(args.doc).write_text(to_markdown(result))
    print(json.dumps(result, indent=None if args.json else 1))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
