"""The same pipeline on the local engine and on Ray with 1 and 2 workers, on one input, in one run.

    python bench/scale.py --comments 1000000 --files 4 [--workdir /tmp/ahf-bench-scale] [--json] [--doc docs/bench/scale.md]

The input is bench/ingest.py's (the real December 2005 dump repeated under fresh ids, zstd with a
2 GiB window), cut into `--files` files: files are the ingest's partitions. Each configuration runs
in its own process, from a fresh store: ingest (no turns) -> turns -> label -> export (pairs), with
partitions of a quarter of the input so that every stage has work for two workers. Measured per
stage: wall seconds, records (or turns) per second; per run: machine-wide CPU seconds from
/proc/stat (the driver, Ray's workers and daemons together; the machine is otherwise idle) and the
peak of machine-wide used memory above the run's start (every process of the run). Ray's start-up
is reported apart. The goal (issue 13): Ray with 2 workers at >= 0.8x the local engine's
records/s; >= 1.8x from 1 to 2 workers on the partition-parallel stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
# name: (engine, Ray workers, cores the whole run may use: None = every core of the machine)
CONFIGS = {"local": ("local", 0, None), "ray, 1 worker": ("ray", 1, None), "ray, 2 workers": ("ray", 2, None),
           # strong scaling: one worker on one core (driver and Ray's daemons on it too) against two
           # workers on two; "ray, 1 worker" has the second core free for the driver, so its ratio to
           # "ray, 2 workers" compares two runs on the same two cores
           "ray, 1 worker, 1 core": ("ray", 1, 1)}
# --delta: the same runs on a Delta Lake store (AHF_STORE_FORMAT=delta) beside the DuckDB file's
DELTA_CONFIGS = {"local, delta": ("local", 0, None), "ray, 2 workers, delta": ("ray", 2, None),
                 "ray, 1 worker, 1 core, delta": ("ray", 1, 1)}
STAGES = ("ingest", "turns", "label", "export")


def make_inputs(work: Path, comments: int, files: int) -> list[Path]:
    from ingest import base_records, scaled_lines  # bench/ingest.py
    import zstandard

    paths = [work / f"RC_part{i}.zst" for i in range(files)]
    if all(p.exists() for p in paths):
        return paths
    records = base_records()
    lines = list(scaled_lines(records, comments))
    per = -(-len(lines) // files)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True, threads=2)
    for i, path in enumerate(paths):
        path.write_bytes(zstandard.ZstdCompressor(compression_params=params).compress(b"".join(lines[i * per:(i + 1) * per])))
    return paths


def worker(engine_name: str, cpus: int, store: str, inputs: list[str], per_partition: int) -> dict:
    """One configuration, in this (fresh) process."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from feedback.export import export_dataset
    from feedback.labels import LabelConfig, label_store
    from mining.ingest import ingest
    from mining.turns import TurnConfig, build_turns

    timings: dict = {}
    started = time.perf_counter()
    if engine_name == "ray":
        import logging

        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    from ahf.engine import make_engine

    with make_engine(engine_name) as engine:
        timings["engine_start_s"] = round(time.perf_counter() - started, 2)
        # the partition phase of each stage: from its first task to its last result taken (the driver's
        # work between results, such as the ingest's upserts, included); the rest of the stage is serial
        mapped = {"s": 0.0}
        engine_map = engine.map

        def map_timed(fn, items):
            begun = time.perf_counter()
            yield from engine_map(fn, items)
            mapped["s"] += time.perf_counter() - begun

        engine.map = map_timed
        labels = LabelConfig.model_validate({"partition_turns": per_partition,
                                             "export": {"partition_turns": per_partition}})
        mapped["s"], t = 0.0, time.perf_counter()
        report = ingest(inputs, store, rebuild=False, engine=engine)
        timings["ingest"] = {"s": time.perf_counter() - t, "items": report.records_read, "partition_s": mapped["s"]}
        mapped["s"] = 0.0
        t = time.perf_counter()
        turns = build_turns(store, TurnConfig(partition_comments=per_partition), engine=engine)
        timings["turns"] = {"s": time.perf_counter() - t, "items": turns.comments, "partition_s": mapped["s"]}
        mapped["s"] = 0.0
        t = time.perf_counter()
        label_store(store, labels, engine=engine)
        timings["label"] = {"s": time.perf_counter() - t, "items": turns.turns, "partition_s": mapped["s"]}
        mapped["s"] = 0.0
        t = time.perf_counter()
        export_dataset(store, "pairs", Path(store).parent / "export", force=True, config=labels.export, engine=engine)
        timings["export"] = {"s": time.perf_counter() - t, "items": turns.turns, "partition_s": mapped["s"]}
        mapped["s"] = 0.0
        timings["workers"] = engine.workers
    if engine_name == "ray":
        ray.shutdown()
    return timings


def _busy_cpu() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _used_memory_mb() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


