"""A run directory under faults an operator meets: a full disk, a read-only checkpoints/
directory, a second trainer started on the same run. Each ends in one line within seconds, and
what was saved before stays intact."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_helpers import jaxrm_cli, tiny_run

from jaxrm.checkpoint.loading import load_model
from jaxrm.config import dump_config, load_config
from jaxrm.train.loop import train


def _namespaces_work() -> bool:
    """Whether this machine lets a test mount its own tmpfs (user + mount namespaces)."""
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "x", "/mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(), reason="user and mount namespaces are not allowed here"
)


def write_config(data, path: Path, run_dir: Path, *overrides: str) -> Path:
    directory, tokenizer = data
    config = load_config(
        None,
        tiny_run(
            directory / "train.jsonl",
            tokenizer,
            f"output_dir={run_dir}",
            "train.log_every=1",
            "mesh.fsdp=1",
            *overrides,
        ),
    )
    path.write_text(dump_config(config))
    return path


def in_namespace(script: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Runs a shell script as root of its own user and mount namespaces (its mounts vanish with
    it); returns the result and the seconds it took."""
    start = time.monotonic()
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-ec", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "XLA_FLAGS": ""},  # one CPU device, as jaxrm_cli starts it
    )
    return done, time.monotonic() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("jaxrm:", "Traceback"))]


def train_command(config: Path, *overrides: str) -> str:
    return " ".join([sys.executable, "-m", "jaxrm", "train", str(config), *overrides])


@needs_namespaces
def test_a_disk_without_room_for_a_checkpoint_stops_the_run_at_once(data, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    config = write_config(data, tmp_path / "run.yaml", disk / "run", "train.steps=4")
    done, seconds = in_namespace(f"mount -t tmpfs -o size=1m tmpfs {disk}; {train_command(config)}")
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert "MB free on its disk, but a checkpoint takes up to" in line, line
    assert "saved steps: none" in line and seconds < 60


@needs_namespaces
def test_a_disk_that_fills_up_stops_the_run_with_its_saved_steps_intact(data, tmp_path):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    config = write_config(
        data,
        tmp_path / "run.yaml",
        disk / "run",
        "train.steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=5",
    )
    done, _ = in_namespace(
        f"mount -t tmpfs -o size=2500k tmpfs {disk}; {train_command(config)} || echo rc=$?; "
        f"cp -r {disk}/run {kept}"
    )
    assert "rc=1" in done.stdout
    (line,) = error_lines(done.stderr)
    assert "step 4 is not saved" in line and "saved steps: [2]" in line, line
    steps = [json.loads(x)["step"] for x in (kept / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    load_model(kept / "checkpoints" / "2")  # its checksums still hold


@needs_namespaces
def test_a_read_only_checkpoints_directory_stops_the_run_in_one_line(data, tmp_path):
    run = tmp_path / "run"
    config = write_config(data, tmp_path / "run.yaml", run, "train.steps=2")
    train(load_config(str(config), ["mesh.fsdp=-1"]))  # this process has 8 devices
    before = sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*"))
    checkpoints = run / "checkpoints"
    done, seconds = in_namespace(
        f"mount --bind {checkpoints} {checkpoints}; "
        f"mount -o remount,bind,ro {checkpoints}; {train_command(config, 'train.steps=4')}"
    )
    assert done.returncode != 0
    (line,) = error_lines(done.stderr)
    assert line == f"jaxrm: error: cannot write to {checkpoints}: Read-only file system", line
    assert seconds < 60
    assert sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*")) == before


@pytest.mark.slow
def test_a_second_trainer_on_a_running_run_is_refused_and_the_first_logs_every_step(data, tmp_path):
    run = tmp_path / "run"
    # More steps than it will take: it runs until stopped, however fast this machine is.
    config = write_config(data, tmp_path / "run.yaml", run, "train.steps=100000")
    first = jaxrm_cli("train", str(config))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    second = jaxrm_cli("train", str(config))
    _, err = second.communicate(timeout=300)
    assert first.poll() is None, "the first run ended before the second started"
    assert second.returncode == 1
    (line,) = error_lines(err)
    assert line.startswith(f"jaxrm: error: {run} is in use by another run (process {first.pid} on ")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, err
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and steps, steps
