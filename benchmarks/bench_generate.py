"""Generation: jaxrm's KV-cache sampler against Hugging Face transformers' `generate`.

Both run the same random tiny LlamaForCausalLM (float32; jaxrm loads transformers' saved files)
on the same batch of prompts and make the same number of new tokens per row (no EOS), greedy and
sampling (temperature 1, top-k 50, top-p 0.9). Each side is warmed up once (jaxrm's first call
compiles: its time is reported apart), then timed over `--repeats` runs; the median counts.
Greedy tokens are compared: they should be identical, and the first mismatch is reported if not.

    python benchmarks/bench_generate.py                  # 8 prompts x 128 tokens, 128 new tokens
    python benchmarks/bench_generate.py --json generate.json
    python benchmarks/bench_generate.py --queue 4      # 4 x 8 prompts, answers of mixed lengths

With `--queue N`, N x `--batch` prompts are answered greedily with stop ids that end the answers
at mixed lengths: transformers runs them in batches of `--batch` (a batch lasts as long as its
longest answer), jaxrm keeps `--batch` rows busy by refilling finished ones (continuous
batching). Both make the same tokens; tokens/s counts them.

Run it on an otherwise idle machine; torch keeps its default thread count (printed).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no libtpu probing (and its warnings) on a CPU host
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax
import numpy as np
import torch
import transformers
from data_helpers import hf_model

from jaxrm.generate.sampler import Sampler, Sampling
from jaxrm.hf.convert import load_hf
from jaxrm.sharding import make_mesh
from jaxrm.train.host_memory import keep_freed_memory

BOS = 1
MODES = {
    "greedy": Sampling(temperature=0),
    "sampling": Sampling(temperature=1.0, top_k=50, top_p=0.9),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-positions", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queue", type=int, default=0, help="batches of mixed-length answers")
    parser.add_argument("--json", help="also write the results here")
    return parser


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    # Peaky logits (weights spread as in tests/test_sampling.py) so that greedy has no near-ties.
    model = hf_model(
        "llama",
        "ForCausalLM",
        scale=0.5,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        bos_token_id=BOS,
        attn_implementation="sdpa",
    )
    model.generation_config.eos_token_id = None  # every row makes exactly --new-tokens tokens
    return model


def timed(run: Callable[[], list[list[int]]], repeats: int) -> dict:
    """The first call's seconds and tokens, then the median seconds of `repeats` more calls."""
    start = time.perf_counter()
    tokens = run()
    first = time.perf_counter() - start
    return {"first_call_seconds": first, "seconds": time_steps(run, 0, repeats, 1), "out": tokens}


def run_transformers(
    model: torch.nn.Module, prompts: np.ndarray, mode: str, args: argparse.Namespace
) -> dict:
    sampling = MODES[mode]
    options = {"do_sample": False}
    if sampling.temperature:
        options = {"do_sample": True, "temperature": sampling.temperature}
        options.update(top_k=sampling.top_k, top_p=sampling.top_p)
    ids = torch.tensor(prompts, dtype=torch.long)

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
                **options,
            )
        return out[:, ids.shape[1] :].tolist()

    torch.manual_seed(0)
    return timed(run, args.repeats)


