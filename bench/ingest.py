"""Benchmark of `ahf ingest` against the baselines a user would reach for, on a dump-shaped input.

    python bench/ingest.py --comments 1000000 --memory-sizes 250000 2000000 --workdir /tmp/ahf-bench-ingest \
        [--repeat 3] [--json] [--doc docs/bench/ingest.md] [--compare-tree DIR --compare-label TEXT]

The input is the real December 2005 comment dump (../shared/data/pushshift/RC_2005-12.zst,
1,075 comments) repeated with fresh ids: copy k adds k * 36**7 to every base-36 id, in `id` and in
the `t1_`/`t3_` ids of `parent_id` and `link_id`, so every copy is the same forest of trees (its
orphans stay orphans) under new ids. It is written as zstd with a 2 GiB window and long-distance
matching, as the Pushshift / Arctic Shift dumps are (`zstd --long=31`). Being repeats, it
compresses ~30x where real dumps compress 5-20x, which makes its raw decode unusually cheap; so
the raw decode is also measured on the real dumps' own compressibility (the anchors below).

Measured in one run, each in its own process (wall time from start to exit, CPU = user + sys of
the process and its children, peak RSS from `wait4`):
- raw decode: `zstd -dc --long=31 FILE | wc -l` (lines/s);
- raw decode anchors at real compressibility: the real RC_2005-12.zst and RS_2019-10_AskWomen.zst
  files concatenated (as zstd frames) to about --comments lines each;
- `json.loads` over a python-zstandard stream, and the same with `orjson.loads`;
- DuckDB `read_json` on the .zst directly (it refuses the 2 GiB window: the error is shown), then
  decompress to a file with the zstd CLI + DuckDB `read_json` into a table with the store's
  schema: both steps counted;
- `ahf ingest FILE --store DIR --no-turns --json` end to end (streaming, no decompressed copy),
  at more sizes, to show that its peak memory does not grow with the input beyond the decoder's
  window (which `zstd -d` pays too: min(2 GiB, decompressed size));
- the ingest's own stages alone, one after another in one thread: the reader, + the block parser,
  + the store writes of the parsed batches; the CPU each adds is what any overlap of the stages
  must spend, so their sum bounds the rate on the machine's cores (and what the ingest spends
  beyond it is the cost of running them side by side);
- with --compare-tree, the same `ahf ingest` and stage workers from another checkout (the
  version before a change), in the same run, under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The DuckDB-file store, as the figures this benchmark is compared with (docs/bench/ingest.md) were
# measured; bench/scale.py compares it with Delta, the default for a new store.
os.environ.setdefault("AHF_STORE_FORMAT", "duckdb")
SOURCE = REPO.parent / "shared" / "data" / "pushshift" / "RC_2005-12.zst"
ID_STRIDE = 36**7  # larger than any base-36 id of 2005, so copies never collide
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
RAW = "raw decode: zstd -dc --long=31 FILE | wc -l"
DUCKDB = "DuckDB: zstd -d to a file, then read_json into the store schema (both steps)"
INGEST = "ahf ingest FILE --no-turns (streaming, into the store)"
JSON_LOOP = "json.loads loop (python-zstandard stream)"
ORJSON_LOOP = "orjson loop (python-zstandard stream)"
PARSE = "parse + check blocks (DuckDB JSON reader, to Arrow)"
READ = "start-up + decompress + cut into line blocks (reader thread)"
WRITE = "store writes alone (the parsed batches, INSERT in one thread)"
STORE = "store writes and summary queries (DuckDB), CLI imports"
PIPELINE = "running side by side (threads, contention), summary queries, CLI imports"
INGEST_BEFORE = "ahf ingest FILE --no-turns, version before this change (same run)"
ANCHORS = {  # the real files, concatenated: their own compressibility and line lengths
    "RC_2005-12.zst (comments, the records of the input above)": "RC_2005-12.zst",
    "RS_2019-10_AskWomen.zst (submissions, 2019 schema)": "RS_2019-10_AskWomen.zst",
}


# ---------------------------------------------------------------- input

def _base36(number: int) -> str:
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = _DIGITS[rest] + out
        if not number:
            return out


def _shift(bare_id: str, offset: int) -> str:
    value = int(bare_id, 36)
    if value >= ID_STRIDE:
        raise ValueError(f"id {bare_id} does not fit under the copy stride")
    return _base36(value + offset)


def base_records(source: Path = SOURCE) -> list[dict]:
    import orjson
    import zstandard

    with open(source, "rb") as fh:
        data = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh, read_across_frames=True).read()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def scaled_lines(records: list[dict], n: int):
    """`n` NDJSON lines: the base records again and again, each copy under fresh ids."""
    import orjson

    written = copy = 0
    while written < n:
        offset = copy * ID_STRIDE
        chunk = records[: n - written]
        for record in chunk:
            record = dict(record)
            record["id"] = _shift(record["id"], offset)
            for key in ("parent_id", "link_id"):
                record[key] = record[key][:3] + _shift(record[key][3:], offset)
            if "name" in record:
                record["name"] = "t1_" + record["id"]
            yield orjson.dumps(record) + b"\n"
        written += len(chunk)
        copy += 1


def write_input(path: Path, n: int) -> Path:
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True, threads=2)
    compressor = zstandard.ZstdCompressor(compression_params=params)
    records = base_records()
    with open(path, "wb") as fh, compressor.stream_writer(fh) as writer:
        batch: list[bytes] = []
        for line in scaled_lines(records, n):
            batch.append(line)
            if len(batch) >= 10_000:
                writer.write(b"".join(batch))
                batch = []
        writer.write(b"".join(batch))
    return path


# ---------------------------------------------------------------- workers (run in their own process)

def worker_json(path: str, use_orjson: bool) -> int:
    import io

    import zstandard

    if use_orjson:
        import orjson
        loads = orjson.loads
    else:
        loads = json.loads
    n = 0
    with open(path, "rb") as fh:
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh, read_across_frames=True)
        for line in io.BufferedReader(reader, 1 << 20):
            loads(line)
            n += 1
    return n


_DUCKDB_COLUMNS = ("{'id': 'VARCHAR', 'link_id': 'VARCHAR', 'parent_id': 'VARCHAR', 'author': 'VARCHAR', "
                   "'body': 'VARCHAR', 'score': 'BIGINT', 'created_utc': 'DOUBLE', 'subreddit': 'VARCHAR', "
                   "'distinguished': 'VARCHAR', 'stickied': 'BOOLEAN', 'retrieved_on': 'BIGINT'}")


def worker_stage(stage: str, path: str, store_dir: str | None = None) -> int:
    """The ingest's own stages one after another in one thread: the reader alone (`read`), with the
    block parser (`parse`), and with the store writes of the parsed batches too (`write`)."""
    sys.path.insert(0, str(REPO))
    from mining.normalize import BlockParser
    from mining.readers import read_items

    rows = 0
    with BlockParser() as parser, _StageWriter(store_dir) as writer:
        for block in read_items(Path(path)):
            if stage == "read":
                rows += block.n_lines
                continue
            parsed = parser.parse(block.parts, block.n_lines)
            rows += parsed.comments.num_rows + parsed.posts.num_rows
            if stage == "write":
                writer.add(parsed)
    return rows


class _StageWriter:
    """The ingest's store writes (same settings and batches), in the caller's thread; off without a store."""

    def __init__(self, store_dir: str | None):
        self.store = self.rows = None
        if store_dir:
            from mining.ingest import DEFAULT_BATCH_ROWS, _bulk_load
            from mining.normalize import RowBuffer
            from mining.store import Store

            self.store, self.rows, self.batch = Store(store_dir), RowBuffer(), DEFAULT_BATCH_ROWS
            _bulk_load(self.store).__enter__()  # the store is closed with the writer, threads and all

    def add(self, parsed) -> None:
        self.rows.add_tables(parsed.comments, parsed.posts)
        while len(self.rows) >= self.batch:
            self.store.upsert(*self.rows.take(self.batch))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.store:
            if len(self.rows) and not exc[0]:
                self.store.upsert(*self.rows.take())
            self.store.close()


def worker_duckdb_zst(path: str) -> str:
    import duckdb

    try:
        duckdb.connect().sql(f"SELECT count(*) FROM read_json('{path}', format='newline_delimited')").fetchall()
    except duckdb.Error as exc:
        return str(exc).splitlines()[0]
    return "no error: DuckDB read the long-window file"


def worker_duckdb_file(ndjson: str, store_dir: str) -> int:
    sys.path.insert(0, str(REPO))
    from mining.store import Store

    with Store(store_dir) as store:  # the same tables and types as `ahf ingest`
        store.con.execute("SET enable_progress_bar = false")
        store.con.execute(
            "INSERT INTO comments SELECT id, link_id, parent_id, author, body, score, "
            "floor(created_utc)::BIGINT, subreddit, distinguished, stickied, retrieved_on "
            f"FROM read_json('{ndjson}', format='newline_delimited', columns={_DUCKDB_COLUMNS})"
        )
        return store.count("comments")


# ---------------------------------------------------------------- measuring

def measure(argv: list[str], stdout_path: Path | None = None, cwd: Path = REPO) -> dict:
    """Run argv; wall, CPU (user+sys incl. its children) and peak RSS of that process tree.

    It runs under a fresh, small Python (`--probe`) that starts it and reads its rusage with
    wait4: a child forked straight from this process would report this process's own peak RSS
    as its floor (Linux carries the pre-exec high-water mark over into ru_maxrss).
    """
    probe_out = Path(os.environ.get("TMPDIR", "/tmp")) / f"ahf-bench-probe-{os.getpid()}.json"
    wait_for_idle()
    busy_before = busy_cpu_seconds()
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        done = subprocess.run([sys.executable, "-S", str(Path(__file__).resolve()), "--probe", str(probe_out),
                               *argv], stdout=out, stderr=subprocess.PIPE, cwd=cwd)
    finally:
        if stdout_path:
            out.close()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    result = json.loads(probe_out.read_text())
    probe_out.unlink()
    # CPU that other jobs on the machine used meanwhile: the machine-wide busy time minus ours
    result["others_cpu_s"] = max(0.0, busy_cpu_seconds() - busy_before - result["cpu_s"])
    return result


IDLE_WAIT_S = 0.0  # set from --wait-idle


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU time so far (all cores), from /proc/stat; 0 where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle() -> None:
    """Up to IDLE_WAIT_S seconds for a 2-second window in which the machine is at least 90 % idle."""
    deadline = time.monotonic() + IDLE_WAIT_S
    cores = os.cpu_count() or 1
    while time.monotonic() < deadline:
        before = busy_cpu_seconds()
        time.sleep(2)
        if busy_cpu_seconds() - before < 0.1 * 2 * cores:
            return


def probe(out: str, argv: list[str]) -> int:
    started = time.perf_counter()
    process = subprocess.Popen(argv)  # in the probe's own working directory (measure's cwd)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    Path(out).write_text(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                                     "peak_rss_mb": usage.ru_maxrss / 1024}))
    return os.waitstatus_to_exitcode(status)


def best(runs: list[dict]) -> dict:
    """The fastest of the repeats (the machine is shared: the minimum is the least disturbed)."""
    return min(runs, key=lambda r: r["wall_s"])


def repeat(times: int, fn) -> dict:
    runs = [fn() for _ in range(times)]
    return {**best(runs), "cpu_runs_s": [round(r["cpu_s"], 2) for r in runs]}


def repeat_alternating(times: int, fns: dict) -> dict:
    """Like `repeat` for several commands, run in turn (a, b, a, b...): load that drifts hits each alike."""
    runs: dict = {key: [] for key in fns}
    for _ in range(times):
        for key, fn in fns.items():
            runs[key].append(fn())
    return {key: {**best(r), "cpu_runs_s": [round(x["cpu_s"], 2) for x in r]} for key, r in runs.items()}


def self_cmd(*args: str, tree: Path = REPO) -> list[str]:
    return [sys.executable, str(tree / "bench" / "ingest.py"), *args]


def ingest_cmd(path: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "ahf.cli", "ingest", str(path), "--store", str(store), "--no-turns", "--json"]


def run_ingest(path: Path, work: Path, tag: str, tree: Path = REPO) -> dict:
    store = work / f"store-{tag}"
    shutil.rmtree(store, ignore_errors=True)
    report_path = work / f"ingest-{tag}.json"
    result = measure(ingest_cmd(path, store), stdout_path=report_path, cwd=tree)
    report = json.loads(report_path.read_text())
    if report["errors"] or report["skipped"]:
        raise RuntimeError(f"ingest of {path} was not clean: {report['errors']} {report['skipped']}")
    result.update(records=report["records_read"], comments_in_store=report["comments"],
                  ingest_seconds=report["seconds"], store_mb=_size_mb(store))
    shutil.rmtree(store, ignore_errors=True)
    return result


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kb = 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import duckdb
    import orjson
    import pyarrow
    import zstandard

    zstd_cli = subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout
    zstd_cli = "zstd " + next((w.rstrip(",") for w in zstd_cli.split() if w.startswith("v")), "?")
    return {"cpu": model, "cores": cores, "ram_gib": round(mem_kb / 2**20, 1), "os": platform.platform(),
            "python": platform.python_version(), "duckdb": duckdb.__version__, "pyarrow": pyarrow.__version__,
            "zstandard": zstandard.__version__, "orjson": orjson.__version__, "zstd_cli": zstd_cli}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def write_anchor(source: Path, path: Path, lines: int) -> int:
    """The real compressed file repeated as whole zstd frames to about `lines` lines; returns the line count."""
    data = source.read_bytes()
    per_copy = int(subprocess.run(["sh", "-c", f"zstd -dc --long=31 '{source}' | wc -l"], capture_output=True,
                                  text=True, check=True).stdout)
    copies = max(1, round(lines / per_copy))
    with open(path, "wb") as fh:
        for _ in range(copies):
            fh.write(data)
    return copies * per_copy


def run_benchmark(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    from mining.ingest import DEFAULT_BATCH_ROWS
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if shutil.which("zstd") is None:
        raise SystemExit("the zstd command-line tool is needed for the raw-decode baseline (apt install zstd)")
    sizes = sorted({*args.memory_sizes, args.comments})
    inputs = {}
    for size in sizes:
        path = work / f"RC_scaled_{size}.zst"
        if not (args.reuse_input and path.exists()):
            started = time.perf_counter()
            write_input(path, size)
            print(f"wrote {path} ({size:,} comments, {path.stat().st_size / 2**20:.1f} MiB) "
                  f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        inputs[size] = path
    big, n = inputs[args.comments], args.comments
    decompressed = work / "decompressed.ndjson"
    load_before = load_average()
    compare = Path(args.compare_tree).resolve() if args.compare_tree else None

    def raw(path: Path) -> dict:
        return measure(["sh", "-c", f"zstd -dc --long=31 '{path}' | wc -l"])

    rows: dict[str, dict] = {}
    rows[RAW] = repeat(args.repeat, lambda: raw(big))
    rows[JSON_LOOP] = repeat(args.repeat, lambda: measure(self_cmd("--worker", "json", str(big))))
    rows[ORJSON_LOOP] = repeat(args.repeat, lambda: measure(self_cmd("--worker", "orjson", str(big))))

    duckdb_error = subprocess.run(self_cmd("--worker", "duckdb-zst", str(big)), capture_output=True, text=True,
                                  cwd=REPO).stdout.strip()

    def duckdb_two_steps() -> dict:
        step1 = measure(["zstd", "-dqf", "--long=31", str(big), "-o", str(decompressed)])
        store = work / "store-duckdb"
        shutil.rmtree(store, ignore_errors=True)
        step2 = measure(self_cmd("--worker", "duckdb-file", str(decompressed), str(store)))
        decompressed.unlink()
        shutil.rmtree(store, ignore_errors=True)
        return {"wall_s": step1["wall_s"] + step2["wall_s"], "cpu_s": step1["cpu_s"] + step2["cpu_s"],
                "peak_rss_mb": max(step1["peak_rss_mb"], step2["peak_rss_mb"]),
                "others_cpu_s": step1["others_cpu_s"] + step2["others_cpu_s"],
                "steps": {"decompress_s": step1["wall_s"], "read_json_insert_s": step2["wall_s"]}}

    rows[DUCKDB] = repeat(args.repeat, duckdb_two_steps)
    ingest_runs = {INGEST: lambda: run_ingest(big, work, "large")}
    if compare:
        ingest_runs[INGEST_BEFORE] = lambda: run_ingest(big, work, "before", tree=compare)
    rows.update(repeat_alternating(args.repeat, ingest_runs))
    for row in rows.values():
        row["records"] = n
        row["rate_per_s"] = n / row["wall_s"]

    anchors = {}
    for label, name in ANCHORS.items():
        path = work / f"anchor_{name}"
        lines = write_anchor(REPO.parent / "shared" / "data" / "pushshift" / name, path, n)
        row = repeat(args.repeat, lambda: raw(path))
        row.update(lines=lines, rate_per_s=lines / row["wall_s"], compressed_mb=path.stat().st_size / 2**20,
                   decompressed_mb=_decompressed_mb(path))
        anchors[label] = row
        path.unlink()

    trees = {"after": REPO, **({"before": compare} if compare else {})}
    stage_store = work / "store-stages"

    def stage_run(tree: Path, stage: str) -> dict:
        shutil.rmtree(stage_store, ignore_errors=True)
        result = measure(self_cmd("--worker", stage, str(big), str(stage_store), tree=tree))
        shutil.rmtree(stage_store, ignore_errors=True)
        return result

    # (a --compare-tree from before the `write` stage measures only the other two)
    stage_runs = repeat_alternating(args.repeat, {
        (when, stage): (lambda tree=tree, stage=stage: stage_run(tree, stage))
        for when, tree in trees.items() for stage in ("read", "parse", "write") if when == "after" or stage != "write"})

    def stage_budget(when: str, ingest: dict) -> dict:
        # the least disturbed (smallest) CPU of each worker's runs: the shared machine only adds
        cpu = {stage: min(run["cpu_runs_s"]) for (w, stage), run in stage_runs.items() if w == when}
        total = min(ingest["cpu_runs_s"])
        if "write" not in cpu:
            return {READ: cpu["read"], PARSE: cpu["parse"] - cpu["read"], STORE: total - cpu["parse"]}
        return {READ: cpu["read"], PARSE: cpu["parse"] - cpu["read"], WRITE: cpu["write"] - cpu["parse"],
                PIPELINE: total - cpu["write"]}

    cpu_budget = stage_budget("after", rows[INGEST])
    cpu_budget_before = stage_budget("before", rows[INGEST_BEFORE]) if compare else None

    memory = []
    for size in sizes:
        path = inputs[size]
        ingest = rows[INGEST] if size == n else repeat(args.repeat, lambda: run_ingest(path, work, str(size)))
        decoder = raw(path)
        memory.append({"comments": size, "batches": -(-size // DEFAULT_BATCH_ROWS),
                       "decompressed_mb": _decompressed_mb(path),
                       "ingest_peak_rss_mb": ingest["peak_rss_mb"], "zstd_d_peak_rss_mb": decoder["peak_rss_mb"],
                       "ingest_rate_per_s": size / ingest["wall_s"], "ingest_cpu_s": ingest["cpu_s"],
                       "store_mb": ingest["store_mb"]})
    raw_rate = rows[RAW]["rate_per_s"]
    ingest_rate = rows[INGEST]["rate_per_s"]
    return {
        "machine": machine(),
        "load_average_1m": {"before": load_before, "after": load_average()},
        "command": shlex.join(["python", "bench/ingest.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "input": {"comments": n, "compressed_mb": big.stat().st_size / 2**20,
                  "decompressed_mb": _decompressed_mb(big), "repeat": args.repeat},
        "rows": rows,
        "anchors": anchors,
        "duckdb_on_zst": duckdb_error,
        "memory": memory,
        "cpu_budget_s": cpu_budget,
        "cpu_budget_before_s": cpu_budget_before,
        "compare_label": args.compare_label if compare else None,
        "ingest_vs_raw_decode": ingest_rate / raw_rate,
    }


def _decompressed_mb(path: Path) -> float:
    out = subprocess.run(["sh", "-c", f"zstd -dc --long=31 '{path}' | wc -c"], capture_output=True, text=True)
    return int(out.stdout.strip()) / 2**20


# ---------------------------------------------------------------- output

def table(result: dict) -> str:
    n = result["input"]["comments"]
    lines = [f"| what | {n:,} comments: wall s | records/s | CPU s | peak RSS MiB | other jobs' CPU s meanwhile |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        label = name.replace("|", "\\|")
        lines.append(f"| {label} | {row['wall_s']:.2f} | {row['rate_per_s']:,.0f} | {row['cpu_s']:.2f} | "
                     f"{row['peak_rss_mb']:,.0f} | {row['others_cpu_s']:.1f} |")
    ingest_rate = result["rows"][INGEST]["rate_per_s"]
    lines += ["", "| raw decode anchor (`zstd -dc --long=31 \\| wc -l`) | lines | compressed MiB | ratio | wall s "
                  "| lines/s | CPU s | `ahf ingest` rate as % of it |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    anchors = {"the benchmark input above (repeats, ids shifted)": {
        **result["rows"][RAW], "lines": n, "compressed_mb": result["input"]["compressed_mb"],
        "decompressed_mb": result["input"]["decompressed_mb"]}, **result.get("anchors", {})}
    for name, row in anchors.items():
        lines.append(f"| {name} | {row['lines']:,} | {row['compressed_mb']:,.1f} | "
                     f"{row['decompressed_mb'] / row['compressed_mb']:.1f}x | {row['wall_s']:.2f} | "
                     f"{row['rate_per_s']:,.0f} | {row['cpu_s']:.2f} | {ingest_rate / row['rate_per_s']:.0%} |")
    before = result.get("cpu_budget_before_s")
    lines += ["", f"| where `ahf ingest`'s CPU goes ({n:,} comments; smallest of the runs) | "
                  + ("before: CPU s | after: CPU s | after: share |" if before else "CPU s | share |"),
              "|---|---:|---:|---:|" if before else "|---|---:|---:|"]
    total = sum(result["cpu_budget_s"].values())
    for name, cpu in result["cpu_budget_s"].items():
        was = (f"{before[name]:.2f} | " if name in before else "- | ") if before else ""
        lines.append(f"| {name} | {was}{cpu:.2f} | {cpu / total:.0%} |")
    if before:
        lines.append(f"| total | {sum(before.values()):.2f} | {total:.2f} | |")
    lines += ["", "| comments | batches | decompressed MiB | `ahf ingest` peak RSS MiB | `zstd -d` peak RSS MiB "
                  "| ingest minus decoder window MiB | ingest records/s | ingest CPU s | store MiB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["memory"]:
        lines.append(f"| {m['comments']:,} | {m['batches']} | {m['decompressed_mb']:,.0f} | "
                     f"{m['ingest_peak_rss_mb']:,.0f} | "
                     f"{m['zstd_d_peak_rss_mb']:,.0f} | {m['ingest_peak_rss_mb'] - m['zstd_d_peak_rss_mb']:,.0f} | "
                     f"{m['ingest_rate_per_s']:,.0f} | {m['ingest_cpu_s']:.2f} | {m.get('store_mb', 0):,.0f} |")
    return "\n".join(lines)


def write_doc(result: dict, path: Path) -> None:
    m, inp, rows = result["machine"], result["input"], result["rows"]
    n = inp["comments"]
    two_steps = rows[DUCKDB]["steps"]
    ingest = rows[INGEST]
    ingest_cpu = ingest["cpu_s"]
    cores = m["cores"] or 1
    ratio = inp["decompressed_mb"] / inp["compressed_mb"]
    share = result["ingest_vs_raw_decode"]
    verdict = "met" if share >= 0.5 else "not met"
    anchors = result.get("anchors", {})
    real = [f"{row['rate_per_s'] / 1e3:,.0f}k lines/s for {name.split(' (')[0]} "
            f"({row['decompressed_mb'] / row['compressed_mb']:.1f}x; ingest at "
            f"{ingest['rate_per_s'] / row['rate_per_s']:.0%} of it)" for name, row in anchors.items()]
    before = rows.get(INGEST_BEFORE)
    budget, budget_before = result["cpu_budget_s"], result.get("cpu_budget_before_s")
    big_two = sorted(result["memory"], key=lambda r: r["comments"])[-2:]
    pipeline = [r["ingest_peak_rss_mb"] - r["zstd_d_peak_rss_mb"] for r in big_two]
    growth = (pipeline[1] - pipeline[0]) / max(1e-9, (big_two[1]["comments"] - big_two[0]["comments"]) / 1e6)
    load = result["load_average_1m"]
    compare_text = ""
    if before:
        runs_after, runs_before = ingest["cpu_runs_s"], before["cpu_runs_s"]
        compare_text = (
            f"\n- **Against the version before this change** ({result['compare_label']}; the two run in turn, "
            f"{len(runs_after)} times each, in the same session): CPU s {min(runs_before):.1f} → "
            f"{min(runs_after):.1f} at best ({min(runs_after) / min(runs_before):.0%}; every run: before "
            f"{', '.join(f'{x:.1f}' for x in runs_before)}, after {', '.join(f'{x:.1f}' for x in runs_after)}), "
            f"{before['rate_per_s']:,.0f} → {ingest['rate_per_s']:,.0f} records/s (fastest runs), peak RSS "
            f"{before['peak_rss_mb']:,.0f} → {ingest['peak_rss_mb']:,.0f} MiB. Per stage (smallest CPU of the runs): "
            + "; ".join(f"{name.split(' (')[0]} {budget_before[name]:.2f} → {budget[name]:.2f}"
                        for name in budget if name in budget_before)
            + ".")
    text = f"""# Ingest benchmark

