"""`jaxrm serve` as users run it: a subprocess on 127.0.0.1, called the way RL frameworks and
their engines' clients call vLLM, SGLang, lmdeploy and OpenRLHF servers, checked against
`jaxrm score`, loaded by concurrent clients and sent requests it must refuse.

The request bodies and the places rewards are read from follow the callers' own code: POLAR's
`RewardModelClient` (vllm: POST /pooling {"input"} -> data[i]["data"][-1][0]; sglang: POST
/classify {"model", "text"} -> item["embedding"][0]; lmdeploy: POST /pooling {"input"} ->
data[i]["data"]), verl's reward loop (vLLM: POST /classify {"model", "input", "activation":
false} -> data[-1]["probs"][-1]; SGLang: POST /v1/embeddings {"model", "input"} ->
data[-1]["embedding"][-1]) and OpenRLHF (POST /get_reward {"query"} -> rewards).
"""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from data_helpers import child_xla_flags, write_jsonl
from test_scoring import TOY, make_checkpoint, read_rows

from jaxrm.cli import main, parse_args
from jaxrm.scoring.client import RewardClient, RewardServerError

TOKEN = "s3cret"
CLIENTS, REQUESTS = 16, 30
# A small grid (7 lengths up to 256 x row counts up to 16): 29 shapes to compile at start.
GRID = ["--batch-tokens", "1024", "--max-rows", "16", "data.max_length=256"]
REWARD_TOKEN = "<|score|>"  # the toy tokenizer's reward token (configs/toy)


