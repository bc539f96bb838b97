"""Reward-model train step: jaxrm against Hugging Face transformers (PyTorch eager), one run.

Both train the same randomly initialised Llama-shaped reward model (jaxrm's weights, exported to
transformers' LlamaForSequenceClassification) on the same batch with the same loss
(-log sigmoid(r_chosen - r_rejected)), AdamW and global-norm clipping. transformers runs in a
process of its own, started by this one, so that each library has its own heap, as it would in
use, and its own page faults and peak memory. Each side is warmed up, then timed over several
rounds of a few steps, the two taking turns in each round and each timing its steps in its own
process; each side's median round counts. Printed: tokens/s (and examples/s), the ratio
jaxrm / transformers, each one's page faults per step and peak memory, and each one's
model FLOPs utilisation against the matmul peak measured in this run (the fastest of JAX's and
torch's square float32 matmuls, before and after the rounds), with model FLOPs counted by
jaxrm/flops.py for the tokens each side processes.

    python benchmarks/bench_train.py                 # pairs: 4 pairs x 2 x 512 tokens
    python benchmarks/bench_train.py --polar         # POLAR triples: prompt + reference + 2
                                                     # candidates; jaxrm packs the shared prefix
    python benchmarks/bench_train.py --json out.json

Pairs: jaxrm packs each pair into a row of 2 x length tokens; transformers runs the 2 x pairs
sequences as a batch. POLAR: each candidate's sequence is P + R + <|reward|> + P + C + reward
token; transformers runs both full sequences of a triple, as xtuner and TRL users do, while jaxrm
(data.shared_prefix) packs the shared P + R + <|reward|> + P once per triple. The rewards of the
first batch are compared before training; they must agree.

Run it on an otherwise idle machine; XLA_FLAGS should not fake devices (it is cleared here).
Freed host memory is kept for reuse in both processes, as the `jaxrm` command does
(jaxrm/host_memory.py); JAXRM_KEEP_FREED_MEMORY=0 measures without it.
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

os.environ["XLA_FLAGS"] = ""  # one real device; a faked device count splits the CPU

import jax
import numpy as np

from jaxrm.config import Config, config_from_dict
from jaxrm.data.packing import layout, pack
from jaxrm.data.templates import Example
from jaxrm.model.decoder import create_model
from jaxrm.sharding import make_mesh
from jaxrm.train.flops import attention_pairs, measured_matmul_peak, train_flops
from jaxrm.train.host_memory import keep_freed_memory
from jaxrm.train.losses import ranked_rewards
from jaxrm.train.trainer import Trainer

REWARD_TOKEN = 2
PAD_TOKEN = 0


def make_config(args: argparse.Namespace, seq_len: int, max_length: int) -> Config:
    return config_from_dict(
        {
            "objective": "polar" if args.polar else "pairwise",
            "model": {
                "preset": None,
                "hidden_size": args.hidden,
                "num_layers": args.layers,
                "num_heads": args.heads,
                "num_kv_heads": args.kv_heads,
                "head_dim": args.hidden // args.heads,
                "intermediate_size": args.intermediate,
                "vocab_size": args.vocab,
                "dtype": args.dtype,
                "reward_token_id": REWARD_TOKEN,
                "pad_token_id": PAD_TOKEN,
                "attention": args.attention,
            },
            "data": {"seq_len": seq_len, "max_length": max_length, "shared_prefix": args.polar},
            "train": {"batch_size": args.pairs, "steps": 1_000_000},
            "optimizer": {"name": "adamw", "lr": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0},
            "mesh": {"fsdp": 1},
        }
    )


def make_examples(args: argparse.Namespace, rng: np.random.Generator) -> list[Example]:
    """Token sequences, best first, with the reward token last and no padding id inside."""
    words = lambda n: rng.integers(3, args.vocab, size=n, dtype=np.int32)  # noqa: E731
    examples = []
    for _ in range(args.pairs):
        if args.polar:  # P + R + <|reward|> + P, then each candidate and its reward token
            prompt = words(args.prompt)
            prefix = np.concatenate([prompt, words(args.response - 1), [1], prompt])
            candidates = [words(args.response - 1) for _ in range(2)]
            sequences = [np.concatenate([prefix, c, [REWARD_TOKEN]]) for c in candidates]
        else:
            sequences = [np.append(words(args.length - 1), REWARD_TOKEN) for _ in range(2)]
        examples.append(Example([s.astype(np.int32) for s in sequences]))
    return examples


def packed_batch(examples: list[Example], config: Config) -> dict[str, np.ndarray]:
    rows = pack(
        examples, config.data.seq_len, 1, 2, config.data.shared_prefix, objective="pairwise"
    )
    if len(rows) != len(examples):
        raise SystemExit(f"expected one example per row, got {len(rows)} rows")
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def timed_steps(step: Callable[[], None], count: int) -> tuple[float, int]:
    """Seconds and minor page faults of `count` steps, in the calling process."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(count):
        step()
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def interleaved_seconds(
    sides: dict[str, Callable[[int], tuple[float, int]]], args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each side in each of `repeats` rounds of `steps` steps, after
    `warmup` untimed rounds alike, and each side's page faults per timed step. A side runs
    `count` steps and reports their seconds and faults. The sides take turns within each round,
    so that on a shared machine both are timed through the same busy and quiet moments."""
    for _ in range(args.warmup):
        for run in sides.values():
            run(args.steps)
    times: dict[str, list[float]] = {name: [] for name in sides}
    faults = dict.fromkeys(sides, 0)
    for _ in range(args.repeats):
        for name, run in sides.items():
            seconds, round_faults = run(args.steps)
            times[name].append(seconds / args.steps)
            faults[name] += round_faults
    per_step = {name: count / (args.repeats * args.steps) for name, count in faults.items()}
    return times, per_step


def prepare_jaxrm(config: Config, batch: dict[str, np.ndarray]) -> dict:
    mesh = make_mesh(fsdp=1)
    trainer = Trainer(config, mesh)
    model = create_model(config.model, seed=0, mesh=mesh, rules=config.mesh.rules)
    state = trainer.init_state(model)
    device_batch = trainer.global_batch(batch)
    _, rewards, _ = ranked_rewards(trainer.model(state), device_batch)
    initial = np.asarray(rewards)[:, 0, :]  # [examples, 2]
    params = jax.device_get(trainer.params(state))
    started = time.perf_counter()
    trainer.compile(state, device_batch)
    compile_seconds = time.perf_counter() - started
    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = trainer.step(holder["state"], device_batch, 0)
        jax.block_until_ready(metrics)

    return {"step": step, "compile_seconds": compile_seconds, "rewards": initial, "params": params}


def export_for_torch(config: Config, params: dict, directory: Path) -> Path:
    from flax import nnx

    from jaxrm.hf.convert import export_hf
    from jaxrm.model.decoder import Loaded, abstract_model

    graphdef, _ = abstract_model(config.model)
    loaded = Loaded(nnx.merge(graphdef, params), config, None)
    return export_hf(loaded, directory / "hf", arch="llama")


def prepare_torch(hf_dir: str, ids: np.ndarray, dtype: str) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.LlamaForSequenceClassification.from_pretrained(
        hf_dir, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0)
    input_ids = torch.tensor(ids.astype(np.int64))
    with torch.no_grad():
        initial = model(input_ids=input_ids).logits[:, 0].reshape(-1, 2).float().numpy()

    def step() -> None:
        rewards = model(input_ids=input_ids).logits[:, 0].reshape(-1, 2)
        loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"step": step, "rewards": initial}


def torch_worker(connection: Connection, hf_dir: str, ids: np.ndarray, dtype: str) -> None:
    """The transformers side, in its own process: sends the first batch's rewards, then answers
    ("steps", count) with timed_steps' (seconds, faults), ("peak",) with its matmul peak and
    ("rss",) with its peak resident memory until ("stop",)."""
    keep_freed_memory()
    side = prepare_torch(hf_dir, ids, dtype)
    connection.send(side["rewards"])
    answers = {
        "steps": lambda count: timed_steps(side["step"], count),
        "peak": torch_matmul_peak,
        "rss": peak_rss_bytes,
    }
    while (request := connection.recv())[0] != "stop":
        connection.send(answers[request[0]](*request[1:]))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


class TorchSide:
    """The parent's handle on torch_worker's process."""

    def __init__(self, hf_dir: Path, examples: list[Example], dtype: str) -> None:
        ids = np.stack([s for e in examples for s in e.sequences])
        context = multiprocessing.get_context("spawn")  # a fork would copy XLA's threads' state
        self.connection, theirs = context.Pipe()
        self.process = context.Process(
            target=torch_worker, args=(theirs, str(hf_dir), ids, dtype), daemon=True
        )
        self.process.start()
        theirs.close()
        self.rewards = self.receive()

    def receive(self) -> Any:
        try:
            return self.connection.recv()
        except EOFError:
            self.process.join()
            code = self.process.exitcode
            raise SystemExit(f"the transformers process ended (exit code {code})") from None

    def ask(self, *request: object) -> Any:
        """torch_worker's answer to `request` ("steps", count), ("peak",) or ("rss",)."""
        self.connection.send(request)
        return self.receive()

    def stop(self) -> None:
        self.connection.send(("stop",))
        self.process.join()


def torch_matmul_peak(size: int = 1024) -> float:
    import torch

    x = torch.ones(size, size)
    x @ x
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sequence_stats(examples: list[Example]) -> tuple[int, int]:
    """(tokens, attention pairs) of running every sequence in full."""
    lengths = [len(s) for e in examples for s in e.sequences]
    return sum(lengths), sum(n * (n + 1) // 2 for n in lengths)


def build_parser() -> argparse.ArgumentParser:
    """The model, batch and timing flags (shared with bench_attention_share.py)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=4, help="pairs (or triples) per step")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence (pairs)")
    parser.add_argument("--polar", action="store_true", help="POLAR triples, shared prefix")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (--polar)")
    parser.add_argument("--response", type=int, default=256, help="reference/candidate tokens")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", default="xla", help="model.attention for jaxrm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per side in a round")
    parser.add_argument("--json", help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    memory_kept = keep_freed_memory()

    examples = make_examples(args, np.random.default_rng(0))
    # A row holds one example: its pair, or its triple with the shared prefix once.
    seq_len = max(layout(e, shared_prefix=args.polar).length for e in examples)
    config = make_config(args, seq_len, max(len(s) for e in examples for s in e.sequences))
    batch = packed_batch(examples, config)

    print(f"jaxrm: compiling ({args.pairs} {'triples' if args.polar else 'pairs'})")
    ours = prepare_jaxrm(config, batch)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_for_torch(config, ours.pop("params"), Path(tmp))
        print("transformers: loading the same weights in a process of its own")
        theirs = TorchSide(hf_dir, examples, args.dtype)
    print(f"timing jaxrm and transformers in {args.repeats} alternating rounds")
    # The machine's peak: the best of both libraries' matmuls, before and after the steps.
    peak_jax = measured_matmul_peak(jax.devices()[0], "float32")
    peak_torch = theirs.ask("peak")
    rounds, faults = interleaved_seconds(
        {
            "jaxrm": lambda count: timed_steps(ours["step"], count),
            "transformers": lambda count: theirs.ask("steps", count),
        },
        args,
    )
    peak_jax = max(peak_jax, measured_matmul_peak(jax.devices()[0], "float32"))
    peak_torch = max(peak_torch, theirs.ask("peak"))
    peak = max(peak_jax, peak_torch)
    peak_rss = {"jaxrm": peak_rss_bytes(), "transformers": theirs.ask("rss")}
    theirs.stop()
    seconds = {name: statistics.median(times) for name, times in rounds.items()}

    jaxrm_tokens = int((batch["segment_ids"] != 0).sum())
    jaxrm_pairs = float(attention_pairs(batch["positions"], batch["segment_ids"]))
    torch_tokens, torch_pairs = sequence_stats(examples)
    rows = {}
    for name, tokens, pairs in (
        ("jaxrm", jaxrm_tokens, jaxrm_pairs),
        ("transformers", torch_tokens, torch_pairs),
    ):
        flops = train_flops(config.model, tokens, pairs, lm_head=False)
        rows[name] = {
            "seconds_per_step": seconds[name],
            "tokens_per_step": tokens,
            "tokens_per_sec": tokens / seconds[name],
            "examples_per_sec": args.pairs / seconds[name],
            "mfu": flops / seconds[name] / peak,
            "page_faults_per_step": faults[name],
            "rounds_seconds_per_step": rounds[name],
            "peak_rss_bytes": peak_rss[name],  # of the side's whole process
        }
    rows["jaxrm"]["compile_seconds"] = ours["compile_seconds"]
    difference = float(np.max(np.abs(ours["rewards"] - theirs.rewards)))
    unit = "triples" if args.polar else "pairs"
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {
            "cpus": os.cpu_count(),
            "jax_device": jax.devices()[0].device_kind,
            "matmul_peak_jax": peak_jax,
            "matmul_peak_torch": peak_torch,
            "freed_memory_kept": memory_kept,  # jaxrm.train.host_memory, in both processes
            "transformers_process": "separate",
        },
        **rows,
        "ratio_tokens_per_sec": rows["jaxrm"]["tokens_per_sec"]
        / rows["transformers"]["tokens_per_sec"],
        f"ratio_{unit}_per_sec": rows["jaxrm"]["examples_per_sec"]
        / rows["transformers"]["examples_per_sec"],
        "max_reward_difference": difference,
    }
    print_table(results, unit)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if difference > 1e-3 * (1 if args.dtype == "float32" else 50):
        print(f"rewards differ by {difference:.2e}: the comparison is not of the same model")
        sys.exit(1)
    return results


def print_table(results: dict, unit: str) -> None:
    peak = max(results["machine"]["matmul_peak_jax"], results["machine"]["matmul_peak_torch"])
    kept = "kept" if results["machine"]["freed_memory_kept"] else "returned to the kernel"
    print(f"\nmatmul peak (measured): {peak / 1e9:.1f} GFLOP/s; freed host memory {kept}")
    header = f"{'s/step':>9}{'tokens/s':>11}{unit + '/s':>11}{'MFU':>7}{'faults/step':>13}"
    print(f"{'':14}{header}{'peak RSS':>10}")
    for name in ("jaxrm", "transformers"):
        r = results[name]
        print(
            f"{name:14}{r['seconds_per_step']:>9.3f}{r['tokens_per_sec']:>11.0f}"
            f"{r['examples_per_sec']:>11.2f}{r['mfu']:>7.1%}{r['page_faults_per_step']:>13.0f}"
            f"{r['peak_rss_bytes'] / 2**30:>6.2f} GiB"
        )
    print(
        f"jaxrm / transformers: {results['ratio_tokens_per_sec']:.2f}x tokens/s, "
        f"{results[f'ratio_{unit}_per_sec']:.2f}x {unit}/s; "
        f"largest reward difference {results['max_reward_difference']:.1e}"
    )


if __name__ == "__main__":
    main()