`ahf ingest` streams a dump into the store without a decompressed copy on disk: a reader thread
decompresses (python-zstandard, 2 GiB window) and cuts blocks of about 16 MiB of whole lines,
handed on as the decompressor's own output buffers; DuckDB's JSON reader (one connection per
parser thread, two on 2 cores), fed each block through a private named pipe, reads every field as text and converts it in SQL, checking each
value against what the per-record path (`normalize_record`) would make of it; a line whose
value a cast could change is handed back by line number and redone by orjson +
`normalize_record`, which counts every skip with its reason and line. A writer thread commits
batches of 245,760 rows (two DuckDB row groups) while the next batch is parsed, merging ids
already stored set-wise (the tables carry no primary-key index).

Command: `{result['command']}` ({result['date']}; the fastest of {inp['repeat']} run(s) per row).

Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}; Python {m['python']},
DuckDB {m['duckdb']}, pyarrow {m['pyarrow']}, zstandard {m['zstandard']}, orjson {m['orjson']},
{m['zstd_cli']}. {machine_state(load, m['cores'], rows)}

Input: the real `RC_2005-12.zst` (1,075 comments) repeated with fresh ids to {n:,} comments
({inp['decompressed_mb']:,.0f} MiB of NDJSON; {inp['compressed_mb']:,.1f} MiB as zstd with a 2 GiB window and
long-distance matching, like the Pushshift dumps). Being repeats, it compresses ~{ratio:.0f}x where
the real files compress 5-20x, which makes its raw decode unusually cheap: the second table
decodes the real files at their own compressibility.

