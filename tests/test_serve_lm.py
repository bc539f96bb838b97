"""Policies on an endpoint: `jaxrm serve-lm` as a subprocess on 127.0.0.1, `jaxrm generate` and
`jaxrm data polar-pool` talking to it over OpenAI's /v1/completions, and the client under faults
(a real HTTP server on 127.0.0.1 in front of the real endpoint, failing on purpose)."""

import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from data_helpers import child_xla_flags
from test_generate import generate, models, prompt_file, read  # noqa: F401 (fixture)

from jaxrm.cli import main

pytest.importorskip("torch")
FP32 = "model.dtype=float32"


@pytest.fixture(scope="module")
def endpoint(models):  # noqa: F811
    """`jaxrm serve-lm` of the tiny Llama in float32, four rows: its base URL."""
    command = [sys.executable, "-m", "jaxrm", "serve-lm", str(models / "llama"), FP32]
    command += ["--port", "0", "--max-num-seqs", "4", "--served-model-name", "llama-server"]
    env = {**os.environ, "XLA_FLAGS": child_xla_flags(), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline().decode()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if match is None:
        process.kill()
        pytest.fail(f"serve-lm did not start: {line} {process.stderr.read().decode()}")
    yield f"http://127.0.0.1:{match.group(1)}/v1"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def served(url, prompts, out, *flags):
    """`jaxrm generate` of an endpoint, with the settings test_generate's `generate` uses."""
    args = ["generate", url, "--prompts", str(prompts), "--out", str(out)]
    return main([*args, "--max-new-tokens", "12", "--engine", "jaxrm", *flags])


def complete(url, body):
    request = urllib.request.Request(
        url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_endpoint_samples_equal_local_ones_when_seeded(models, endpoint, tmp_path):  # noqa: F811
    prompts = prompt_file(tmp_path / "prompts.jsonl", 6)
    for flags in (["--seed", "5"],):  # POLAR's sampling, seeded (the pool test checks greedy)
        local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
        assert generate(models / "llama", prompts, local, "--n", "2", *flags) == 0
        policy = ["--policy", "llama", "--concurrency", "3"]
        assert served(endpoint, prompts, remote, "--n", "2", *policy, *flags) == 0
        assert read(remote) == read(local)
        local.unlink(), remote.unlink()


def test_completions_api_fields_and_refusals(endpoint):
    body = {"model": "llama-server", "prompt": ["the quick", [1, 5, 9]], "n": 2, "max_tokens": 6}
    status, reply = complete(endpoint, {**body, "temperature": 0, "return_token_ids": True})
    assert status == 200 and reply["object"] == "text_completion"
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    first, second = reply["choices"][:2]
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) <= 6
    assert reply["choices"][2]["prompt_token_ids"] == [1, 5, 9]
    used = sum(len(c["token_ids"]) for c in reply["choices"])
    assert reply["usage"]["completion_tokens"] == used

    # A stop text ends the answer before it; seeded samples repeat, and sample i has seed s + i.
    text = first["text"]
    stop = text[2:4] if len(text) >= 4 else None
    if stop:
        status, cut = complete(endpoint, {**body, "temperature": 0, "stop": stop})
        assert cut["choices"][0]["text"] == text[: text.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["choices"][0]["stop_reason"] == stop
    seeded = {**body, "prompt": "a dog", "n": 3, "seed": 11, "max_tokens": 8}
    once, again = complete(endpoint, seeded)[1], complete(endpoint, seeded)[1]
    assert [c["text"] for c in once["choices"]] == [c["text"] for c in again["choices"]]
    shifted = complete(endpoint, {**seeded, "n": 1, "seed": 12})[1]
    assert shifted["choices"][0]["text"] == once["choices"][1]["text"]

    for change, status_wanted, words in (
        ({"model": "other"}, 404, "does not exist"),
        ({"stream": True}, 400, "'stream' is not supported"),
        ({"presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"max_tokens": 100000}, 400, "maximum context length"),
        ({"prompt": []}, 400, "field 'prompt'"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 0}, 400, "'n'"),
        ({"prompt": [[1, 99999]]}, 400, "outside the vocabulary"),
    ):
        status, reply = complete(endpoint, {**body, **change})
        assert status == status_wanted and words in reply["error"]["message"], reply


class Faulty(http.server.BaseHTTPRequestHandler):
    """Forwards to the real endpoint, failing the first `fail` requests of each prompt the way
    `mode` says: 500s, connections dropped without a reply, or answers slower than the
    client's timeout."""

    upstream: str
    mode: str
    fail: int
    delay: float  # how long a slow answer takes
    seen: dict

    def do_GET(self):
        self._forward(None)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        key = json.loads(body).get("seed")
        with self.server.lock:
            count = self.seen[key] = self.seen.get(key, 0) + 1
        if count <= self.fail:
            if self.mode == "500":
                self._reply(500, b'{"error": {"message": "engine overloaded"}}')
                return
            if self.mode == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if self.mode == "slow":
                time.sleep(self.delay)
        self._forward(body)

    def _forward(self, body):
        host = self.upstream.split("//")[1].split("/")[0]
        connection = http.client.HTTPConnection(host, timeout=60)
        connection.request(self.command, "/v1" + self.path.removeprefix("/v1"), body)
        answer = connection.getresponse()
        self._reply(answer.status, answer.read())

    def _reply(self, status, data):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def faulty(endpoint):
    def start(mode, fail, delay=3.5):
        fields = {"upstream": endpoint, "mode": mode, "fail": fail, "delay": delay}
        handler = type("Handler", (Faulty,), fields)
        handler.seen = {}
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.lock = threading.Lock()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    servers = []
    yield start
    for server in servers:
        server.shutdown()


def test_endpoint_faults_are_retried_within_bounds_and_a_dead_policy_stops_in_one_line(
    models,  # noqa: F811
    endpoint,
    faulty,
    tmp_path,
    capsys,
):
    prompts = prompt_file(tmp_path / "prompts.jsonl", 4)
    clean = tmp_path / "clean.jsonl"
    # 5 s leave room for a compile that the retried requests' other batching may need.
    flags = ["--policy", "p", "--timeout", "5", "--retries", "2"]
    assert served(endpoint, prompts, clean, *flags) == 0
    capsys.readouterr()
    for mode in ("500", "drop", "slow"):
        out = tmp_path / f"{mode}.jsonl"
        assert served(faulty(mode, 2, delay=5.5), prompts, out, *flags) == 0, mode
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["retries"] == 8 and read(out) == read(clean), mode

    dead = tmp_path / "dead.jsonl"
    dead_url = faulty("500", 99)
    assert served(dead_url, prompts, dead, *flags) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"jaxrm: error: policy p: {dead_url}/completions failed 3 times; last: engine "
        "overloaded (HTTP 500)"
    ]
    assert read(dead) == []


def pool_file(root, models, endpoint, prompts):  # noqa: F811
    (root / "pool.yaml").write_text(
        f"""
prompts: {prompts}
out: triples.jsonl
work_dir: work
seed: 3
batch_size: 4
sampling: {{max_new_tokens: 8}}
policies:
  - {{name: local, model: {models / "llama"}, overrides: [{FP32}]}}
  - {{name: served, endpoint: {{url: "{endpoint}", engine: jaxrm, retries: 1, timeout: 30,
                                concurrency: 2}},
     sampling: {{temperature: 0}}}}
"""
    )
    return root / "pool.yaml"


@pytest.mark.slow
def test_a_pool_with_a_served_policy_completes_resumes_after_a_kill_and_stops_on_a_dead_one(
    models,  # noqa: F811
    endpoint,
    faulty,
    tmp_path,
    capsys,
):
    prompts = prompt_file(tmp_path / "prompts.jsonl", 12)
    whole = tmp_path / "whole"
    whole.mkdir()
    assert main(["data", "polar-pool", str(pool_file(whole, models, endpoint, prompts))]) == 0
    triples = read(whole / "triples.jsonl")
    assert [t["prompt"] for t in triples] == [r["prompt"] for r in read(prompts)]
    answers = read(whole / "work" / "served.jsonl")
    assert {t["chosen_policy"] for t in triples} == {"local", "served"}

    # The served policy's greedy samples are local greedy generation's, token for token.
    local = tmp_path / "local.jsonl"
    asked = tmp_path / "asked.jsonl"
    asked.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in answers))
    flags = ["--temperature", "0", "--policy", "served", "--max-new-tokens", "8"]
    assert generate(models / "llama", asked, local, *flags) == 0
    assert [r["response"] for r in read(local)] == [r["response"] for r in answers]

    # Killed while the served policy generates (slowed down so there is time to): the rerun
    # writes what the whole run wrote.
    killed = tmp_path / "killed"
    killed.mkdir()
    pool = pool_file(killed, models, faulty("slow", 1), prompts)
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxrm", "data", "polar-pool", str(pool)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": child_xla_flags()},
    )
    part = killed / "work" / "served.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (killed / "triples.jsonl").exists()
    assert 2 <= part.read_text().count("\n") < len(answers)
    pool_file(killed, models, endpoint, prompts)
    assert main(["data", "polar-pool", str(pool)]) == 0
    assert read(killed / "triples.jsonl") == triples
    for name in ("local", "served"):
        assert read(killed / "work" / f"{name}.jsonl") == read(whole / "work" / f"{name}.jsonl")

    dead = tmp_path / "dead"
    dead.mkdir()
    capsys.readouterr()
    assert main(["data", "polar-pool", str(pool_file(dead, models, faulty("500", 99), prompts))])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("jaxrm: error: policy served:"), errors
    assert not (dead / "triples.jsonl").exists()
