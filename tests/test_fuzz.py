"""Property-based fuzzing (hypothesis): mutated real records, in every format `ahf ingest` reads, then
through every later stage (tests/fuzz_records.py says what is mutated and what is checked). CI runs a
bounded number of examples; `python bench/fuzz.py` runs 100k+ records and reports what it finds.

Acts are tagged once, on a store filled with many fuzzed cases (indexing is too slow per example)."""

from __future__ import annotations

import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_records import FORMATS, check_case, make_case, real_records


_RECORDS: list = []


@pytest.fixture(scope="module")
def records(shared_data):
    _RECORDS[:] = real_records(shared_data)
    return _RECORDS


@settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(FORMATS), n=st.integers(1, 60))
def test_fuzzed_records_never_break_a_stage(records, tmp_path_factory, seed, fmt, n):
    """A failure names its (seed, fmt, n): `make_case(real_records(...), random.Random(seed), n, fmt)`."""
    work = tmp_path_factory.mktemp("fuzz")
    try:
        check_case(*make_case(_RECORDS, random.Random(seed), n, fmt), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_acts_tag_a_store_full_of_fuzzed_records(records, tmp_path):
    from feedback.labels import label_store
    from index.acts import tag_acts
    from index.build import build_index
    from mining.ingest import ingest

    rng = random.Random(12)
    paths = []
    for i, fmt in enumerate(FORMATS * 3):
        data, name, _ = make_case(records, rng, 40, fmt)
        paths.append(tmp_path / f"{i}-{name}")
        paths[-1].write_bytes(data)
    report = ingest(paths, tmp_path / "store")
    assert report.records_read == report.ingested + sum(report.skipped.values()) and report.turns.turns > 0
    build_index(tmp_path / "store")
    tagged = tag_acts(tmp_path / "store")
    assert sum(tagged.counts.values()) == report.turns.turns
    label_store(tmp_path / "store")