{table(result)}

## Findings

- **Goal {verdict}**: `ahf ingest` runs at **{share:.0%} of the raw-decode rate** of this input end to end
  (the goal is 50 %); against the raw decode of the real files at their own compressibility:
  {"; ".join(real)}. The machine's load weighs on these wall-clock rates; the CPU bounds them even
  on an idle machine: on {cores} cores its {ingest_cpu:.1f} CPU s allow at most {n / (ingest_cpu / cores):,.0f}
  records/s with perfect overlap of its threads, {n / (ingest_cpu / cores) / rows[RAW]['rate_per_s']:.0%} of this
  input's raw decode rate. Decoding costs {rows[RAW]['cpu_s']:.2f} CPU s; parsing the same JSON costs more with
  every parser here: {rows[ORJSON_LOOP]['cpu_s']:.1f} CPU s for the orjson loop that builds no row at all,
  {budget[PARSE]:.1f} s for DuckDB's reader producing checked, typed columns (the smallest of its runs).{stage_bound(result)}{compare_text}
- DuckDB's own non-streaming path (row 4: decompress to a file, then `read_json` into the store's
  table) spends {rows[DUCKDB]['cpu_s']:.1f} CPU s, {rows[DUCKDB]['cpu_s'] / ingest_cpu:.0%} of what `ahf ingest`
  spends, but needs the disk space of the whole decompressed dump, casts silently (`1.5` becomes 2 in a
  BIGINT, `true` becomes `"true"` in a VARCHAR) and has no per-record accounting of bad input.
  DuckDB cannot read the dump itself: `read_json` on the .zst fails with `{result['duckdb_on_zst']}`;
  decompressing took {two_steps['decompress_s']:.2f} s and `read_json` into the table
  {two_steps['read_json_insert_s']:.2f} s.
