"""onebase.json, the export manifest: one typed model read and written by training, tests and serving."""

from __future__ import annotations

import json

import pytest

from onebase.errors import OnebaseError
from onebase.manifest import MANIFEST, RunInfo, read_run_info, write_run_info


def test_a_manifest_round_trips_and_keeps_fields_it_does_not_know(tmp_path):
    written = write_run_info(tmp_path, {"method": "lora", "task": "causal-lm", "labels": None,
                                        "trainable_params": 10, "total_params": 1000, "metrics": {"eval_loss": 1.5},
                                        "held_out": {"arith": {"rows": 8}}})
    read = read_run_info(tmp_path)
    assert read == written and read.method == "lora" and read.metrics == {"eval_loss": 1.5}
    assert read["held_out"] == {"arith": {"rows": 8}} and read.get("nope", 3) == 3  # dict-style reads still work
    assert json.loads((tmp_path / MANIFEST).read_text())["held_out"]["arith"]["rows"] == 8


def test_a_prompt_programs_manifest_reads_too(tmp_path):
    # The shape prompt/artifact.py writes: its own task names, no training figures.
    (tmp_path / MANIFEST).write_text(json.dumps({
        "method": "prompt-program", "format": 1, "name": "p", "task": "classification", "base_model": "minilm",
        "base_sha256": "a" * 64, "base_fingerprint": "a" * 64, "labels": ["neg", "pos"],
        "verbalizers": {"neg": ["bad"], "pos": ["good"]}, "metrics": {"accuracy": 0.5}, "adapter": None}))
    info = read_run_info(tmp_path)
    assert (info.method, info.task, info["format"], info.labels) == ("prompt-program", "classification", 1,
                                                                      ["neg", "pos"])


@pytest.mark.parametrize(("content", "message"), [
    (None, "onebase.json: missing"),
    ("{not json", "onebase.json: not readable JSON"),
    ("[1, 2]", "onebase.json: not a JSON object"),
    ('{"task": "causal-lm"}', "onebase.json: method: Field required"),
    ('{"method": "lora", "trainable_params": "many"}', "onebase.json: trainable_params: Input should be a valid"),
])
def test_a_bad_manifest_is_one_line_naming_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(OnebaseError, match=message) as caught:
        read_run_info(tmp_path)
    assert "\n" not in str(caught.value)


def test_writing_checks_the_types_first(tmp_path):
    with pytest.raises(OnebaseError, match="labels"):
        write_run_info(tmp_path, {"method": "lora", "labels": "neg,pos"})
    assert not (tmp_path / MANIFEST).exists()
    assert isinstance(write_run_info(tmp_path, RunInfo(method="full")), RunInfo)
