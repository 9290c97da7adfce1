"""How job fields are written to Redis: exactly the JSON `json.dumps` would write, and read back unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from application.models.training_model import Job, JobStatus, TrainingParams
from application.services.job_codec import decode_job, encode_fields, encode_value

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=12
)


@given(values)
def test_a_value_is_written_as_json_dumps_writes_it_without_nan(value: Any) -> None:
    # NaN and Infinity are not JSON (a page holding them cannot be parsed): null, as JSON.stringify writes them.
    written = encode_value(value)
    assert json.loads(written, parse_constant=lambda c: pytest.fail(f"{c} written")) == json.loads(
        json.dumps(value), parse_constant=lambda _: None)  # fmt: skip
    if "NaN" not in (plain := json.dumps(value, separators=(",", ":"))) and "Infinity" not in plain:
        assert written == plain


def test_a_job_reads_back_as_it_was_written() -> None:
    job = Job(job_id="j-1", status=JobStatus.QUEUED, priority=7, data_path="AI-ModelScope/alpaca#500",
              model_path="Qwen/Qwen2.5-0.5B", output_dir="/out/j \"1\" é", output_dir_requested="j",
              num_gpus=2, gpu_ids_requested=[0, 3], training=TrainingParams(learning_rate=1e-4),
              created_at=1700000000.25, updated_at=1700000001.5)  # fmt: skip
    fields = encode_fields(job.model_dump())
    assert fields["status"] == '"queued"' and fields["gpu_ids_requested"] == "[0,3]"
    assert decode_job(fields) == job