- Peak memory: a zstd frame with a 2 GiB window needs a decoder buffer of min(2 GiB, decompressed
  size), which `zstd -d` pays as well (its column), so both grow with the input up to 2 GiB and stay
  there. What `ahf ingest` uses beyond that buffer ("minus decoder window") is the pipeline: blocks in
  flight, the batch being filled and the one being written (an input of a single batch never holds
  two), Arrow and DuckDB working memory. Between the two largest inputs it changed by {growth:,.0f} MiB per
  million more comments: with no primary-key index (schema 2) nothing in it grows with the store.
"""
    text += _HOT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


_HOT_PATH = """
## What the hot path does, and why

Measured while developing on this machine, shared with other jobs (load 3-5 on 2 cores, so every
figure here is ±10-20 %), each change against the one before; CPU s per million comments of the
input above. For continuity: on the idle machine (2026-11-22, the previous version of this page)
the version before this change took 14.2 CPU s and 8.7 s for the same input (115k records/s).

- **Parser: DuckDB instead of Arrow.** Arrow's JSON reader took 4.1-5.2 CPU s per million to parse
  (single- or multi-threaded) before any check. DuckDB's `read_json` parses (yyjson) in about 1 s
  and reads the 19 fields as text in about 1 s more; its checks cost ~0.7 s and the export to Arrow
  ~0.3 s. It reads each block through a named pipe in a private temporary folder (no copy on disk;
  python-zstandard decodes, since DuckDB refuses the 2 GiB window), with the statement prepared
  once: planning it again for every block cost ~20 ms more per block, ~0.8 s per million.
