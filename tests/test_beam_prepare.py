"""`jaxrm data prepare --runner beam` (Apache Beam, DirectRunner with 2 worker processes) writes
what the single-process prepare writes: the same shard files, byte for byte, the same manifest,
and the same one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import with_bad_lines

from jaxrm import storage
from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data import beam_prepare
from jaxrm.data.pipeline import train_batches

REPO = Path(__file__).resolve().parent.parent
BAD_LINES = {7: '{"prompt": "cut short"', 40: '{"prompt": "no answers"}', 95: "[1, 2]"}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows: 120 rows make 8, and shards of 50 examples cut through them."""
    monkeypatch.setattr(beam_prepare, "CHUNK_ROWS", 16)


def write_config(data, path: Path) -> Path:
    _, tokenizer = data
    path.write_text(
        f"objective: polar\ndata:\n  tokenizer: {tokenizer}\n  reward_token: <|score|>\n"
        "  seq_len: 256\n  max_length: 128\n"
    )
    return path


def prepare_both(config: Path, rows: Path, tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """The single-process and the Beam prepare of `rows`, in shards of 50 examples."""
    local, beam = tmp_path / "local", tmp_path / "beam"
    args = ["data", "prepare", str(config), "--data", str(rows), "--shard-size", "50", *overrides]
    assert main([*args, "--out", str(local)]) == 0
    assert main([*args, "--out", str(beam), "--runner", "beam"]) == 0
    return local, beam


def assert_same_prepared(want: str, got: str) -> None:
    """The same manifest, and the same shards byte for byte (so the same records in order)."""
    manifest = storage.read_bytes(storage.join(want, "manifest.json"))
    assert storage.read_bytes(storage.join(got, "manifest.json")) == manifest
    for name in json.loads(manifest)["shards"]:
        shard = storage.read_bytes(storage.join(want, name))
        assert storage.read_bytes(storage.join(got, name)) == shard, name
    assert storage.list_names(got) == storage.list_names(want)


def test_beam_writes_what_the_single_process_prepare_writes(data, tmp_path, small_chunks):
    config = write_config(data, tmp_path / "config.yaml")
    rows = data[0] / "train.jsonl"
    local, beam = prepare_both(config, rows, tmp_path)
    assert_same_prepared(str(local), str(beam))
    manifest = json.loads((beam / "manifest.json").read_text())
    assert manifest["examples"] == 120 and len(manifest["shards"]) == 3

    # Training reads the Beam output as it reads the rows themselves.
    keys = ["train.batch_size=2"]
    from_rows = train_batches(load_config(config, [f"data.train={rows}", *keys]))
    from_beam = train_batches(load_config(config, [f"data.train={beam}", *keys]))
    for _ in range(5):
        want, got = next(from_rows), next(from_beam)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_skipped_rows_are_counted_and_the_examples_keep_their_places(data, tmp_path, small_chunks):
    config = write_config(data, tmp_path / "config.yaml")
    rows = with_bad_lines(data, tmp_path / "rows.jsonl", BAD_LINES)
    local, beam = prepare_both(config, rows, tmp_path, "data.skip_bad_rows=true")
    assert_same_prepared(str(local), str(beam))
    manifest = json.loads((beam / "manifest.json").read_text())
    assert (manifest["examples"], manifest["skipped_rows"]) == (117, 3)


def test_a_bad_row_is_the_one_line_error_of_the_single_process_prepare(data, tmp_path, capfd):
    config = write_config(data, tmp_path / "config.yaml")
    rows = with_bad_lines(data, tmp_path / "rows.jsonl", {40: BAD_LINES[40]})
    args = ["data", "prepare", str(config), "--data", str(rows)]
    assert main([*args, "--out", str(tmp_path / "local")]) == 1
    (want,) = [x for x in capfd.readouterr().err.splitlines() if x.startswith("jaxrm:")]
    assert f"{rows}:40: " in want

    assert main([*args, "--out", str(tmp_path / "beam"), "--runner", "beam"]) == 1
    # Only the line: no traceback, from this process or from a worker.
    assert capfd.readouterr().err.splitlines() == [want]
    assert not (tmp_path / "beam").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--direct_num_workers=two"], "argument --direct_num_workers: invalid int value: 'two'"),
        (["--direct_num_workers", "3", "--no_such_option=1"], "not a Beam pipeline option: --no"),
        (["--runner", "NoSuchRunner"], "--runner NoSuchRunner: Unexpected pipeline runner"),
        (["--runner", "DataflowRunner"], "give a bucket path (gs://...) as --out"),
        (["--direct_num_workers=3"], "Beam pipeline options need --runner beam"),
    ],
)
def test_a_bad_beam_option_is_one_line(data, tmp_path, capfd, options, message):
    config = write_config(data, tmp_path / "config.yaml")
    args = ["data", "prepare", str(config), "--data", str(data[0] / "train.jsonl")]
    runner = [] if "--runner" in options or "need --runner" in message else ["--runner", "beam"]
    assert main([*args, "--out", str(tmp_path / "out"), *runner, *options]) == 1
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("jaxrm: error: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_without_apache_beam_runner_beam_says_what_to_install(data, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam fails
    config = write_config(data, tmp_path / "config.yaml")
    args = ["data", "prepare", str(config), "--out", str(tmp_path / "out"), "--runner", "beam"]
    assert main([*args, f"data.train={data[0] / 'train.jsonl'}"]) == 1
    (line,) = capfd.readouterr().err.splitlines()
    assert line.endswith("pip install 'jaxrm[beam]'"), line


@pytest.mark.slow
def test_beam_writes_a_bucket_as_the_single_process_prepare_does(gcs, data, tmp_path, capfd):
    bucket = gcs.create_bucket("jaxrm-beam")
    config = write_config(data, tmp_path / "config.yaml")
    rows = with_bad_lines(data, tmp_path / "rows.jsonl", {40: BAD_LINES[40]})
    args = ["data", "prepare", str(config), "--data", str(rows), "--shard-size", "50"]
    beam = ["--runner", "beam"]
    # A failed pipeline leaves nothing in the bucket (its workers wrote shards there).
    assert main([*args, "--out", f"{bucket}/failed", *beam]) == 1
    assert ":40: " in capfd.readouterr().err
    assert not storage.exists(f"{bucket}/failed")

    skip = "data.skip_bad_rows=true"
    assert main([*args, "--out", f"{bucket}/local", skip]) == 0
    assert main([*args, "--out", f"{bucket}/beam", skip, *beam]) == 0
    assert_same_prepared(f"{bucket}/local", f"{bucket}/beam")


@pytest.mark.slow
def test_bench_prepare_runs_both_and_finds_the_same_records(tmp_path):
    bench = REPO / "benchmarks" / "bench_prepare.py"
    command = [sys.executable, str(bench), "--rows", "300", "--words", "3", "12", "--repeats", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "records identical: yes" in done.stdout, done.stdout
