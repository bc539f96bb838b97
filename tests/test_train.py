"""The train loop against itself run other ways: sharded vs one device, accumulated vs whole,
resumed (after SIGTERM, onto another mesh) vs uninterrupted; and the errors a user can cause."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from data_helpers import child_xla_flags, jaxrm_cli, polar_rows, tiny_run, write_jsonl
from flax import nnx

from jaxrm.checkpoint.loading import find_checkpoint, load_model
from jaxrm.config import dump_config, load_config
from jaxrm.data.pipeline import train_batches
from jaxrm.model.decoder import create_model
from jaxrm.sharding import make_mesh
from jaxrm.train.loop import train
from jaxrm.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def make_config(data, run_dir, *overrides):
    directory, tokenizer = data
    return load_config(
        None,
        tiny_run(
            directory / "train.jsonl",
            tokenizer,
            f"output_dir={run_dir}",
            "optimizer.weight_decay=0.01",
            "train.log_every=1",
            *overrides,
        ),
    )


def run_steps(config, mesh, batches):
    trainer = Trainer(config, mesh)
    model = create_model(config.model, config.train.seed, mesh, config.mesh.rules)
    state = trainer.init_state(model)
    losses = []
    for step, batch in enumerate(batches):
        state, metrics = trainer.step(state, trainer.global_batch(batch), step)
        losses.append(float(metrics["rank_loss"]) / float(metrics["examples"]))
    return jax.device_get(trainer.params(state)), losses


def first_batches(config, count):
    iterator = train_batches(config)
    return [next(iterator) for _ in range(count)]


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.slow
def test_sharded_steps_equal_single_device_steps(data, tmp_path):
    config = make_config(data, tmp_path, "mesh.fsdp=4", "mesh.tensor=2")
    batches = first_batches(config, 5)
    sharded = run_steps(config, make_mesh(1, 4, 2), batches)
    single = run_steps(config, make_mesh(1, 1, 1, devices=jax.devices()[:1]), batches)
    np.testing.assert_allclose(sharded[1], single[1], atol=1e-4)
    assert_trees_close(sharded[0], single[0], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["polar", "codepmp"])
def test_accumulating_micro_batches_equals_one_whole_batch(data, tmp_path, objective):
    extra = ["model.lm_head=true"] if objective == "codepmp" else []
    whole = make_config(data, tmp_path, f"objective={objective}", *extra)
    parts = make_config(data, tmp_path, f"objective={objective}", "train.micro_batches=4", *extra)
    batches = first_batches(whole, 2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    one = run_steps(whole, mesh, batches)
    four = run_steps(parts, mesh, batches)
    np.testing.assert_allclose(one[1], four[1], atol=1e-5)
    assert_trees_close(one[0], four[0], atol=1e-5)


def test_train_writes_run_dir_and_eval_metrics(data, tmp_path):
    directory, _ = data
    config = make_config(
        data,
        tmp_path / "run",
        "train.steps=4",
        "checkpoint.every=2",
        "checkpoint.keep=1",
        "train.eval_every=2",
        f"data.eval={directory / 'eval.jsonl'}",
    )
    summary = train(config)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    eval_lines = [line for line in lines if "eval/accuracy" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "lr", "tokens_per_sec", "mfu", "grad_norm", "reward_std"):
        assert all(np.isfinite(line[key]) for line in train_lines), key
    tokens = [line["tokens"] for line in train_lines]  # trained so far, for scaling fits
    assert 0 < tokens[0] < tokens[1] < tokens[2] < tokens[3]
    assert [line["step"] for line in eval_lines] == [0, 2, 4]  # 0: the starting point
    assert summary["eval/accuracy"] == eval_lines[-1]["eval/accuracy"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]  # keep=1
    assert list((run / "tensorboard").iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["reward_token_id"] == 5  # <|score|>, so exports know where to read
    kind, step_dir = find_checkpoint(run)
    assert (kind, step_dir.name) == ("jaxrm", "4")
    loaded = load_model(run)
    assert (loaded.tokenizer_dir / "tokenizer.model").is_file()
    assert loaded.config.model.reward_token_id == 5


@pytest.mark.slow
def test_init_from_starts_at_the_checkpoint_with_its_tokenizer(data, tmp_path):
    directory, _ = data
    evaluate = [f"data.eval={directory / 'eval.jsonl'}", "train.eval_every=0"]
    first = train(make_config(data, tmp_path / "first", "train.steps=3", *evaluate))
    second = make_config(
        data,
        tmp_path / "second",
        "train.steps=1",
        f"train.init_from={tmp_path / 'first'}",
        "data.tokenizer=null",
        *evaluate,
    )
    train(second)
    lines = [
        json.loads(line) for line in (tmp_path / "second/metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(lines[0]["eval/loss"], first["eval/loss"], rtol=1e-6)
    saved = yaml.safe_load((tmp_path / "second/config.yaml").read_text())
    assert saved["data"]["tokenizer"] == str(tmp_path / "first/checkpoints/3/tokenizer")


@pytest.mark.slow
def test_restore_onto_another_mesh_continues_the_same_run(data, tmp_path):
    steps = ["train.steps=6", "checkpoint.every=3"]
    full = train(make_config(data, tmp_path / "full", *steps, "mesh.fsdp=8"))
    train(
        make_config(data, tmp_path / "split", "train.steps=3", "checkpoint.every=3", "mesh.fsdp=8")
    )
    resumed = train(make_config(data, tmp_path / "split", *steps, "mesh.fsdp=2", "mesh.tensor=4"))
    assert resumed["step"] == 6
    # train.steps changed between the two halves, so the schedules differ: compare losses of
    # the first, shared steps and that training went on from the checkpoint.
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(full["loss"]) and np.isfinite(resumed["loss"])


def test_incompatible_config_names_the_differing_keys(data, tmp_path):
    train(make_config(data, tmp_path, "train.steps=1", "checkpoint.every=1"))
    with pytest.raises(Exception, match=r"optimizer\.lr: 0\.003 there, 0\.01 here") as error:
        train(make_config(data, tmp_path, "train.steps=2", "optimizer.lr=0.01"))
    assert "model.hidden_size" not in str(error.value)


def test_a_run_saved_with_cwd_relative_paths_still_resumes(data, tmp_path, monkeypatch):
    """Runs saved before config paths were made absolute hold them as given on the command line,
    relative to the directory they were started in."""
    from jaxrm.train.loop import _check_resumable

    monkeypatch.chdir(data[0])
    config = make_config(data, tmp_path, "data.train=train.jsonl")
    assert config.data.train == str(data[0] / "train.jsonl")
    saved = yaml.safe_load(dump_config(config))
    saved["data"]["train"] = "train.jsonl"
    _check_resumable(config, yaml.safe_dump(saved))  # the same file: no error
    saved["data"]["train"] = "other.jsonl"
    with pytest.raises(Exception, match=r"data\.train: '.*other\.jsonl' there"):
        _check_resumable(config, yaml.safe_dump(saved))


def test_an_unfinished_save_is_never_picked_up(data, tmp_path):
    train(make_config(data, tmp_path, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=5"))
    checkpoints = tmp_path / "checkpoints"
    # What a save killed midway leaves: Orbax's temporary directory with some items in it.
    partial = checkpoints / "3.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    assert find_checkpoint(tmp_path)[1].name == "2"
    summary = train(make_config(data, tmp_path, "train.steps=3", "checkpoint.every=1"))
    assert summary["step"] == 3


def write_config(data, path, run_dir, *overrides):
    config = make_config(data, run_dir, *overrides)
    path.write_text(dump_config(config))
    return path


def snapshot(directory: Path) -> dict:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(directory.rglob("*"))
    }


def resume_and_finish(cut_config: Path, whole: subprocess.Popen) -> None:
    """Runs the interrupted run's config to its end, and waits for the uninterrupted one."""
    resumed = jaxrm_cli("train", str(cut_config))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err