def run_config(name: str, work: Path, inputs: list[Path], per_partition: int) -> dict:
    engine_name, cpus, cores = (CONFIGS | DELTA_CONFIGS)[name]
    env = os.environ | {"AHF_STORE_FORMAT": "delta" if name in DELTA_CONFIGS else "duckdb"}
    out = work / name.replace(", ", "-").replace(" ", "")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base_memory, peak, stop = _used_memory_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _used_memory_mb() - base_memory)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu_before, started = _busy_cpu(), time.perf_counter()
    sampler.start()
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(
        [engine_name, cpus, str(out / "store"), [str(p) for p in inputs], per_partition])],
        capture_output=True, text=True, cwd=REPO, env=env,
        # every process of the run (the driver, Ray's daemons and workers) inherits the affinity
        preexec_fn=(lambda: os.sched_setaffinity(0, set(range(cores)))) if cores else None)
    stop.set()
    sampler.join()
    if done.returncode:
        raise RuntimeError(f"{name}: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(_busy_cpu() - cpu_before, 2),
               "peak_memory_mb": round(peak[0])}
    for stage in STAGES:
        result[stage]["per_s"] = round(result[stage]["items"] / result[stage]["s"])
        result[stage]["s"] = round(result[stage]["s"], 2)
        result[stage]["partition_s"] = round(result[stage]["partition_s"], 2)
    shutil.rmtree(out, ignore_errors=True)
    return result


def median_run(results: list[dict]) -> dict:
    """Each number of one configuration's results, the median over the rounds; `rounds` keeps them all."""
    import statistics

    def med(values):
        if isinstance(values[0], dict):
            return {k: med([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], (int, float)):
            return round(statistics.median(values), 2) if isinstance(values[0], float) else statistics.median(values)
        return values[0]

    merged = med(results)
    for stage in STAGES:
        merged[stage]["per_s"] = round(merged[stage]["items"] / merged[stage]["s"])
    return merged | ({"rounds": results} if len(results) > 1 else {})


def to_markdown(result: dict) -> str:
    runs = result["runs"]
    lines = ["# Local engine and Ray (`bench/scale.py`)", "", f"`{result['command']}`, {result['date']}, "
             f"{result['machine']}. Input: {result['comments']:,} comments in {result['files']} zstd files "
             f"(bench/ingest.py's); partitions of {result['per_partition']:,}"
             + (f"; medians of {result['repeat']} rounds, the configurations taking turns" if result.get("repeat", 1) > 1 else "")
             + ".", "",
             "| | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for stage in STAGES:
        lines.append(f"| {stage} ({'records' if stage == 'ingest' else 'comments' if stage == 'turns' else 'turns'}/s) | "
                     + " | ".join(f"{r[stage]['per_s']:,} ({r[stage]['s']} s)" for r in runs.values()) + " |")
    for stage in STAGES:
        lines.append(f"| {stage}: partition phase (s) | " + " | ".join(str(r[stage]["partition_s"]) for r in runs.values()) + " |")
    lines.append("| Ray start-up (s) | " + " | ".join(str(r["engine_start_s"]) for r in runs.values()) + " |")
    lines.append("| whole run: wall s / machine CPU s | "
                 + " | ".join(f"{r['wall_s']} / {r['cpu_s']}" for r in runs.values()) + " |")
    lines.append("| peak memory above start (MiB, every process) | "
                 + " | ".join(f"{r['peak_memory_mb']:,}" for r in runs.values()) + " |")
    lines += ["", "Ratios (records or turns per second):", ""]
    lines += [f"- {k}: {v}" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comments", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/ahf-bench-scale")
    parser.add_argument("--doc")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--delta", action="store_true", help="also run local, Ray (2 workers) and Ray (1 worker, 1 core) on a Delta store")
    parser.add_argument("--only-delta-pair", action="store_true",
                        help="only local on the DuckDB file and local on Delta (the store formats compared)")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS) + list(DELTA_CONFIGS), metavar="CONFIG",
                        help=f"run only these configurations (of: {', '.join(list(CONFIGS) + list(DELTA_CONFIGS))})")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every configuration; figures are medians")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(work, args.comments, args.files)
    per_partition = max(1, args.comments // 4)
    names = args.only or (["local", "local, delta"] if args.only_delta_pair else
                          list(CONFIGS) + (list(DELTA_CONFIGS) if args.delta else []))
    # --repeat: the configurations take turns, and each figure is the median over the rounds (single
    # runs of the same configuration varied by up to 15 % on this VM)
    rounds = [{name: run_config(name, work, inputs, per_partition) for name in names} for _ in range(args.repeat)]
    runs = {name: median_run([r[name] for r in rounds]) for name in names}
    ratios = {}
    for a, b in (("ray, 2 workers", "local"), ("ray, 2 workers", "ray, 1 worker"),
                 ("ray, 2 workers", "ray, 1 worker, 1 core"), ("local, delta", "local"),
                 ("ray, 2 workers, delta", "ray, 2 workers"), ("ray, 2 workers, delta", "local, delta"),
                 ("ray, 2 workers, delta", "ray, 1 worker, 1 core, delta")):
        if a in runs and b in runs:
            ratios |= {f"{stage}: {a} / {b}": round(runs[a][stage]["per_s"] / runs[b][stage]["per_s"], 2)
                       for stage in STAGES}
            if a.startswith("ray") and b.startswith("ray"):  # the partition phases alone, by their seconds
                ratios |= {f"{stage} partition phase: {a} / {b}":
                           round(runs[b][stage]["partition_s"] / max(runs[a][stage]["partition_s"], 1e-9), 2)
                           for stage in STAGES}
    result = {"command": "python bench/scale.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "comments": args.comments, "files": args.files, "per_partition": per_partition, "repeat": args.repeat,
              "runs": runs,
              "ratios": ratios}
    if args.doc:
        Path(args.doc).write_text(to_markdown(result))
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