def time_steps(step: Callable[[], object], warmup: int, repeats: int, steps: int) -> float:
    """Median seconds per step over `repeats` runs of `steps` steps, after `warmup` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def run_jaxrm(sampler: Sampler, prompts: np.ndarray, args: argparse.Namespace) -> dict:
    batch = prompts.tolist()
    ids = [(i, 0) for i in range(len(batch))]

    def run() -> list[list[int]]:
        return [g.tokens for g in sampler.generate(batch, ids, args.new_tokens, eos_ids=[])]

    return timed(run, args.repeats)


def first_mismatch(ours: list[list[int]], theirs: list[list[int]]) -> dict | None:
    """The earliest new-token position where the two differ (and its first row), or None."""
    differ = np.asarray(ours) != np.asarray(theirs)  # [rows, new tokens]; speed() checked shapes
    if not differ.any():
        return None
    position = int(differ.any(axis=0).argmax())
    return {"row": int(differ[:, position].argmax()), "position": position}


def speed(result: dict, tokens: int) -> dict:
    """Seconds per run and new tokens per second, once every row made its share of `tokens`."""
    row = {"seconds_per_run": result["seconds"], "tokens_per_sec": tokens / result["seconds"]}
    lengths = {len(t) for t in result["out"]}
    if lengths != {tokens // len(result["out"])}:
        raise SystemExit(f"expected every row to make the same number of tokens, got {lengths}")
    return row


def run_queue(
    model: torch.nn.Module, sampler: Sampler, prompts: np.ndarray, args: argparse.Namespace
) -> dict:
    """Greedy answers that stop at mixed lengths: static batches against continuous batching."""
    batch, ids = prompts.tolist(), [(i, 0) for i in range(len(prompts))]
    free_run = [g.tokens for g in sampler.generate(batch, ids, args.new_tokens, eos_ids=[])]
    # Per answer a stop id it first meets at a random point: lengths spread over the budget
    # (another answer holding that id earlier stops there too).
    rng = np.random.default_rng(1)
    stops = set()
    for answer in free_run:
        start = int(rng.integers(1, len(answer)))
        fresh = [i for i in range(start, len(answer)) if answer[i] not in answer[:i]]
        stops.update(answer[i] for i in fresh[:1])
    stops = sorted(stops)
    ours = timed(
        lambda: [g.tokens for g in sampler.generate(batch, ids, args.new_tokens, stops)],
        args.repeats,
    )

    def static_batches() -> list[list[int]]:
        out = []
        for start in range(0, len(batch), args.batch):
            ids_t = torch.tensor(batch[start : start + args.batch], dtype=torch.long)
            with torch.inference_mode():
                new = model.generate(
                    ids_t,
                    attention_mask=torch.ones_like(ids_t),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=0,
                )[:, ids_t.shape[1] :].tolist()
            out += [
                row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]
                for row in new
            ]
        return out

    theirs = timed(static_batches, args.repeats)
    tokens = sum(len(t) for t in ours["out"])
    return {
        "prompts": len(batch),
        "tokens": tokens,
        "answer_lengths": sorted(len(t) for t in ours["out"]),
        "identical": ours["out"] == theirs["out"],
        "jaxrm_tokens_per_sec": tokens / ours["seconds"],
        "transformers_tokens_per_sec": tokens / theirs["seconds"],
        "ratio_tokens_per_sec": theirs["seconds"] / ours["seconds"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, args.vocab, (args.batch * max(args.queue, 1), args.prompt_len))
    prompts[:, 0] = BOS
    tokens = args.batch * args.new_tokens

    transformers.utils.logging.disable_progress_bar()
    model = make_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = load_hf(tmp, keep_lm_head=True, overrides=["model.dtype=float32"])
    mesh = make_mesh(fsdp=-1)
    if args.queue:
        sampler = Sampler(loaded, mesh, MODES["greedy"], seed=0, batch_size=args.batch)
        queue = run_queue(model, sampler, prompts, args)
        print(json.dumps(queue))
        return queue

    results = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {
            "cpus": os.cpu_count(),
            "jax_device": jax.devices()[0].device_kind,
            "torch_threads": torch.get_num_threads(),
        },
    }
    for mode, sampling in MODES.items():
        print(f"{mode}: jaxrm (the first call compiles)")
        sampler = Sampler(loaded, mesh, sampling, seed=0, batch_size=args.batch)
        ours = run_jaxrm(sampler, prompts, args)
        print(f"{mode}: transformers")
        theirs = run_transformers(model, prompts, mode, args)
        rows = {"jaxrm": speed(ours, tokens), "transformers": speed(theirs, tokens)}
        rows["jaxrm"]["first_call_seconds"] = ours["first_call_seconds"]
        rows["transformers"]["first_call_seconds"] = theirs["first_call_seconds"]
        rows["ratio_tokens_per_sec"] = (
            rows["jaxrm"]["tokens_per_sec"] / rows["transformers"]["tokens_per_sec"]
        )
        if mode == "greedy":
            mismatch = first_mismatch(ours["out"], theirs["out"])
            rows["greedy_matched"] = mismatch is None
            rows["first_mismatch"] = mismatch
        results[mode] = rows

    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict) -> None:
    config, machine = results["config"], results["machine"]
    print(
        f"\n{config['batch']} prompts x {config['prompt_len']} tokens, {config['new_tokens']} new "
        f"tokens each; {machine['cpus']} CPUs, torch threads {machine['torch_threads']}"
    )
    print(f"{'':22}{'s/run':>9}{'tokens/s':>10}{'first call s':>14}")
    for mode in MODES:
        rows = results[mode]
        for name in ("jaxrm", "transformers"):
            r = rows[name]
            print(
                f"{mode + ' ' + name:22}{r['seconds_per_run']:>9.3f}{r['tokens_per_sec']:>10.0f}"
                f"{r['first_call_seconds']:>14.2f}"
            )
        print(f"{mode + ' jaxrm/transformers':22}{'':9}{rows['ratio_tokens_per_sec']:>9.2f}x")
    greedy = results["greedy"]
    if greedy["greedy_matched"]:
        print("greedy tokens: identical")
    else:
        where = greedy["first_mismatch"]
        print(f"greedy tokens: first differ at new token {where['position']} of row {where['row']}")


if __name__ == "__main__":
    main()
