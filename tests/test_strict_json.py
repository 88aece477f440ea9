"""The strict JSON parser every input path shares: total on any bytes, faithful on JSON it accepts."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import strict_json
from jobs.errors import InvalidJobError
from jobs.model import Job, JobStatus
from jobs.sqlite_store import SQLiteJobStore
from jobs.strict_json import INT64_MAX, INT64_MIN, JSONInputError

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_parse_or_raise_json_input_error_only(raw: bytes) -> None:
    with contextlib.suppress(JSONInputError):
        strict_json.loads(raw, max_depth=4)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_json_within_the_bounds_reads_back_as_written(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert strict_json.loads(text.encode(), max_depth=depth(value)) == value
    if depth(value):
        with pytest.raises(JSONInputError, match="nested deeper than"):
            strict_json.loads(text, max_depth=depth(value) - 1)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[" * 100_000, "nested deeper than 8 levels at character 8"),
        ('{"a": "[[[[[[[[[[[[[[[[[["}', None),
        ("9" * 5000, "outside the 64-bit range"),
        (str(INT64_MAX + 1), "outside the 64-bit range"),
        (str(INT64_MIN), None),
        ("1e400", "out of range"),
        ("-Infinity", "-Infinity is not a JSON value"),
        ('{"a": 1, "a": 2}', "key 'a' appears more than once"),
        ('"\\udc00"', "unpaired"),
        ('"\\ud83d\\ude00"', None),
        ('"\\\\ud800"', None),
    ],
)
def test_bounds_are_enforced_with_a_clear_message(text: str, complaint: str | None) -> None:
    if complaint is None:
        strict_json.loads(text, max_depth=8)
    else:
        with pytest.raises(JSONInputError, match=complaint):
            strict_json.loads(text, max_depth=8)


def test_bytes_must_be_utf8_and_a_leading_bom_is_ignored() -> None:
    assert strict_json.loads(b'\xef\xbb\xbf{"a": 1}', max_depth=1) == {"a": 1}
    with pytest.raises(JSONInputError, match="invalid UTF-8 at byte 7"):
        strict_json.loads(b'{"a": "\xff"}', max_depth=1)
    with pytest.raises(JSONInputError, match="invalid UTF-8"):
        strict_json.loads('{"a": 1}'.encode("utf-16"), max_depth=1)
    assert math.isclose(strict_json.loads(b"1.5e3", max_depth=0), 1500.0)


async def test_a_value_sqlite_cannot_hold_is_an_invalid_job_error_and_the_store_goes_on(tmp_path: Path) -> None:
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        await store.create(Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="d"))
        await store.transition("t", "j", JobStatus.PENDING, JobStatus.PROCESSING)
        with pytest.raises(InvalidJobError, match="cannot be stored"):
            await store.transition("t", "j", JobStatus.PROCESSING, JobStatus.FAILED, retry_count=10**30)
        with pytest.raises(InvalidJobError, match="cannot be stored"):
            await store.transition("t", "j", JobStatus.PROCESSING, JobStatus.FAILED, error="\ud800")
        # Each refused write was rolled back whole: the job and its counters are as before.
        assert (await store.get("t", "j")).status is JobStatus.PROCESSING
        assert (await store.stats("t"))[JobStatus.PROCESSING] == 1
        assert await store.recount("t") == {"t": await store.stats("t")}
