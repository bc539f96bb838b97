"""gs:// end to end, against a Cloud Storage emulator on 127.0.0.1 (the `gcs` fixture): runs,
checkpoints, prepared data, exports and generated files in a bucket behave as on a local disk."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import numpy as np
import pytest
from data_helpers import (
    hf_model,
    jaxrm_cli,
    polar_rows,
    sentence,
    tiny_run,
    train_sentencepiece,
    write_jsonl,
)
from flax import nnx

from jaxrm import storage
from jaxrm.checkpoint.loading import find_checkpoint, load_model
from jaxrm.cli import main
from jaxrm.config import dump_config, load_config
from jaxrm.data.pipeline import train_batches
from jaxrm.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bucket(gcs):
    """A bucket holding the training rows and the tokenizer, as a TPU run would read them."""
    return gcs.create_bucket("jaxrm-runs")


def upload(local: Path, url: str) -> str:
    storage.upload(local, url)
    return url


def run_args(data, output_dir, *overrides):
    """`jaxrm train CONFIG` for the tiny preset on `data`, the config written beside the data."""
    directory, tokenizer = data
    keys = tiny_run(
        directory / "train.jsonl",
        tokenizer,
        f"output_dir={output_dir}",
        "model.preset=tiny",
        "train.log_every=1",
        "train.eval_every=0",
        "mesh.fsdp=1",
        *overrides,
    )
    config = directory / f"run-{abs(hash(tuple(keys)))}.yaml"
    config.write_text(dump_config(load_config(None, keys)))
    return ["train", str(config)]


def logged(records):
    keys = ("step", "loss", "accuracy", "lr", "tokens", "flops")
    return [tuple(r.get(k) for k in keys) for r in records]


@pytest.mark.slow
def test_sigterm_in_a_bucket_then_resume_equals_an_uninterrupted_local_run(
    gcs, bucket, data, tmp_path
):
    directory, tokenizer = data
    rows = upload(directory / "train.jsonl", f"{bucket}/data/train.jsonl")
    remote_tokenizer = upload(tokenizer, f"{bucket}/tokenizer/{tokenizer.name}")
    common = ["train.steps=30", "checkpoint.every=10", "checkpoint.keep=2"]
    whole = jaxrm_cli(*run_args(data, tmp_path / "whole", *common))
    run = f"{bucket}/sigterm"
    remote = [f"data.train={rows}", f"data.tokenizer={remote_tokenizer}", *common]
    cut = jaxrm_cli(*run_args(data, run, *remote))
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None:
        if any(n.endswith("commit_success.txt") for n in gcs.objects(f"{run}/checkpoints/10/")):
            break
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    _, err = cut.communicate(timeout=300)
    assert cut.returncode == 128 + signal.SIGTERM, err
    stopped_at = int(storage.name(find_checkpoint(run)[1]))
    assert 10 <= stopped_at < 30, err
    assert f"checkpoint saved in {run}/checkpoints/{stopped_at}" in err

    resumed = jaxrm_cli(*run_args(data, run, *remote))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err

    assert logged(read_metrics(run)) == logged(read_metrics(tmp_path / "whole"))
    events = [n for n in gcs.objects(f"{run}/tensorboard/") if "tfevents" in n]
    assert len(events) == 2  # one event file per process that trained
    a, b = (load_model(where).model for where in (tmp_path / "whole", run))
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sorted({n.split("/")[2] for n in gcs.objects(f"{run}/checkpoints/")}) == ["20", "30"]

    # What reads a run reads it from the bucket: plot writes its PNGs there.
    assert main(["plot", run]) == 0
    assert gcs.read(f"{run}/plots/loss.png").startswith(b"\x89PNG")


@pytest.mark.slow
def test_prepared_data_in_a_bucket_trains_on_the_same_batches(bucket, data, tmp_path):
    directory, tokenizer = data
    config = tmp_path / "config.yaml"
    config.write_text(
        f"objective: polar\ndata:\n  tokenizer: {tokenizer}\n  reward_token: <|score|>\n"
        "  seq_len: 256\n  max_length: 128\n"
    )
    out = f"{bucket}/prepared"
    args = ["data", "prepare", str(config), "--data", str(directory / "train.jsonl")]
    assert main([*args, "--out", out, "--shard-size", "50"]) == 0
    manifest = json.loads(storage.read_text_file(f"{out}/manifest.json"))
    assert manifest["examples"] == 120 and len(manifest["shards"]) == 3
    assert main([*args, "--out", out]) == 1  # never written over

    overrides = ["train.batch_size=2"]
    raw = load_config(config, [f"data.train={directory / 'train.jsonl'}", *overrides])
    prepared = load_config(config, [f"data.train={out}", *overrides])
    from_raw, from_prepared = train_batches(raw), train_batches(prepared)
    for _ in range(10):
        want, got = next(from_raw), next(from_prepared)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_export_to_a_bucket_and_import_back_gives_the_same_weights(bucket, data, tmp_path):
    run = tmp_path / "run"
    assert main(run_args(data, run, "train.steps=2", "mesh.fsdp=-1")) == 0
    exported, imported = f"{bucket}/export", f"{bucket}/imported"
    assert main(["export", str(run), exported]) == 0
    assert storage.is_file(f"{exported}/config.json")
    assert main(["import", exported, imported]) == 0
    assert main(["import", exported, imported]) == 1  # never written over
    want = nnx.to_pure_dict(nnx.state(load_model(run).model, nnx.Param))
    got = nnx.to_pure_dict(nnx.state(load_model(imported).model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)

    # On object storage a save is complete only once Orbax wrote commit_success.txt: a newer
    # step without it (a save cut short) is passed over.
    copied = f"{bucket}/copied"
    for step in (2, 4):
        storage.upload(run / "checkpoints" / "2", f"{copied}/checkpoints/{step}")
    storage.remove(f"{copied}/checkpoints/4/commit_success.txt")
    assert find_checkpoint(copied) == ("jaxrm", f"{copied}/checkpoints/2")

    # Scoring reads the model and the rows from the bucket and writes its output there.
    rows = [{**r, "response": r["chosen"]} for r in polar_rows(6, seed=3)]
    local_rows = write_jsonl(tmp_path / "score.jsonl", rows)
    remote_rows = upload(local_rows, f"{bucket}/score/rows.jsonl")
    assert main(["score", str(run), "--data", str(local_rows), "--out", str(tmp_path / "s")]) == 0
    scored = f"{bucket}/score/scored.jsonl"
    assert main(["score", imported, "--data", remote_rows, "--out", scored]) == 0
    local_rewards = [json.loads(x)["reward"] for x in (tmp_path / "s").read_text().splitlines()]
    remote_rewards = [json.loads(x)["reward"] for x in storage.read_text_file(scored).splitlines()]
    np.testing.assert_allclose(remote_rewards, local_rewards, atol=1e-6)


@pytest.mark.slow
def test_generate_into_a_bucket_killed_and_rerun_equals_an_uninterrupted_run(gcs, bucket, tmp_path):
    tokenizer = train_sentencepiece(tmp_path / "tokenizer")
    model = hf_model("llama", "ForCausalLM", scale=0.3, vocab_size=320, bos_token_id=1)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(tmp_path / "llama")
    for file in tokenizer.parent.iterdir():
        (tmp_path / "llama" / file.name).write_bytes(file.read_bytes())
    rng = __import__("random").Random(0)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": sentence(rng, 6)} for _ in range(24)]
    )
    args = [
        "generate", str(tmp_path / "llama"), "model.dtype=float32", "--prompts", str(prompts),
        "--max-new-tokens", "16", "--batch-size", "2", "--n", "2", "--upload-every", "0",
    ]  # fmt: skip
    whole = jaxrm_cli(*args, "--out", str(tmp_path / "whole.jsonl"))
    out = f"{bucket}/generated/rows.jsonl"
    cut = jaxrm_cli(*args, "--out", out)
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None:
        if len(gcs.objects(f"{out}.parts/")) >= 2:
            break
        time.sleep(0.02)
    cut.kill()
    cut.communicate(timeout=60)
    assert len(gcs.objects(f"{out}.parts/")) >= 2 and not storage.exists(out)

    rerun = jaxrm_cli(*args, "--out", out)
    output, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert json.loads(output.splitlines()[-1])["resumed_from"] >= 2
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    assert gcs.read(out) == (tmp_path / "whole.jsonl").read_bytes()
    assert gcs.objects(f"{out}.parts/") == []


class DenyWrites(BaseHTTPRequestHandler):
    """A front to the emulator that answers every write as Cloud Storage answers a caller without
    storage.objects.create (fake-gcs-server checks no permissions); reads pass through."""

    emulator = ""

    def do_GET(self):
        try:
            with urllib.request.urlopen(self.emulator + self.path, timeout=10) as reply:
                status, headers, body = reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        self.send_response(status)
        self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def deny(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        message = (
            "caller does not have storage.objects.create access to the Google Cloud Storage object."
        )
        body = json.dumps({"error": {"code": 403, "message": message, "errors": [
            {"message": message, "domain": "global", "reason": "forbidden"}]}}).encode()  # fmt: skip
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_PATCH = do_DELETE = deny

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_missing_bucket_or_a_denied_write_is_one_line_and_saves_nothing(gcs, bucket, data):
    missing = jaxrm_cli(*run_args(data, "gs://no-such-bucket/run", "train.steps=2"))
    _, err = missing.communicate(timeout=300)
    assert missing.returncode == 1, err
    assert err.strip().splitlines() == [
        "jaxrm: error: cannot use gs://no-such-bucket/run: the bucket no-such-bucket does not exist"
    ]
    assert not storage.exists("gs://no-such-bucket")

    DenyWrites.emulator = gcs.url
    server = ThreadingHTTPServer(("127.0.0.1", 0), DenyWrites)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    front = f"http://127.0.0.1:{server.server_address[1]}"
    endpoints = (
        "STORAGE_EMULATOR_HOST",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT",
        "TENSORSTORE_GCS_HTTP_URL",
    )
    try:
        denied = jaxrm_cli(
            *run_args(data, f"{bucket}/denied", "train.steps=2"),
            env=dict.fromkeys(endpoints, front),
        )
        _, err = denied.communicate(timeout=300)
    finally:
        server.shutdown()
    assert denied.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0] and f"{bucket}/denied" in lines[0]
    assert gcs.objects("jaxrm-runs/denied") == []


def test_no_request_leaves_the_loopback(gcs, tmp_path):
    """Every GCS client is pointed at 127.0.0.1, and every Python process of the suite refuses
    (and logs) connections and name lookups past it: tests/netguard/sitecustomize.py, checked
    at the end of the session by conftest.py. CI also runs the suite in a network namespace whose
    only interface is the loopback, which holds native code (tensorstore, array-record) too."""
    if os.environ.get("JAXRM_TEST_NETNS") == "1":
        assert [name for _, name in socket.if_nameindex()] == ["lo"]
    for name in (
        "STORAGE_EMULATOR_HOST",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT",
        "TENSORSTORE_GCS_HTTP_URL",
    ):
        assert os.environ[name].startswith("http://127.0.0.1:"), name
    assert os.environ["GCE_METADATA_HOST"].startswith("127.0.0.1:")
    log = tmp_path / "refused.log"
    probe = "import socket; socket.create_connection(('storage.googleapis.com', 443), timeout=5)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "JAXRM_NETGUARD_LOG": str(log)},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "test network guard" in result.stderr
    assert "storage.googleapis.com" in log.read_text()
    assert Path(os.environ["JAXRM_NETGUARD_LOG"]).read_text() == ""


def test_a_run_in_a_bucket_is_locked_by_a_lease_that_lapses_when_its_holder_dies(bucket, capsys):
    from jaxrm.errors import UserError
    from jaxrm.train import run_lock

    run = f"{bucket}/locked-run"
    lock = f"{run}/{run_lock.LOCK_FILE}"
    with run_lock.run_lock(run):
        refused = pytest.raises(UserError, match=rf"in use by another run \(process {os.getpid()} ")
        with refused, run_lock.run_lock(run):
            pass
        assert json.loads(storage.read_text_file(lock))["pid"] == os.getpid()
    assert not storage.exists(lock)  # released at the end

    lapsed = {"host": "tpu-vm-7", "pid": 4242, "started": 0, "renewed": time.time() - 600}
    storage.write_bytes(lock, json.dumps(lapsed).encode())
    with run_lock.run_lock(run):
        assert "taking over the lapsed lease of process 4242 on tpu-vm-7" in capsys.readouterr().err
        assert json.loads(storage.read_text_file(lock))["pid"] == os.getpid()


def test_a_run_whose_lease_was_taken_over_stops_at_its_next_save(bucket, monkeypatch):
    from jaxrm.errors import UserError
    from jaxrm.train import run_lock

    monkeypatch.setattr(run_lock, "RENEW_SECONDS", 0.2)
    run = f"{bucket}/cut-off-run"
    lock = f"{run}/{run_lock.LOCK_FILE}"
    with run_lock.run_lock(run) as held:
        held.check()
        rival = {"host": "tpu-vm-9", "pid": 77, "started": 0, "token": "rival", "renewed": 0}
        storage.write_bytes(lock, json.dumps(rival).encode())
        time.sleep(1.5)
        with pytest.raises(UserError, match="was taken over by process 77 on tpu-vm-9"):
            held.check()
    assert json.loads(storage.read_text_file(lock))["token"] == "rival"  # left to its holder