def start_server(checkpoint, cache, *flags):
    env = {
        **os.environ,
        "JAXRM_SERVE_TOKEN": TOKEN,
        "XLA_FLAGS": child_xla_flags(),
        "JAXRM_COMPILE_CACHE": cache,
    }
    command = [sys.executable, "-m", "jaxrm", "serve", "--port", "0", str(checkpoint), *GRID]
    command += [*flags, "--max-items", "64", "--max-body-mb", "0.05"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline().decode()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if match is None:
        process.kill()
        pytest.fail(f"server did not start: {line} {process.stderr.read().decode()}")
    return process, int(match.group(1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", "polar")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="module")
def server(checkpoint, cache):
    process, port = start_server(checkpoint, cache, "--max-batch", "32", "--max-wait-ms", "20")
    yield port
    process.terminate()
    assert process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def lmdeploy_server(checkpoint, cache, server):
    """The same model with lmdeploy's /pooling reply (started after `server`: its cache is warm)."""
    process, port = start_server(checkpoint, cache, "--pooling", "lmdeploy")
    yield port
    process.terminate()
    assert process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def expected(checkpoint, tmp_path_factory):
    """`jaxrm score`'s rewards of scoring_rows(), with the server's data.max_length."""
    directory = tmp_path_factory.mktemp("scored")
    data, out = write_jsonl(directory / "rows.jsonl", scoring_rows()), directory / "out.jsonl"
    argv = ["score", str(checkpoint), "--data", str(data), "--out", str(out), "data.max_length=256"]
    assert main(argv) == 0
    return [r["reward"] for r in read_rows(out)]


def scoring_rows():
    return [
        {"prompt": r["prompt"], "reference": r["reference"], "response": r[key]}
        for r in read_rows(TOY / "polar_eval.jsonl")[:24]
        for key in ("chosen", "rejected")
    ]


def polar_text(row, reward_token=True):
    """The text POLAR's client sends: P + "\\n" + R + "<|reward|>" + P + "\\n" + C + token."""
    text = f"{row['prompt']}\n{row['reference']}<|reward|>{row['prompt']}\n{row['response']}"
    return text + REWARD_TOKEN * reward_token


def request(port, method, path, body=None, headers=None):
    """(status, JSON reply) of one raw request; `body` bytes are sent as they are."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    if response.getheader("Content-Type", "").startswith("text/plain"):
        return response.status, raw.decode()
    return response.status, json.loads(raw or b"{}")


def post(port, path, body):
    status, reply = request(port, "POST", path, body)
    assert status == 200, reply
    return reply


# --- every API shape gives `jaxrm score`'s rewards ---------------------------------------------


def test_polar_client_requests_to_each_server_type(server, lmdeploy_server, expected):
    rows = scoring_rows()[:8]
    texts = [polar_text(r) for r in rows]
    want = pytest.approx(expected[:8], abs=1e-5)
    vllm = post(server, "/pooling", {"input": texts})
    assert [item["data"][-1][0] for item in vllm["data"]] == want
    assert vllm["jaxrm"] == {"reward_token_added": [], "truncated": []}  # already had its token
    sglang = post(server, "/classify", {"model": "POLAR-7B", "text": texts})
    assert [item["embedding"][0] for item in sglang] == want
    lmdeploy = post(lmdeploy_server, "/pooling", {"input": texts})
    assert [item["data"] for item in lmdeploy["data"]] == want


def test_verl_requests_one_sample_at_a_time(server, expected):
    row = scoring_rows()[3]
    text = polar_text(row, reward_token=False)  # verl sends the text without the reward token
    body = {"model": "/models/rm", "input": text, "activation": False}
    reply = post(server, "/classify", body)
    assert reply["data"][-1]["probs"][-1] == pytest.approx(expected[3], abs=1e-5)
    assert reply["jaxrm"]["reward_token_added"] == [0]
    reply = post(server, "/v1/embeddings", {"model": "/models/rm", "input": text})
    assert reply["data"][-1]["embedding"][-1] == pytest.approx(expected[3], abs=1e-5)


def test_openrlhf_get_reward_and_jaxrm_score(server, expected):
    rows = scoring_rows()
    reply = post(server, "/get_reward", {"query": [polar_text(r) for r in rows[:6]]})
    assert reply["rewards"] == pytest.approx(expected[:6], abs=1e-5)
    assert reply["scores"] == reply["rewards"] and reply["truncated"] == []
    client = RewardClient(f"http://127.0.0.1:{server}", token=TOKEN, retries=0)
    assert client.score_items(rows[6:12]) == pytest.approx(expected[6:12], abs=1e-5)
    status, reply = request(server, "POST", "/get_reward", {"query": ["word " * 2000]})
    assert status == 200 and reply["truncated"] == [0] and len(reply["rewards"]) == 1


def test_the_reward_token_is_never_doubled_and_token_ids_work(server, expected):
    row = scoring_rows()[5]
    with_token, without = polar_text(row), polar_text(row, reward_token=False)
    reply = post(server, "/pooling", {"input": [with_token, without]})
    rewards = [item["data"][-1][0] for item in reply["data"]]
    assert rewards == pytest.approx([expected[5]] * 2, abs=1e-5)
    assert reply["jaxrm"]["reward_token_added"] == [1]
    tokens = post(server, "/tokenize", {"prompt": with_token})["tokens"]
    by_ids = post(server, "/pooling", {"input": [tokens, tokens[:-1]]})
    assert [len(item["data"]) for item in by_ids["data"]] == [len(tokens)] * 2
    np.testing.assert_allclose(by_ids["data"][1]["data"], by_ids["data"][0]["data"], atol=1e-5)
    assert by_ids["jaxrm"]["reward_token_added"] == [1]
    single = post(server, "/classify", {"input_ids": tokens})  # SGLang: one input, one object
    assert single["embedding"][0] == pytest.approx(expected[5], abs=1e-5)


def test_activation_is_off_unless_asked(server, expected):
    text = polar_text(scoring_rows()[0])
    raw = post(server, "/classify", {"input": [text]})["data"][0]["probs"][0]
    on = post(server, "/classify", {"input": [text], "use_activation": True})["data"][0]["probs"][0]
    assert raw == pytest.approx(expected[0], abs=1e-5)
    assert on == pytest.approx(1 / (1 + np.exp(-expected[0])), abs=1e-6)
    pooled = post(server, "/pooling", {"input": text, "softmax": True})["data"][0]["data"][-1][0]
    assert pooled == pytest.approx(on, abs=1e-6)
    # vLLM's reply for a sequence-classification export: one [reward] per input
    classified = post(server, "/pooling", {"input": [text], "task": "classify"})["data"][0]["data"]
    assert classified == pytest.approx([expected[0]], abs=1e-5)


def test_models_tokenize_health_and_metrics(server, checkpoint):
    models = post_get(server, "/v1/models")
    assert models["data"][0]["id"] == checkpoint.name and models["data"][0]["max_model_len"] == 256
    tokenized = post(server, "/tokenize", {"prompt": "the gate", "add_special_tokens": False})
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 256
    status, health = request(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and health["status"] == "ok" and health["objective"] == "polar"
    assert health["compiled_shapes"] == 29
    status, metrics = request(server, "GET", "/metrics", headers={"Authorization": ""})
    assert status == 200 and 'jaxrm_requests_total{path="/health",status="200"}' in metrics
    assert re.search(r"^jaxrm_xla_compiles_total \d+$", metrics, re.MULTILINE)


def post_get(port, path):
    status, reply = request(port, "GET", path)
    assert status == 200, reply
    return reply


# --- groups ----------------------------------------------------------------------------------


def test_group_rewards_equal_each_response_scored_alone(server):
    rows = read_rows(TOY / "polar_eval.jsonl")[:4]
    groups = [
        {
            "prompt": r["prompt"],
            "reference": r["reference"],
            "responses": [r["chosen"], r["rejected"], r["reference"], r["chosen"] + " Indeed."],
        }
        for r in rows
    ]
    reply = post(server, "/score_groups", {"groups": groups})
    alone = [
        post(server, "/score", {"items": [{**g, "response": x} for x in g["responses"]]})["rewards"]
        for g in groups
    ]
    for got, want, normalized in zip(reply["rewards"], alone, reply["normalized"], strict=True):
        assert got == pytest.approx(want, abs=1e-5)
        values = np.asarray(want)
        assert normalized == pytest.approx(
            (values - values.mean()) / (values.std(ddof=1) + 1e-6), abs=1e-4
        )
    client = RewardClient(f"http://127.0.0.1:{server}", token=TOKEN, retries=0, max_items=5)
    rewards, _ = client.score_groups(groups)
    assert [r for g in rewards for r in g] == pytest.approx([r for g in alone for r in g], abs=1e-5)


# --- load ------------------------------------------------------------------------------------


def xla_compiles(port):
    metrics = request(port, "GET", "/metrics")[1]
    return int(re.search(r"^jaxrm_xla_compiles_total (\d+)$", metrics, re.MULTILINE).group(1))


@pytest.mark.slow
def test_a_mixed_length_load_triggers_no_compile(server):
    rng = np.random.default_rng(0)
    words = ["oil", "the", "rusty", "gate", "hinge", "and", "check", "it", "again", "slowly"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 300, size=500)]
    before = xla_compiles(server)
    start = 0
    while start < len(texts):
        size = int(rng.integers(1, 40))
        post(server, "/get_reward", {"query": texts[start : start + size]})
        start += size
    assert xla_compiles(server) == before == 0


def test_128_concurrent_connections_are_all_answered(server):
    barrier, results = threading.Barrier(128), []
    body = json.dumps({"query": ["the gate " * (i % 50) for i in range(4)]}).encode()

    def one():
        barrier.wait()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
            connection.request("POST", "/get_reward", body, {"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            results.append((response.status, len(json.loads(response.read())["rewards"])))
        except Exception as e:  # refused, reset or timed out: the test fails below
            results.append((repr(e), 0))

    threads = [threading.Thread(target=one) for _ in range(128)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [(200, 4)] * 128


@pytest.mark.slow
def test_concurrent_clients_get_the_rewards_of_jaxrm_score(server, expected):
    rows = scoring_rows()
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


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/score", b"x" * 60_000, {}, 413, "at most"),
        (
            "/score",
            {"items": [{"prompt": "p", "reference": "r", "response": "c"}] * 65},
            {},
            413,
            "65 items",
        ),
        ("/score", b'{"items": [', {}, 400, "not valid JSON"),
        (
            "/score",
            {"items": [{"prompt": "p", "response": "c"}]},
            {},
            400,
            "items[0]: field 'reference'",
        ),
        ("/score", {"items": "text"}, {}, 400, "field 'items' must be a list"),
        ("/score", {"items": []}, {"Authorization": "Bearer wrong"}, 401, "bearer token"),
        ("/score", {"items": []}, {"Authorization": ""}, 401, "bearer token"),
        ("/pooling", {"input": [1, -2]}, {}, 400, "field 'input'"),
        ("/pooling", {"input": [[5, 10**9]]}, {}, 400, "outside the model's vocabulary"),
        ("/pooling", {"messages": [{"role": "user", "content": "hi"}]}, {}, 400, "chat 'messages'"),
        ("/classify", {"input": ["a"], "use_activation": "yes"}, {}, 400, "use_activation"),
        ("/pooling", {"input": ["a"], "task": "embed"}, {}, 400, "task 'embed'"),
        ("/score_groups", {"groups": [{"prompt": "p", "reference": "r"}]}, {}, 400, "groups[0]"),
        (
            "/score_groups",
            {"groups": [{"prompt": "p", "reference": "r", "responses": ["a"] * 65}]},
            {},
            413,
            "65 responses",
        ),
    ],
)
def test_bad_requests_are_refused_and_the_next_is_served(
    server, path, body, headers, status, message
):
    code, reply = request(server, "POST", path, body, headers)
    assert code == status and message in reply["error"]
    good = {"items": [{"prompt": "p", "reference": "r", "response": "c"}]}
    code, reply = request(server, "POST", "/score", good)
    assert code == 200 and len(reply["rewards"]) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"query": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply"),
        (b'{"query": ["\\ud800 alone"]}', "lone surrogate"),
    ],
)
def test_bodies_a_tokenizer_cannot_take_are_400(server, body, message):
    code, reply = request(server, "POST", "/get_reward", body)
    assert code == 400 and message in reply["error"]


def test_a_malformed_content_length_is_400(server):
    with socket.create_connection(("127.0.0.1", server), timeout=30) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}")
        assert sock.recv(64).startswith(b"HTTP/1.1 400")


def test_an_oversized_body_gets_its_413_not_a_broken_pipe(server):
    code, reply = request(server, "POST", "/get_reward", b"x" * 2_000_000)
    assert code == 413 and "at most" in reply["error"]


def test_an_open_address_needs_a_token_or_an_explicit_choice(checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("JAXRM_SERVE_TOKEN", raising=False)
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "without a token" in err and "--allow-unauthenticated" in err and "\n" not in err


def test_unknown_paths_and_methods(server):
    assert request(server, "GET", "/nothing")[0] == 404
    assert request(server, "GET", "/score")[0] == 405


def test_client_raises_on_refusal_instead_of_returning_none(server):
    client = RewardClient(f"http://127.0.0.1:{server}", token="wrong", retries=3, backoff=0.01)
    with pytest.raises(RewardServerError) as error:
        client.score(["p"], ["c"], ["r"])
    assert error.value.status == 401


def test_port_in_use_is_one_line_before_anything_loads(checkpoint, server, capsys):
    assert main(["serve", str(checkpoint), "--port", str(server)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxrm: error: cannot listen on 127.0.0.1") and "\n" not in err


def test_overrides_may_follow_options():
    args = parse_args(["serve", "ckpt", "--port", "0", "model.dtype=float32", "--max-batch", "3"])
    assert (args.overrides, args.port, args.max_batch) == (["model.dtype=float32"], 0, 3)
    with pytest.raises(SystemExit):
        parse_args(["serve", "ckpt", "--port", "0", "not-an-override"])


def test_serve_help_names_the_endpoints():
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm", "serve", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for endpoint in (
        "/get_reward",
        "/score",
        "/score_groups",
        "/pooling",
        "/classify",
        "/v1/embeddings",
        "/health",
        "/metrics",
        "--token",
        "--pooling",
    ):
        assert endpoint in result.stdout