- **No silent casts.** Every field is read as text, so DuckDB's own casts (`1.5` -> 2, `true` -> 1 or
  `"true"`, an object -> its JSON text) never apply. A value is kept by the fast path only where the
  record path gives the same: for text fields a JSON string or an integer of up to 18 digits (orjson
  reads longer ones as floats); for integer fields up to 15 digits, as a number or a string (both
  sides agree below 2^53); `true`/`false` in any case for flags; an integer or a decimal for
  `created_utc`, floored. Anything else goes to the record path by line number, in its place among
  the fast rows (ties between copies of an id still go to the later line). A block DuckDB refuses
  (bad JSON, a duplicate key, a line that is not an object, a blank line) is redone line by line.
  `tests/test_normalize.py` checks that both paths give the same rows on every real record and on
  ~100 hand-made values, field by field; and the stores the version before and after this change
  built from every shared file were identical, row for row (checked once, for this change).
  Known leniency: DuckDB's reader accepts `NaN` and trailing commas, which orjson refuses; in a
  kept field they fail the check and are counted, elsewhere in a record the row is kept (Arrow's
  reader accepted NaN there too).
- **Store: no primary key.** The ART index on `id` cost ~1.1 CPU s per million rows to maintain and
  ~40 bytes per stored id, held in memory. A batch is now one plain `INSERT` once a query has found
  no id of the batch repeated within it or already stored (a semi-join of the batch's ids against
  the table, which DuckDB's min/max filter narrows to the row groups whose ids overlap the batch's);
  otherwise it is merged set-wise in the same transaction (`UPDATE ... FROM` the newest copy of each
  id, then `INSERT` of the ids not stored), by the upsert's exact rules (docs/store.md).
