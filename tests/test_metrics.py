"""metrics.jsonl, TensorBoard events, resume truncation, plots and `jaxrm plot`."""

import argparse
import json
import math
import struct
from pathlib import Path

import pytest

from jaxrm.errors import UserError
from jaxrm.train.metrics import MetricsLogger, add_command, plot_run, read_metrics


def train_metrics(step: int) -> dict[str, float]:
    return {"loss": 1.0 / step, "accuracy": 0.5 + step / 100, "lr": 1e-3, "tokens_per_sec": 900.0}


def log_steps(run_dir: Path, steps: range, resume_step: int = 0) -> None:
    with MetricsLogger(run_dir, resume_step) as logger:
        for step in steps:
            logger.log(step, train_metrics(step))


def events(run_dir: Path) -> list:
    """Every Event of the run's event files, read through the TFRecord framing with its CRCs."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    found = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            header = data[i : i + 8]
            assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(header)
            (length,) = struct.unpack("<Q", header)
            payload = data[i + 12 : i + 12 + length]
            crc = data[i + 12 + length : i + 16 + length]
            assert struct.unpack("<I", crc)[0] == masked_crc32c(payload)
            found.append(Event.FromString(payload))
            i += 16 + length
    return found


def scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events(run_dir) for v in e.summary.value}


def test_log_and_read_back(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, train_metrics(1))
        logger.log(2, train_metrics(2))
        logger.log(2, {"loss": 0.75, "accuracy": 0.6}, prefix="eval/")
    assert read_metrics(tmp_path) == [
        {"step": 1, **train_metrics(1)},
        {"step": 2, **train_metrics(2)},
        {"step": 2, "eval/loss": 0.75, "eval/accuracy": 0.6},
    ]


def test_each_line_is_flushed_when_logged(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5})
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]


def test_tensorboard_events_hold_the_scalars(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5, "lr": 1e-3})
        logger.log(3, {"loss": 0.25}, prefix="eval/")
    assert scalars(tmp_path) == {
        ("loss", 1): 0.5,
        ("lr", 1): pytest.approx(1e-3),  # simple_value is a float32
        ("eval/loss", 3): 0.25,
    }


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    uninterrupted = tmp_path / "uninterrupted"
    log_steps(uninterrupted, range(1, 13))
    resumed = tmp_path / "resumed"
    log_steps(resumed, range(1, 11))
    log_steps(resumed, range(7, 13), resume_step=6)

    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 13))
    assert (resumed / "metrics.jsonl").read_bytes() == (
        uninterrupted / "metrics.jsonl"
    ).read_bytes()
    # TensorBoard hides the interrupted run's events from step 7 on.
    starts = [e.step for e in events(resumed) if e.HasField("session_log")]
    assert 7 in starts


def test_skipped_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path: Path) -> None:
    record = {"file": "a.jsonl", "line": 3, "kind": "not valid JSON", "error": "not valid JSON"}
    with MetricsLogger(tmp_path) as logger:
        logger.log_bad_rows(2, [record])
        logger.log_bad_rows(5, [record, {**record, "line": 9}])
    with MetricsLogger(tmp_path, resume_step=4) as logger:
        logger.log_bad_rows(6, [{**record, "line": 9}])
    lines = (tmp_path / "bad_rows.jsonl").read_text().splitlines()
    assert [(r["step"], r["line"]) for r in map(json.loads, lines)] == [(2, 3), (6, 9)]


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    log_steps(tmp_path, range(1, 4))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.2')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]

    log_steps(tmp_path, range(4, 6), resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_broken_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(UserError, match=rf"^{tmp_path / 'metrics.jsonl'}:2: not a JSON line"):
        read_metrics(tmp_path)


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": math.nan, "grad_norm": math.inf, "accuracy": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=pytest.fail) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "accuracy": 0.5,
    }
    [record] = read_metrics(tmp_path)
    assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"])
    tensorboard = scalars(tmp_path)
    assert math.isnan(tensorboard["loss", 1]) and tensorboard["grad_norm", 1] == math.inf


def test_plot_writes_a_png_per_logged_metric(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 11):
            logger.log(step, {**train_metrics(step), "grad_norm": math.nan if step == 5 else 1.0})
            if step % 5 == 0:
                logger.log(step, {"loss": 0.5, "accuracy": 0.7}, prefix="eval/")

    written = plot_run(tmp_path)
    names = ["loss", "accuracy", "lr", "grad_norm", "tokens_per_sec"]
    assert written == [tmp_path / "plots" / f"{name}.png" for name in names]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000
    assert plot_run(tmp_path, tmp_path / "elsewhere")[0] == tmp_path / "elsewhere" / "loss.png"


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.run(args)


def test_plot_command_prints_the_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log_steps(tmp_path, range(1, 3))
    run_cli(["plot", str(tmp_path), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / "out" / f"{name}.png")
        for name in ("loss", "accuracy", "lr", "tokens_per_sec")
    ]


def test_plot_command_names_a_missing_or_empty_metrics_file(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    with pytest.raises(UserError, match=rf"^{metrics} does not exist"):
        run_cli(["plot", str(tmp_path)])
    metrics.touch()
    with pytest.raises(UserError, match=rf"^{metrics} is empty"):
        run_cli(["plot", str(tmp_path)])
