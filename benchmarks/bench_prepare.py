"""`jaxrm data prepare`: the single-process prepare against the Beam pipeline (`--runner beam`).

Both prepare the same generated file of POLAR rows (a tokenizer trained on the same words) into
shards of `--shard-size` examples, taking turns, `--repeats` times each; the median wall time
counts, from the call to the manifest written, Beam's start of its worker processes included.
Also timed: the single-process prepare with `data.num_workers` template processes (its pool).
Then the outputs are compared: the Beam shards and manifest must be those of the single-process
prepare, byte for byte.

    python benchmarks/bench_prepare.py                      # 20k rows, Beam with 2 workers
    python benchmarks/bench_prepare.py --rows 300 --repeats 1     # a quick check

Run it on an otherwise idle machine.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no libtpu probing (and its warnings) on a CPU host
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from data_helpers import polar_rows, train_sentencepiece, write_jsonl

from jaxrm.config import load_config
from jaxrm.data.beam_prepare import prepare_with_beam
from jaxrm.data.prepare import prepare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--words", type=int, nargs=2, default=(20, 80), help="words per field")
    parser.add_argument("--workers", type=int, default=2, help="Beam's and the pool's processes")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    return parser


def make_data(directory: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(config, rows): a POLAR config with a trained toy tokenizer, and the generated rows."""
    tokenizer = train_sentencepiece(directory)
    rows = write_jsonl(directory / "rows.jsonl", polar_rows(args.rows, 0, tuple(args.words)))
    config = directory / "config.yaml"
    config.write_text(
        f"objective: polar\ndata:\n  tokenizer: {tokenizer}\n  reward_token: <|score|>\n"
        "  seq_len: 2048\n  max_length: 512\n"
    )
    return config, rows


def timed(run: Callable[[Path], dict], out: Path) -> float:
    start = time.perf_counter()
    run(out)
    return time.perf_counter() - start


def same_files(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def main() -> None:
    args = build_parser().parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    config_path, rows = make_data(work, args)
    config = load_config(config_path, [])
    pooled = load_config(config_path, [f"data.num_workers={args.workers}"])
    spec, size = str(rows), args.shard_size
    beam_args = [f"--direct_num_workers={args.workers}"]
    sides = {
        "single process": lambda out: prepare(config, spec, out, size),
        f"single process, pool of {args.workers}": lambda out: prepare(pooled, spec, out, size),
        f"beam FnApiRunner, {args.workers} workers": lambda out: prepare_with_beam(
            config, spec, out, pipeline_args=beam_args, shard_size=size
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for i, (name, run) in enumerate(sides.items()):
            seconds[name].append(timed(run, work / f"out-{repeat}-{i}"))
    single, pool, beam = (work / f"out-0-{i}" for i in range(3))
    manifest = json.loads((single / "manifest.json").read_text())
    identical = same_files(single, beam, ["manifest.json", *manifest["shards"]])
    pool_identical = same_files(single, pool, manifest["shards"])

    results = {
        "rows": args.rows,
        "examples": manifest["examples"],
        "tokens": manifest["tokens"],
        "shards": len(manifest["shards"]),
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "rows_per_sec": {name: args.rows / statistics.median(s) for name, s in seconds.items()},
        "records_identical": identical,
        "pool_records_identical": pool_identical,
    }
    print(
        f"{args.rows} rows -> {manifest['examples']} examples, {manifest['tokens']} tokens, "
        f"{len(manifest['shards'])} shards; {os.cpu_count()} CPUs; median of {args.repeats}"
    )
    for name, s in seconds.items():
        runs = ", ".join(f"{x:.2f}" for x in s)
        rate = results["rows_per_sec"][name]
        print(f"  {name:<32} {statistics.median(s):7.2f} s {rate:8.0f} rows/s  ({runs})")
    rates = list(results["rows_per_sec"].values())
    print(f"beam / single process: {rates[2] / rates[0]:.2f}x rows/s")
    print(f"records identical: {'yes' if identical else 'NO'} (beam's shards and manifest)")
    print(f"pool records identical: {'yes' if pool_identical else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work)
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