- **Whole row groups per commit.** Batches of 250,000 rows left a partial row group at every
  commit, which the checkpoint then rewrote: 0.9 CPU s per million and a 50 % larger file.
  Batches are cut to whole row groups (245,760 rows; `--batch-rows` is rounded down).
- **Reader: no joins.** A block is the decompressor's output buffers plus the head of the next
  one up to its last newline, handed to the pipe as they are: two 16 MiB copies per block and their
  page faults are gone (the reader thread went from ~1.9 to ~1.3 CPU s, of which ~0.5 s is the
  decoder window's own page faults, which `zstd -d` pays too).
- **No pandas.** `pa.array([])` and `Schema.empty_table()` import pandas (~0.4 CPU s) on first use;
  the empty tables are built with `pa.nulls`.
- **Summary.** Threads and orphans (`Store.thread_counts`) are one distinct and two anti-joins:
  ~0.1 CPU s per million stored comments instead of 0.45-0.8.
- **Two parser threads (2026-11-23).** A per-thread CPU timeline of the ingest (sampled from
  /proc every 0.25 s) showed the one parsing thread busy ~88 % from start to end while the
  decompressor used ~28 % of a core and the writer ran in bursts: the parse was the critical path
  and the two cores were ~66 % busy. Blocks now go to a pool of parsers (`ParserPool`: one DuckDB
  connection and pipe each, as many as cores up to 4), are parsed ahead and taken back in order, so
  rows keep line order. Against the one-parser version in the same run, three runs of this
  benchmark with nothing else running (fastest of 2, 2 and 3): wall 6.12 -> 5.07 s, 7.20 -> 6.60 s,
  6.21 -> 6.16 s (+21 %, +9 %, +1 % records/s); CPU 8.75 -> 8.66, 9.89 -> 10.81, 8.93 -> 10.28 s;
  peak RSS +120 MiB (two more blocks and a second DuckDB connection in flight). Faster every time
  on these 2 cores but by a margin the machine's own drift between runs (±20 %) can hide, for more
  CPU; the design is for machines with more cores, where one parser could never use them.
- DuckDB runs with one thread per parser connection and half the cores for the store during the ingest: the
  pipeline (reader, parser, writer) already keeps the cores busy.
- Tried and dropped: a temporary DuckDB table per batch instead of Arrow between parser and store
  (+2.2 CPU s: the rows are copied into it and out again); committing every block (+2.5 s);
  DuckDB's `ignore_errors` to keep a bad line from failing its block (a duplicate key then keeps
  the first value silently, where orjson keeps the last); `auto_detect=false` and a smaller
  `maximum_object_size` for the reader, other compression methods for the store (no gain beyond
  noise, or a 13x larger file); glibc malloc thresholds (-10 % page faults, no CPU gain).
