"""`jaxrm data prepare` and `jaxrm data stats`: tokenise ahead of time, and measure a dataset.

    prepare(config, "data/train.jsonl", "data/train_prepared")   # ArrayRecord shards + manifest
    report = stats(config, "data/train.jsonl")                   # lengths, packing, savings

A prepared directory holds `examples-0000K-of-0000N.array_record` shards of templated examples and
`manifest.json` with the template settings (tokenizer by content hash); `data.train` may name the
directory, and a run whose settings differ is refused. `data/beam_prepare.py` writes the same
directory with an Apache Beam pipeline (`--runner beam`), through the helpers below.
"""

import json
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxrm.config import Config, config_to_dict
from jaxrm.data.pipeline import (
    MANIFEST,
    PREPARED_FORMAT,
    ExitWithParent,
    RowSource,
    Skipped,
    ToExample,
    encode_example,
    pack_rows,
    pack_window,
    template_spec,
)
from jaxrm.data.templates import Example
from jaxrm.storage import PathLike, join, require_new_dir, staged_directory, write_bytes

# One record per group: a reader fetches one example without decompressing its neighbours.
SHARD_OPTIONS = "group_size:1"


def templated(
    config: Config, spec: str | Sequence[str], description: str
) -> Iterator[Example | Skipped]:
    """Every row of `spec`, in order, templated (in `data.num_workers` processes when > 0)."""
    data = config.data
    rows = RowSource(spec, data.tfds_data_dir)
    to_example = ToExample(template_spec(config), data.skip_bad_rows, data.max_candidates)
    items = (rows[i] for i in range(len(rows)))
    progress = dict(total=len(rows), desc=description, unit=" rows", dynamic_ncols=True)
    if data.num_workers > 0:
        start = ExitWithParent(os.getpid())
        with multiprocessing.get_context("spawn").Pool(data.num_workers, start) as pool:
            yield from tqdm(pool.imap(to_example, items, chunksize=64), **progress)
    else:
        yield from tqdm(map(to_example, items), **progress)


def prepare(
    config: Config, spec: str | Sequence[str], out: str | Path, shard_size: int = 100_000
) -> dict[str, Any]:
    """Writes the templated examples of `spec` as ArrayRecord shards; returns the manifest."""
    out = require_new_dir(out, "output directory")
    # Shards are written locally (ArrayRecordWriter cannot write to a bucket) and uploaded with
    # the manifest last: a reader that finds the manifest finds every shard.
    with staged_directory(out, last=(MANIFEST,)) as staging:
        counts = {"examples": 0, "skipped_rows": 0, "tokens": 0}
        shard_files: list[Path] = []
        writer = None
        for item in templated(config, spec, "prepare"):
            if isinstance(item, Skipped):
                counts["skipped_rows"] += 1
                continue
            if counts["examples"] % shard_size == 0:
                if writer is not None:
                    writer.close()
                shard_files.append(staging / f"shard-{len(shard_files):05d}.array_record")
                writer = open_shard(shard_files[-1])
            writer.write(encode_example(item))
            counts["examples"] += 1
            counts["tokens"] += example_tokens(item)
        if writer is not None:
            writer.close()
        names = [shard_name(i, len(shard_files)) for i in range(len(shard_files))]
        for path, name in zip(shard_files, names, strict=True):
            path.rename(staging / name)
        manifest = make_manifest(config, spec, names, counts)
        write_manifest(staging, manifest)
    return manifest


def shard_name(index: int, count: int) -> str:
    """The name of shard `index` (from 0) of `count`."""
    return f"examples-{index + 1:05d}-of-{count:05d}.array_record"


