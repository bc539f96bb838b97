"""`jaxrm serve` as users run it: a subprocess on 127.0.0.1, loaded by concurrent clients,
checked against `jaxrm score`, and sent requests it must refuse."""

import http.client
import json
import os
import re
import subprocess
import sys
import threading

import pytest
from data_helpers import write_jsonl
from test_scoring import TOY, make_checkpoint, read_rows

from jaxrm.cli import main
from jaxrm.scoring.client import RewardClient, RewardServerError

TOKEN = "s3cret"
CLIENTS, REQUESTS = 16, 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", "polar")


@pytest.fixture(scope="module")
def server(checkpoint):
    env = {**os.environ, "JAXRM_SERVE_TOKEN": TOKEN, "XLA_FLAGS": ""}
    command = [sys.executable, "-m", "jaxrm", "serve", str(checkpoint), "--port", "0"]
    command += ["--max-batch", "32", "--max-wait-ms", "20", "--max-items", "64"]
    command += ["--max-body-mb", "0.05"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline().decode()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if match is None:
        process.kill()
        pytest.fail(f"server did not start: {line} {process.stderr.read().decode()}")
    yield int(match.group(1))
    process.terminate()
    assert process.wait(timeout=60) == 0


def scoring_rows():
    return [
        {"prompt": r["prompt"], "reference": r["reference"], "response": r[key]}
        for r in read_rows(TOY / "polar_eval.jsonl")[:24]
        for key in ("chosen", "rejected")
    ]


def request(port, method, path, body=None, headers=None):
    """(status, JSON reply) of one raw request; `body` bytes are sent as they are."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    reply = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, reply


@pytest.mark.slow
def test_concurrent_clients_get_the_rewards_of_jaxrm_score(server, checkpoint, tmp_path, capsys):
    rows = scoring_rows()
    data, out = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "scored.jsonl"
    assert main(["score", str(checkpoint), "--data", str(data), "--out", str(out)]) == 0
    expected = [r["reward"] for r in read_rows(out)]

    client = RewardClient(f"http://127.0.0.1:{server}", token=TOKEN, retries=2, backoff=0.05)
    answers: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(REQUESTS):
                picks = [(worker * 7 + i * 3 + k) % len(rows) for k in range(1 + (worker + i) % 4)]
                items = [rows[p] for p in picks]
                answers[worker, i] = (picks, client.score_items(items))
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[0]
    assert len(answers) == CLIENTS * REQUESTS
    for picks, rewards in answers.values():
        assert rewards == pytest.approx([expected[p] for p in picks], abs=1e-5)
    health = client.health()
    assert health["requests"] >= CLIENTS * REQUESTS
    assert health["largest_batch"] > 4  # requests of 1-4 items were batched together
    assert health["batches"] < health["requests"]


def test_get_reward_takes_formatted_texts(server, checkpoint):
    client = RewardClient(f"http://127.0.0.1:{server}", token=TOKEN, retries=0)
    row = scoring_rows()[0]
    formatted = f"{row['prompt']}\n{row['reference']}<|reward|>{row['prompt']}\n{row['response']}"
    [from_text] = client.get_reward([formatted])
    [from_item] = client.score_items([row])
    assert from_text == pytest.approx(from_item, abs=1e-5)
    status, reply = request(server, "POST", "/get_reward", {"query": ["word " * 2000]})
    assert status == 200 and reply["truncated"] == [0] and len(reply["rewards"]) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"x" * 60_000, {}, 413, "at most"),
        ({"items": [{"prompt": "p", "reference": "r", "response": "c"}] * 65}, {}, 413, "65 items"),
        (b'{"items": [', {}, 400, "not valid JSON"),
        ({"items": [{"prompt": "p", "response": "c"}]}, {}, 400, "items[0]: field 'reference'"),
        ({"items": "text"}, {}, 400, "field 'items' must be a list"),
        ({"items": []}, {"Authorization": "Bearer wrong"}, 401, "bearer token"),
        ({"items": []}, {"Authorization": ""}, 401, "bearer token"),
    ],
)
def test_bad_requests_are_refused_and_the_next_is_served(server, body, headers, status, message):
    code, reply = request(server, "POST", "/score", body, headers)
    assert code == status and message in reply["error"]
    good = {"items": [{"prompt": "p", "reference": "r", "response": "c"}]}
    code, reply = request(server, "POST", "/score", good)
    assert code == 200 and len(reply["rewards"]) == 1


def test_unknown_paths_and_methods(server):
    assert request(server, "GET", "/nothing")[0] == 404
    assert request(server, "GET", "/score")[0] == 405
    status, health = request(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and health["status"] == "ok" and health["objective"] == "polar"


def test_client_raises_on_refusal_instead_of_returning_none(server):
    client = RewardClient(f"http://127.0.0.1:{server}", token="wrong", retries=3, backoff=0.01)
    with pytest.raises(RewardServerError) as error:
        client.score(["p"], ["c"], ["r"])
    assert error.value.status == 401


def test_port_in_use_is_one_line(checkpoint, server, capsys):
    assert main(["serve", str(checkpoint), "--port", str(server)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxrm: error: cannot listen on 127.0.0.1") and "\n" not in err


def test_serve_help_names_the_endpoints():
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm", "serve", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for endpoint in ("/get_reward", "/score", "/health", "--token"):
        assert endpoint in result.stdout