"""


def stage_bound(result: dict) -> str:
    """What the stages cost each alone, and the rate that caps on this machine, whatever the overlap."""
    budget = result["cpu_budget_s"]
    if WRITE not in budget:
        return ""
    n, cores, raw = result["input"]["comments"], result["machine"]["cores"] or 1, result["rows"][RAW]["rate_per_s"]
    alone = budget[READ] + budget[PARSE] + budget[WRITE]
    no_parse = budget[READ] + budget[WRITE]
    cap, cap_no_parse = n * cores / alone, n * cores / no_parse
    # what the goal (half the raw decode rate) leaves for parsing, with perfect overlap on these cores
    parse_left = n * cores / (0.5 * raw) - no_parse
    left = (f"{parse_left:.2f} CPU s for parsing and checking {result['input']['decompressed_mb']:,.0f} MiB of JSON "
            f"({result['input']['decompressed_mb'] / parse_left:,.0f} MiB/s on one core)" if parse_left > 0
            else "no CPU at all for parsing")
    return f"""
- **The bound of this design, measured.** Each stage run alone, one after another in one thread
  (the smallest CPU of its runs): reading {budget[READ]:.2f}, parsing {budget[PARSE]:.2f} and writing
  the store {budget[WRITE]:.2f} CPU s; the ingest spends {budget[PIPELINE]:.2f} s more running them side by side
  (threads, contention for the two cores' caches), on its summary queries and its imports. Whatever the
  overlap, the {alone:.1f} CPU s of the stages alone cap it at {cap:,.0f} records/s on {cores} cores,
  **{cap / raw:.0%} of the raw decode rate**; with a parser that cost nothing, reading and writing alone
  ({no_parse:.1f} CPU s) would still cap it at {cap_no_parse:,.0f} records/s ({cap_no_parse / raw:.0%}). The goal,
  half the raw decode rate, leaves {left}, even with no cost for running the stages side by side:
  DuckDB's reader takes {budget[PARSE]:.2f} s here, and the orjson loop {result['rows'][ORJSON_LOOP]['cpu_s']:.2f} s
  including its decompression, building no row at all."""


def machine_state(load: dict, cores: int, rows: dict) -> str:
    """Idle or shared, by what other processes used during the runs (the load average before the
    run also counts this session's own earlier commands, so it only decides when that is missing)."""
    timed = [row for row in rows.values() if "others_cpu_s" in row]
    share = (sum(r["others_cpu_s"] for r in timed) / sum(r["wall_s"] * cores for r in timed)) if timed else None
    if share is None and float(load["before"]) < 0.5 or share is not None and share < 0.05:
        return (f"Nothing else ran during the runs: other processes (and the kernel's own work) used "
                f"{share or 0:.0%} of the cores while the rows of the first table ran (their last column); "
                f"1-minute load average {load['before']} before the run (what ran just before it), "
                f"{load['after']} after it (the bench's own load).")
    return (f"**The machine was shared with other jobs during this run** (1-minute load average {load['before']} "
            f"before and {load['after']} after, on {cores} cores): wall times include waiting for a core whenever "
            "the last column (CPU seconds other processes used during that run) is not near zero, and CPU "
            "seconds, the steadier figure, are inflated too by the contention (caches, memory bandwidth). "
            "Compare rows of this page with each other, not with pages taken on the idle machine.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comments", type=int, default=1_000_000, help="comments in the large input")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[250_000, 2_000_000],
                        help="more input sizes for the memory check (besides --comments)")
    parser.add_argument("--workdir", default="/tmp/ahf-bench-ingest", help="inputs, stores and temporary files")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--reuse-input", action="store_true", help="keep existing scaled inputs in --workdir")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the machine to be idle (shared machines)")
    parser.add_argument("--doc", help="also write the results as Markdown here (e.g. docs/bench/ingest.md)")
    parser.add_argument("--compare-tree", metavar="DIR",
                        help="also measure `ahf ingest` and the stage workers of another checkout (e.g. the commit "
                             "before a change, from `git worktree add` or `git archive`)")
    parser.add_argument("--compare-label", default="previous version", help="how the doc names --compare-tree")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--from-json", metavar="FILE", help="no runs: print / --doc the results saved by --json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind in ("json", "orjson"):
            print(worker_json(rest[0], use_orjson=kind == "orjson"))
        elif kind in ("read", "parse", "write"):
            print(worker_stage(kind, rest[0], rest[1] if kind == "write" else None))
        elif kind == "duckdb-zst":
            print(worker_duckdb_zst(rest[0]))
        elif kind == "duckdb-file":
            print(worker_duckdb_file(rest[0], rest[1]))
        return 0
    global IDLE_WAIT_S
    IDLE_WAIT_S = args.wait_idle
    result = json.loads(Path(args.from_json).read_text()) if args.from_json else run_benchmark(args)
    if args.doc:
        write_doc(result, Path(args.doc))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        print(f"\nahf ingest / raw decode: {result['ingest_vs_raw_decode']:.0%}; DuckDB on the .zst: "
              f"{result['duckdb_on_zst']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