def logged(run: Path) -> list[tuple]:
    """What must match between runs in each metrics line (not the timings)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    keys = ("step", "loss", "accuracy", "grad_norm", "lr", "tokens", "flops")
    return [tuple(m.get(k) for k in keys) for m in map(json.loads, lines)]


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    # 40 steps: the cut comes at step 5 or so, and the resumed run crosses epochs of the rows.
    common = ["train.steps=40", "checkpoint.every=1000", "mesh.fsdp=1"]
    whole_cfg = write_config(data, tmp_path / "whole.yaml", tmp_path / "whole", *common)
    cut_cfg = write_config(data, tmp_path / "cut.yaml", tmp_path / "cut", *common)
    whole = jaxrm_cli("train", str(whole_cfg))

    cut = jaxrm_cli("train", str(cut_cfg))
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    cut.send_signal(signal.SIGTERM)
    _, err = cut.communicate(timeout=300)
    assert cut.returncode == 128 + signal.SIGTERM, err
    stopped_at = int(find_checkpoint(tmp_path / "cut")[1].name)
    assert 5 <= stopped_at < 40, err
    assert "run the same command again to resume" in err

    resume_and_finish(cut_cfg, whole)
    assert logged(tmp_path / "cut") == logged(tmp_path / "whole")
    a, b = (load_model(tmp_path / run).model for run in ("whole", "cut"))
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_killed_between_logs_then_resumed_logs_what_an_uninterrupted_run_logs(data, tmp_path):
    """log_every 10 does not divide checkpoint.every 12: a checkpoint carries the metrics of the
    steps after the last log, so the first log after a resume covers the same steps."""
    common = ["train.steps=60", "train.log_every=10", "checkpoint.every=12", "mesh.fsdp=1"]
    whole_cfg = write_config(data, tmp_path / "whole.yaml", tmp_path / "whole", *common)
    cut_cfg = write_config(data, tmp_path / "cut.yaml", tmp_path / "cut", *common)
    whole = jaxrm_cli("train", str(whole_cfg))
    cut = jaxrm_cli("train", str(cut_cfg))
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "cut" / "checkpoints" / "12").is_dir():
        time.sleep(0.01)
    cut.kill()
    cut.communicate(timeout=60)
    resumed_from = int(find_checkpoint(tmp_path / "cut")[1].name)
    assert 12 <= resumed_from < 60 and resumed_from % 12 == 0

    resume_and_finish(cut_cfg, whole)
    assert [r[0] for r in logged(tmp_path / "whole")] == [10, 20, 30, 40, 50, 60]
    assert logged(tmp_path / "cut") == logged(tmp_path / "whole")


@pytest.mark.slow
def test_a_second_start_takes_its_programs_from_the_compile_cache(data, tmp_path):
    cache = tmp_path / "xla"
    for run in ("first", "second"):
        config = write_config(data, tmp_path / f"{run}.yaml", tmp_path / run, "train.steps=2")
        started = time.perf_counter()
        done = jaxrm_cli("train", "--compile-cache", str(cache), str(config))
        _, err = done.communicate(timeout=300)
        assert done.returncode == 0, err
        seconds = time.perf_counter() - started
        entries = sorted(p.name for p in cache.iterdir())
        if run == "first":
            first_entries, first_seconds = entries, seconds
    assert first_entries and entries == first_entries  # the second start compiled nothing new
    assert seconds < first_seconds


@pytest.mark.slow
def test_user_errors_are_one_line_and_leave_checkpoints_alone(data, tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text((data[0] / "train.jsonl").read_text())
    run = tmp_path / "run"
    config = write_config(data, tmp_path / "run.yaml", run, "train.steps=1", f"data.train={rows}")
    done = jaxrm_cli("train", str(config))
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    before = snapshot(run / "checkpoints")

    # These three run at once: each ends in its error, and only one of them opens the run.
    bad_key = jaxrm_cli("train", str(config), "train.stepz=3")
    lines = rows.read_text().splitlines()
    lines[6] = '{"prompt": "p", "reference": "r", "chosen": "c"}'
    rows.write_text("\n".join(lines) + "\n")
    bad_rows = [  # resuming the run, and a new run
        jaxrm_cli("train", str(config), "train.steps=3", f"output_dir={run_dir}")
        for run_dir in (run, tmp_path / "fresh")
    ]
    _, err = bad_key.communicate(timeout=120)
    assert bad_key.returncode == 1
    assert err.strip().splitlines() == [
        "jaxrm: error: unknown config key 'train.stepz' (the command line); "
        "did you mean 'train.steps'?"
    ]
    for bad_row in bad_rows:
        _, err = bad_row.communicate(timeout=300)
        assert bad_row.returncode == 1
        (line,) = err.strip().splitlines()
        assert line.startswith(f"jaxrm: error: {rows}:7: field 'rejected' is missing"), err
    assert snapshot(run / "checkpoints") == before
    assert not (tmp_path / "fresh" / "checkpoints").exists()

    lines[6] = '{"prompt": "p", "reference": "r", "chosen": "c", "rejected": "d", "margin": NaN}'
    rows.write_text("\n".join(lines) + "\n")
    nan_margin = jaxrm_cli("train", str(config), "train.steps=3")
    _, err = nan_margin.communicate(timeout=300)
    assert nan_margin.returncode == 1
    assert err.strip().splitlines() == [
        f"jaxrm: error: {rows}:7: field 'margin' must be a finite number, got nan"
    ]
    assert snapshot(run / "checkpoints") == before


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_first_non_finite_step_and_saves_nothing_after(
    data, tmp_path, capsys
):
    """lr 1e30 sends the weights to ~1e30 in one step; the next forward pass overflows. That
    step is not applied, nothing after it is saved, and the run ends in one line naming it."""
    run = tmp_path / "run"
    config = write_config(
        data,
        tmp_path / "run.yaml",
        run,
        "train.steps=6",
        "checkpoint.every=1",
        "optimizer.lr=1e30",
        "optimizer.schedule=constant",
    )
    from jaxrm.cli import main

    assert main(["train", str(config)]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("jaxrm:")]
    assert line.startswith("jaxrm: error: step 2: the loss or gradient is not finite"), line
    assert find_checkpoint(run)[1].name == "1"
    params = nnx.state(load_model(run).model, nnx.Param)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_steps_after_the_first_compile_nothing(data, tmp_path, monkeypatch):
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    calls = {"step": [], "evaluate": []}
    for name in calls:
        original = getattr(Trainer, name)

        def counted(self, *args, _original=original, _name=name):
            before = len(compiles)
            result = _original(self, *args)
            calls[_name].append(len(compiles) - before)
            return result

        monkeypatch.setattr(Trainer, name, counted)
    config = make_config(
        data,
        tmp_path / "run",
        "train.steps=6",
        "train.eval_every=2",
        "checkpoint.every=3",
        f"data.eval={data[0] / 'eval.jsonl'}",
    )
    try:
        train(config)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(calls["step"]) == 6 and len(calls["evaluate"]) == 4  # evals at 0, 2, 4, 6
    assert calls["step"] == [0] * 6  # compiled ahead of the loop, once
    assert calls["evaluate"][0] > 0 and calls["evaluate"][1:] == [0, 0, 0]  # counted: compiled once


@pytest.fixture(scope="module")
def saved_twice(data, tmp_path_factory):
    """A run saved at steps 2 and 4, and its parameters at step 4."""
    run = tmp_path_factory.mktemp("saved_twice") / "run"
    train(make_config(data, run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5"))
    return run, jax.device_get(nnx.state(load_model(run).model, nnx.Param))


def damage(step_dir: Path, how: str) -> None:
    """Damages the largest array file of a checkpoint (or empties the checkpoint)."""
    if how == "emptied":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        return
    if how == "positions-deleted":
        shutil.rmtree(step_dir / "data")
        return
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    if how == "deleted":
        largest.unlink()
    elif how == "truncated":
        os.truncate(largest, largest.stat().st_size // 2)
    else:
        data = bytearray(largest.read_bytes())
        for i in range(64):
            data[len(data) // 3 + 97 * i] ^= 0x5A
        largest.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize(
    "how", ["bit-flipped", "truncated", "deleted", "emptied", "positions-deleted"]
)
def test_a_damaged_newest_checkpoint_is_refused_and_resume_falls_back(
    data, saved_twice, tmp_path, capsys, how
):
    from jaxrm.cli import main

    run = tmp_path / "run"
    shutil.copytree(saved_twice[0], run)
    damage(run / "checkpoints" / "4", how)
    rows = tmp_path / "score.jsonl"
    write_jsonl(rows, [{"prompt": r["prompt"], "response": r["chosen"]} for r in polar_rows(4)])
    commands = [
        ["export", str(run / "checkpoints" / "4"), str(tmp_path / "hf")],
        ["eval", str(run / "checkpoints" / "4"), "--data", str(data[0] / "eval.jsonl")],
        [
            "score",
            str(run / "checkpoints" / "4"),
            "--data",
            str(rows),
            "--out",
            str(tmp_path / "s"),
        ],
    ]
    for command in commands if how != "positions-deleted" else []:  # the model is intact
        capsys.readouterr()
        assert main(command) == 1, command
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("jaxrm: error:") and "checkpoints/4" in line, line
    assert not (tmp_path / "hf").exists() and not (tmp_path / "s").exists()

    summary = train(
        make_config(data, run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    )
    assert summary["step"] == 4
    (notice,) = [x for x in capsys.readouterr().err.splitlines() if "moved it to" in x]
    assert f"{run}/damaged/4" in notice
    resumed = jax.device_get(nnx.state(load_model(run).model, nnx.Param))
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(saved_twice[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def with_bad_lines(data, path: Path, bad: dict[int, str]) -> Path:
    """The train rows with line i (from 1) replaced by bad[i]."""
    lines = (data[0] / "train.jsonl").read_text().splitlines()
    for number, text in bad.items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skipped_rows_go_to_bad_rows_jsonl_and_a_summary(data, tmp_path, capsys):
    rows = with_bad_lines(
        data,
        tmp_path / "train.jsonl",
        {4: '{"prompt": "p", "reference": "r", "chosen": "c"}', 9: "x"},
    )
    run = tmp_path / "run"
    train(make_config(data, run, "train.steps=2", f"data.train={rows}", "data.skip_bad_rows=true"))
    records = [json.loads(x) for x in (run / "bad_rows.jsonl").read_text().splitlines()]
    assert {(r["file"], r["line"], r["kind"]) for r in records} == {
        (str(rows), 4, "field 'rejected' is missing"),
        (str(rows), 9, "not valid JSON"),
    }
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["bad_rows"] for m in metrics) == len(records)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("jaxrm: skipped")]
    missing = sum(r["line"] == 4 for r in records)
    assert line.startswith(f"jaxrm: skipped {len(records)} bad rows (")
    assert f"{missing}x field 'rejected' is missing" in line
    assert f"{len(records) - missing}x not valid JSON" in line
    assert line.endswith(f") in {rows}; see {run / 'bad_rows.jsonl'}")


# Runs its arguments and prints their peak resident KiB. A process's peak counts the memory of the
# process it was started from (Linux carries it over fork and exec), so the measured command
# starts from this small one, not from the test process.
PEAK_MEMORY = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def run_measured(*args: str, stderr: Path) -> tuple[int, int]:
    """(exit code, peak resident KiB) of `python -m jaxrm ARGS`, its stderr written to `stderr`."""
    with open(stderr, "w") as err:
        done = subprocess.run(
            [sys.executable, "-c", PEAK_MEMORY, sys.executable, "-m", "jaxrm", *args],
            env={**os.environ, "XLA_FLAGS": child_xla_flags()},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    return done.returncode, int(done.stdout.split()[-1])


def test_a_20_mb_line_is_one_error_in_little_memory(data, tmp_path, capsys):
    """A 20 MB line once took the trainer past 13 GB: tokenised in up to 16 threads at once,
    ~50x its size each. Over the row limit, it is refused before it is read."""
    big = json.loads((data[0] / "train.jsonl").read_text().splitlines()[0])
    big["chosen"] = "word " * (4 << 20)
    rows = with_bad_lines(data, tmp_path / "train.jsonl", {6: json.dumps(big)})
    config = write_config(data, tmp_path / "run.yaml", tmp_path / "run", f"data.train={rows}")
    expected = f"jaxrm: error: {rows}:6: row over the 8 MiB limit of one row (20.0 MiB)"

    code, peak_kib = run_measured("train", str(config), stderr=tmp_path / "err")
    assert code == 1
    assert (tmp_path / "err").read_text().strip().splitlines() == [expected]
    assert peak_kib < 1 << 20  # under 1 GiB

    from jaxrm.cli import main

    assert main(["data", "prepare", str(config), "--out", str(tmp_path / "prepared")]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("jaxrm:")]
    assert line == expected


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its new parent may never reap it


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_worker_processes_die_with_a_killed_trainer(data, tmp_path):
    config = write_config(
        data,
        tmp_path / "run.yaml",
        tmp_path / "run",
        "train.steps=100000",
        "checkpoint.every=100000",
        "data.num_workers=2",
    )
    with open(tmp_path / "err", "w") as err:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "jaxrm", "train", str(config)],
            env={**os.environ, "XLA_FLAGS": child_xla_flags()},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        assert trainer.poll() is None, (tmp_path / "err").read_text()
        time.sleep(0.1)
    workers = children(trainer.pid)
    assert len(workers) >= 2  # Grain's two workers (and multiprocessing's resource tracker)
    trainer.kill()
    trainer.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.1)
    assert not any(map(alive, workers))


@pytest.mark.slow
def test_unreadable_checkpoints_are_never_moved_unless_an_intact_one_remains(
    data, saved_twice, tmp_path, monkeypatch
):
    import orbax.checkpoint as ocp

    from jaxrm.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(saved_twice[0], run)
    resume = make_config(data, run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5")
    with monkeypatch.context() as patch:  # storage that fails (not the checkpoint's fault)
        patch.setattr(
            ocp.CheckpointManager,
            "restore",
            lambda *a, **k: (_ for _ in ()).throw(ConnectionError("reset")),
        )
        with pytest.raises(
            UserError, match=r"cannot read .*checkpoints/4 \(reset\); the checkpoint was left"
        ):
            train(resume)
    damage(run / "checkpoints" / "4", "truncated")
    damage(run / "checkpoints" / "2", "bit-flipped")
    with pytest.raises(UserError, match=r"no checkpoint in .* can be read .* nothing was moved"):
        train(resume)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (run / "damaged").exists()
