"""Multi-host training: processes joined by jax.distributed on 127.0.0.1 train like one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from data_helpers import child_xla_flags
from flax import nnx

from jaxrm import storage
from jaxrm.checkpoint.loading import load_model
from jaxrm.config import CheckpointConfig
from jaxrm.errors import UserError
from jaxrm.train.checkpoints import TrainCheckpoints
from jaxrm.train.distributed import initialize
from jaxrm.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RUN = [
    "configs/tiny_polar.yaml",
    "train.steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=3",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_process(output_dir: Path, devices: int, *flags: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": child_xla_flags(devices),
    }
    command = [sys.executable, "-m", "jaxrm", "train", *RUN, f"output_dir={output_dir}", *flags]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gcs):
    """(two processes x 4 devices, one process x 8 devices) run directories of the same config;
    the two processes write theirs into a Cloud Storage bucket, as a TPU slice's hosts do, and
    split each row over two devices of a host (`mesh.context=2`)."""
    root = tmp_path_factory.mktemp("multihost")
    two_hosts = f"{gcs.create_bucket('multihost')}/two_hosts"
    coordinator = f"127.0.0.1:{free_port()}"
    hosts = [
        train_process(
            two_hosts,
            4,
            f"--coordinator={coordinator}",
            "--num-processes=2",
            f"--process-id={index}",
            "mesh.context=2",
        )
        for index in range(2)
    ]
    one_host = train_process(root / "one_host", 8)  # meanwhile: each process is mostly one thread
    for process in [*hosts, one_host]:
        finish(process)
    return two_hosts, root / "one_host"


@pytest.mark.slow
def test_two_hosts_train_like_one(runs):
    two_hosts, one_host = runs
    got, want = read_metrics(two_hosts), read_metrics(one_host)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 3]  # eval at 0, three steps, eval at 3
    for mine, theirs in zip(got, want, strict=True):
        for key in ("loss", "accuracy", "tokens", "eval/loss", "eval/accuracy"):
            if key in theirs:
                np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, err_msg=key)
    assert got[1]["loss"] != got[3]["loss"]  # it trained


@pytest.mark.slow
def test_checkpoint_of_two_hosts_restores_in_one_process(runs):
    two_hosts, one_host = runs
    assert storage.list_names(f"{two_hosts}/checkpoints/3/data") == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    got = nnx.to_pure_dict(nnx.state(load_model(two_hosts).model, nnx.Param))
    want = nnx.to_pure_dict(nnx.state(load_model(one_host).model, nnx.Param))
    # Adam divides by tiny second moments early on, so summation order shows at ~1e-6, and at
    # ~1e-5 where split rows add their keys' and values' gradients over the context shards.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got, want)


@pytest.mark.slow
def test_one_process_resumes_the_run_of_two(runs, tmp_path):
    """Each row of the global batch is its own data stream, so the two hosts' positions regroup
    into one: the resumed step equals the one-process run's next step."""
    two_hosts, one_host = runs
    continued = tmp_path / "one_host"
    shutil.copytree(one_host, continued)
    for process in [train_process(run, 8, "train.steps=4") for run in (two_hosts, continued)]:
        finish(process)
    got, want = read_metrics(two_hosts), read_metrics(continued)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 3, 4, 4]
    for mine, theirs in zip(got[-2:], want[-2:], strict=True):
        for key in ("loss", "accuracy", "tokens", "eval/loss"):
            if key in theirs:
                np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_hosts_that_split_rows_between_them_train_like_one(runs, tmp_path):
    """`mesh.context=8` over two hosts of 4 devices: both hosts read every row, each device holds
    an eighth of each; metrics and parameters equal the one-process run's, and the data
    positions both hosts saved for the same rows regroup for another number of hosts."""
    _, one_host = runs
    run = tmp_path / "run"
    coordinator = f"127.0.0.1:{free_port()}"
    hosts = [
        train_process(
            run,
            4,
            f"--coordinator={coordinator}",
            "--num-processes=2",
            f"--process-id={index}",
            "mesh.fsdp=1",
            "mesh.context=8",
        )
        for index in range(2)
    ]
    for host in hosts:
        finish(host)
    got, want = read_metrics(run), read_metrics(one_host)
    for mine, theirs in zip(got, want, strict=True):
        for key in ("loss", "accuracy", "tokens", "eval/loss"):
            if key in theirs:
                np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, err_msg=key)
    got = nnx.to_pure_dict(nnx.state(load_model(run).model, nnx.Param))
    want = nnx.to_pure_dict(nnx.state(load_model(one_host).model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got, want)

    saved = [
        json.loads((run / f"checkpoints/3/data/process_{i}-of-2.json").read_text()) for i in (0, 1)
    ]
    assert saved[0] == saved[1] and saved[0]["rows"] == [0, 8]
    checkpoints = TrainCheckpoints(run, CheckpointConfig(), {})
    regrouped = checkpoints.regrouped_data_state(3, 2, range(2, 6))
    checkpoints.close()
    assert regrouped == {key: saved[0][key][2:6] for key in ("streams", "ended")}


@pytest.fixture
def no_cluster(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        (
            ("127.0.0.1:1", None, None),
            {},
            "--num-processes (or JAX_NUM_PROCESSES) and --process-id",
        ),
        ((None, 2, 0), {}, "--coordinator (or JAX_COORDINATOR_ADDRESS)"),
        (("127.0.0.1:1", 2, 2), {}, "process id 2 is not in 0..1"),
        (
            (None, None, None),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            "'two'",
        ),
    ],
)
def test_incomplete_multi_host_settings_are_one_line_errors(
    no_cluster, monkeypatch, arguments, environment, message
):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"^multi-host: ") as error:
        initialize(*arguments)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_lone_process_runs_alone(no_cluster):
    initialize()
    assert jax.process_count() == 1
