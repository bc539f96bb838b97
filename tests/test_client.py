"""RewardClient against a scripted fake `jaxrm serve` (standard library only, no JAX)."""

import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from jaxrm.scoring import client as client_module
from jaxrm.scoring.client import RewardClient, RewardServerError, compute_score, compute_score_batch

Reply = tuple[int, Any]


def default_reply(path: str, body: Any) -> Reply:
    """Rewards that identify their item: the response (or query) read as a number."""
    if path == "/score":
        return 200, {"rewards": [float(item["response"]) for item in body["items"]]}
    if path == "/score_groups":
        rewards = [[float(r) for r in group["responses"]] for group in body["groups"]]
        return 200, {"rewards": rewards, "normalized": [[-r for r in g] for g in rewards]}
    if path == "/get_reward":
        rewards = [float(text) for text in body["query"]]
        return 200, {"rewards": rewards, "scores": rewards}
    if path == "/health":
        return 200, {"status": "ok", "model": "tiny"}
    return 404, {"error": f"no route {path}"}


def scripted(*replies: Reply) -> Callable[[str, Any], Reply]:
    """Answer with `replies` in turn, then like the real server."""
    queue = list(replies)
    return lambda path, body: queue.pop(0) if queue else default_reply(path, body)


class FakeServer:
    def __init__(self) -> None:
        self.respond: Callable[[str, Any], Reply] = default_reply
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.answer(None)

            def do_POST(self) -> None:
                self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def answer(self, body: Any) -> None:
                fake.requests.append({"path": self.path, "headers": self.headers, "body": body})
                status, reply = fake.respond(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A client that timed out has hung up; the late answer's broken pipe is expected.
        self.httpd.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def bodies(self) -> list[Any]:
        return [request["body"] for request in self.requests]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    monkeypatch.delenv("JAXRM_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("JAXRM_REWARD_URL", raising=False)
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def fast_client(url: str, **kwargs: Any) -> RewardClient:
    return RewardClient(url, backoff=0.001, **kwargs)


def test_import_stays_light() -> None:
    code = "import sys, jaxrm.scoring.client; print(sorted({'jax', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_score_sends_items_and_returns_rewards_in_order(server: FakeServer) -> None:
    client = fast_client(server.url)
    messages = [{"role": "user", "content": "Hi"}]
    assert client.score(["p1", messages], ["1.5", "-2"]) == [1.5, -2.0]
    assert client.score(["p"], ["3"], references=["ref"]) == [3.0]
    assert server.requests[0]["path"] == "/score"
    assert server.bodies() == [
        {"items": [{"prompt": "p1", "response": "1.5"}, {"prompt": messages, "response": "-2"}]},
        {"items": [{"prompt": "p", "reference": "ref", "response": "3"}]},
    ]
    assert client.score([], []) == []
    assert len(server.requests) == 2


def test_long_lists_go_in_ordered_chunks(server: FakeServer) -> None:
    responses = [str(i) for i in range(600)]
    rewards = fast_client(server.url).score(["p"] * 600, responses, references=["r"] * 600)
    assert rewards == [float(i) for i in range(600)]
    assert [len(body["items"]) for body in server.bodies()] == [256, 256, 88]
    sent = [item["response"] for body in server.bodies() for item in body["items"]]
    assert sent == responses


def test_get_reward_health_and_score_items(server: FakeServer) -> None:
    client = fast_client(server.url, max_items=2)
    assert client.get_reward(["1", "2", "3"]) == [1.0, 2.0, 3.0]
    assert server.bodies() == [{"query": ["1", "2"]}, {"query": ["3"]}]
    assert client.health()["status"] == "ok"
    assert client.score_items([{"prompt": "p", "reference": "r", "response": "4"}]) == [4.0]


def test_mismatched_lengths_are_named() -> None:
    client = RewardClient()
    with pytest.raises(ValueError, match="references"):
        client.score(["a", "b"], ["x", "y"], references=["r"])
    with pytest.raises(ValueError, match="responses"):
        client.score(["a", "b"], ["x"])


def test_busy_server_is_retried(server: FakeServer) -> None:
    server.respond = scripted((503, {"error": "busy"}), (503, {"error": "busy"}))
    assert fast_client(server.url).score(["p"], ["7"]) == [7.0]
    assert len(server.requests) == 3


def test_timeout_is_retried(server: FakeServer) -> None:
    def slow_once(path: str, body: Any) -> Reply:
        if len(server.requests) == 1:
            time.sleep(0.5)
        return default_reply(path, body)

    server.respond = slow_once
    assert fast_client(server.url, timeout=0.2).score(["p"], ["5"]) == [5.0]
    assert len(server.requests) == 2


def test_client_error_raises_at_once(server: FakeServer) -> None:
    server.respond = scripted((400, {"error": "item 0 has no response"}))
    with pytest.raises(RewardServerError, match="item 0 has no response") as caught:
        fast_client(server.url).score(["p"], ["1"])
    assert caught.value.status == 400
    assert caught.value.message == "item 0 has no response"
    assert len(server.requests) == 1


def test_persistent_failure_raises_after_all_attempts(server: FakeServer) -> None:
    server.respond = lambda path, body: (503, {"error": "shutting down"})
    with pytest.raises(RewardServerError, match="4 attempts") as caught:
        fast_client(server.url, retries=3).score(["p"], ["1"])
    assert caught.value.status == 503
    assert server.url in str(caught.value) and "shutting down" in str(caught.value)
    assert len(server.requests) == 4


def test_backoff_doubles_up_to_the_cap_with_jitter(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: (low + high) / 2)
    server.respond = lambda path, body: (502, {"error": "bad gateway"})
    client = RewardClient(server.url, retries=5, backoff=0.5, max_backoff=3.0)
    with pytest.raises(RewardServerError):
        client.health()
    assert sleeps == [0.375, 0.75, 1.5, 2.25, 2.25]


def test_refused_connection_raises_server_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RewardServerError, match="3 attempts") as caught:
        fast_client(f"http://127.0.0.1:{port}", retries=2).score(["p"], ["1"])
    assert caught.value.status is None


def test_bearer_token_from_argument_or_environment(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_client(server.url).health()
    fast_client(server.url, token="secret").health()
    monkeypatch.setenv("JAXRM_SERVE_TOKEN", "from-env")
    fast_client(server.url).health()
    sent = [request["headers"].get("Authorization") for request in server.requests]
    assert sent == [None, "Bearer secret", "Bearer from-env"]


def test_wrong_token_is_not_retried(server: FakeServer) -> None:
    def check_token(path: str, body: Any) -> Reply:
        if server.requests[-1]["headers"].get("Authorization") != "Bearer right":
            return 401, {"error": "missing or wrong bearer token"}
        return default_reply(path, body)

    server.respond = check_token
    assert fast_client(server.url, token="right").score(["p"], ["2"]) == [2.0]
    with pytest.raises(RewardServerError, match="bearer token") as caught:
        fast_client(server.url, token="wrong").score(["p"], ["2"])
    assert caught.value.status == 401
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "reply",
    [
        {"scores": [1.0, 2.0]},
        {"rewards": [1.0]},
        {"rewards": [1.0, math.nan]},
        {"rewards": [1.0, None]},
        {"rewards": [1.0, True]},
        {"rewards": "1.0"},
        [1.0, 2.0],
    ],
)
def test_malformed_reply_raises(server: FakeServer, reply: Any) -> None:
    server.respond = lambda path, body: (200, reply)
    with pytest.raises(RewardServerError):
        fast_client(server.url).score(["p", "q"], ["1", "2"])
    assert len(server.requests) == 1


def test_verl_compute_score(server: FakeServer) -> None:
    reward = compute_score("gsm8k", "2.5", "42", {"prompt": "6 * 7?"}, url=server.url, extra=1)
    assert reward == 2.5
    compute_score("gsm8k", "1", "42", {"question": "What is 6 * 7?"}, url=server.url)
    compute_score("gsm8k", "1", "42", url=server.url)
    assert [body["items"] for body in server.bodies()] == [
        [{"prompt": "6 * 7?", "reference": "42", "response": "2.5"}],
        [{"prompt": "What is 6 * 7?", "reference": "42", "response": "1"}],
        [{"prompt": "", "reference": "42", "response": "1"}],
    ]


def test_verl_compute_score_batch(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXRM_REWARD_URL", server.url)
    # verl's batch manager passes numpy object arrays; list-valued parquet fields arrive as arrays.
    messages = np.array([{"role": "user", "content": "Q"}], dtype=object)
    rewards = compute_score_batch(
        data_sources=np.array(["a", "b", "a", "c"], dtype=object),
        solution_strs=np.array(["1", "2", "5", "3"]),
        ground_truths=np.array(["r1", "r2", "r1", "r3"], dtype=object),
        extra_infos=np.array(
            [{"prompt": messages}, {"question": "q2"}, {"prompt": messages}, None], dtype=object
        ),
    )
    assert rewards == [1.0, 2.0, 5.0, 3.0]  # in the input order, not the groups'
    q = [{"role": "user", "content": "Q"}]
    assert server.bodies() == [
        {
            "groups": [  # the two responses to the same prompt and reference form one group
                {"prompt": q, "reference": "r1", "responses": ["1", "5"]},
                {"prompt": "q2", "reference": "r2", "responses": ["2"]},
                {"prompt": "", "reference": "r3", "responses": ["3"]},
            ]
        }
    ]
    assert compute_score_batch(["x"], ["4"], ["r"]) == [4.0]


def test_score_groups_chunks_by_responses_and_keeps_groups_whole(server: FakeServer) -> None:
    client = fast_client(server.url, max_items=4)
    groups = [
        {"prompt": "p", "responses": [str(i + 10 * g) for i in range(n)]}
        for g, n in enumerate((3, 2, 5, 1))
    ]
    rewards, normalized = client.score_groups(groups)
    assert rewards == [[0.0, 1.0, 2.0], [10.0, 11.0], [20.0, 21.0, 22.0, 23.0, 24.0], [30.0]]
    assert normalized == [[-r for r in g] for g in rewards]
    sizes = [[len(g["responses"]) for g in body["groups"]] for body in server.bodies()]
    assert sizes == [[3], [2], [5], [1]]  # 3+2 > 4; a group of 5 goes alone


def test_score_groups_reply_must_match_the_groups(server: FakeServer) -> None:
    server.respond = lambda path, body: (200, {"rewards": [[1.0]], "normalized": [[0.0]]})
    with pytest.raises(RewardServerError, match="expected 2 rewards"):
        fast_client(server.url).score_groups([{"prompt": "p", "responses": ["a", "b"]}])