def open_shard(path: str | Path) -> Any:
    """An ArrayRecordWriter for a new local shard file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    return ArrayRecordWriter(str(path), SHARD_OPTIONS)


def example_tokens(example: Example) -> int:
    return sum(len(s) for s in example.sequences)


def make_manifest(
    config: Config, spec: str | Sequence[str], shards: list[str], counts: dict[str, int]
) -> dict[str, Any]:
    """The manifest of a prepared directory; `counts`: examples, skipped_rows, tokens."""
    return {
        "format": PREPARED_FORMAT,
        "source": spec if isinstance(spec, str) else list(spec),
        "template": template_spec(config).fingerprint(),
        "shards": shards,
        **counts,
        "data": config_to_dict(config)["data"],
    }


def write_manifest(directory: PathLike, manifest: dict[str, Any]) -> None:
    write_bytes(join(directory, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())


def stats(config: Config, spec: str | Sequence[str]) -> dict[str, Any]:
    """Sequence lengths, token counts, packing efficiency and shared-prefix savings."""
    examples, skipped = [], 0
    for item in templated(config, spec, "stats"):
        if isinstance(item, Skipped):
            skipped += 1
        else:
            examples.append(item)
    lengths = np.asarray([len(s) for e in examples for s in e.sequences], np.int64)
    data = config.data
    report: dict[str, Any] = {
        "examples": len(examples),
        "skipped_rows": skipped,
        "sequences": len(lengths),
        "seq_len": data.seq_len,
    }
    if not examples:
        return report
    report["sequence_tokens"] = _length_summary(lengths)
    report["length_histogram"] = _histogram(lengths)
    window = pack_window(config)
    for shared in (False, True):
        rows = [
            row
            for i in range(0, len(examples), window)
            for row in pack_rows(examples[i : i + window], config, shared)
        ]
        tokens = sum(int((row["segment_ids"] > 0).sum()) for row in rows)
        report["shared_prefix" if shared else "unshared"] = {
            "tokens": tokens,
            "rows": len(rows),
            "packing_efficiency": tokens / (len(rows) * data.seq_len),
        }
    report["shared_prefix_savings"] = (
        1 - report["shared_prefix"]["tokens"] / report["unshared"]["tokens"]
    )
    if config.objective == "codepmp":
        report["lm_target_tokens"] = int(sum(int(e.lm_mask.sum()) for e in examples))
    return report


def _length_summary(lengths: np.ndarray) -> dict[str, float]:
    return {
        "total": int(lengths.sum()),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p90": float(np.percentile(lengths, 90)),
        "p99": float(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
    }


def _histogram(lengths: np.ndarray, buckets: int = 10) -> list[dict[str, int]]:
    """Counts over power-of-two-ish buckets of sequence length."""
    low, high = max(1, int(lengths.min())), int(lengths.max()) + 1
    edges = np.unique(np.geomspace(low, max(high, low + 1), buckets + 1).astype(np.int64))
    edges[-1] = max(edges[-1], high)
    counts, _ = np.histogram(lengths, bins=edges)
    return [
        {"from": int(lo), "to": int(hi) - 1, "count": int(n)}
        for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def format_stats(report: dict[str, Any]) -> str:
    lines = [
        f"examples {report['examples']}, sequences {report['sequences']}, "
        f"skipped rows {report['skipped_rows']}, row length {report['seq_len']}"
    ]
    if "sequence_tokens" not in report:
        return "\n".join(lines)
    t = report["sequence_tokens"]
    lines.append(
        f"sequence tokens: total {t['total']}, mean {t['mean']:.1f}, p50 {t['p50']:.0f}, "
        f"p90 {t['p90']:.0f}, p99 {t['p99']:.0f}, max {t['max']}"
    )
    widest = max(b["count"] for b in report["length_histogram"]) or 1
    for bucket in report["length_histogram"]:
        bar = "#" * math.ceil(40 * bucket["count"] / widest) if bucket["count"] else ""
        lines.append(f"  {bucket['from']:>6}-{bucket['to']:<6} {bucket['count']:>8} {bar}")
    for name in ("unshared", "shared_prefix"):
        p = report[name]
        lines.append(
            f"{name.replace('_', ' '):>13}: {p['tokens']} tokens in {p['rows']} rows, "
            f"packing efficiency {100 * p['packing_efficiency']:.1f}%"
        )
    lines.append(f"shared-prefix savings: {100 * report['shared_prefix_savings']:.1f}% of tokens")
    if "lm_target_tokens" in report:
        lines.append(f"LM-loss target tokens: {report['lm_target_tokens']}")
    return "\n".join(lines)
