"""Rewards for many token sequences at once: length-bucketed, sharded batches on a loaded model.

    scorer = Scorer.open("runs/tiny_polar")              # a run, checkpoint or HF directory
    sequences = [scorer.score_sequence(row) for row in rows]   # {prompt, reference?, response}
    rewards = scorer.rewards(sequences)                  # np.ndarray [len(sequences)], float32

Sequences are sorted by length and batched with others of the same bucket: a length rounded up
to a quarter-octave step (..., 96, 112, 128, 160, 192, 224, 256, 320, ...), so padding costs at
most a fifth of the compute and few shapes get compiled. A batch holds about `batch_tokens`
tokens per device; its rows are a power of two times the devices that split the batch. Each
sequence is scored in a row of its own (no packing), so its reward never depends on what else
is in the batch.

`jaxrm score CHECKPOINT --data FILE --out FILE` writes each scoring row with its `reward` added.
"""

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxrm.checkpoint.loading import load_model
from jaxrm.data.packing import round_up
from jaxrm.data.pipeline import template_spec
from jaxrm.data.rows import BadRow, check_row
from jaxrm.data.sources import read_rows
from jaxrm.data.templates import Template
from jaxrm.errors import UserError
from jaxrm.model.decoder import Loaded, rewards_at
from jaxrm.sharding import activation_sharding, batch_sharding, make_mesh
from jaxrm.storage import staged_file

MIN_BUCKET = 32
CHUNK_ROWS = 16384  # rows read, templated and scored at a time, so memory stays bounded


def bucket_length(length: int) -> int:
    return round_up(length, MIN_BUCKET)


@dataclasses.dataclass
class Batch:
    length: int  # padded length
    rows: int  # padded row count
    indices: np.ndarray  # which sequences, in row order


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, row_multiple: int, max_rows: int
) -> list[Batch]:
    """Batches over sequences of `lengths`, longest first (a too-large shape fails early)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    buckets: dict[int, list[int]] = {}
    for i in order:
        buckets.setdefault(bucket_length(int(lengths[i])), []).append(int(i))
    batches = []
    for length, members in buckets.items():
        per_device = min(max(1, batch_tokens // length), max(1, max_rows // row_multiple))
        capacity = row_multiple * per_device
        for start in range(0, len(members), capacity):
            chunk = members[start : start + capacity]
            needed = math.ceil(len(chunk) / row_multiple)
            rows = row_multiple * min(per_device, round_up(needed, 1))
            batches.append(Batch(length, rows, np.asarray(chunk)))
    return batches


@dataclasses.dataclass
class Counts:
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # tokens computed, padding included
    batches: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "sequences_per_sec": self.sequences / seconds,
            "tokens_per_sec": self.tokens / seconds,
            "padding": 1 - self.tokens / max(self.padded_tokens, 1),
        }


class Scorer:
    """A loaded reward model, its template, and a jitted reward function per batch shape."""

    def __init__(
        self, loaded: Loaded, mesh: Mesh, *, batch_tokens: int = 8192, max_rows: int = 256
    ):
        self.config = loaded.config
        self.mesh, self.rules = mesh, loaded.config.mesh.rules
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        self.row_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self.max_length = loaded.config.data.max_length
        self.template: Template = template_spec(loaded.config, loaded.tokenizer_dir).build()
        self.graphdef, self.state = nnx.split(loaded.model)
        self.counts = Counts()
        self._rewards = jax.jit(self._batch_rewards)

    @classmethod
    def open(cls, checkpoint: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> "Scorer":
        """The model behind a CHECKPOINT argument, on all devices (FSDP)."""
        mesh = make_mesh(fsdp=-1)
        return cls(load_model(checkpoint, mesh, overrides=overrides), mesh, **kwargs)

    @property
    def objective(self) -> str:
        return self.config.objective

    def _batch_rewards(self, state: Any, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        segments = (positions < lengths[:, None]).astype(jnp.int32)
        hidden = model(tokens, segments, positions)
        return rewards_at(model.token_rewards(hidden), (lengths - 1)[:, None])[:, 0]

    def rewards(self, sequences: Sequence[np.ndarray], progress: tqdm | None = None) -> np.ndarray:
        """One reward per token sequence, in order."""
        lengths = [len(s) for s in sequences]
        out = np.zeros(len(sequences), np.float32)
        started = time.perf_counter()
        running: tuple[Batch, jax.Array] | None = None
        for batch in plan_batches(lengths, self.batch_tokens, self.row_multiple, self.max_rows):
            launched = (batch, self._launch(batch, sequences))
            if running is not None:  # the device works on this batch while the last one is read
                self._collect(*running, out, progress)
            running = launched
        if running is not None:
            self._collect(*running, out, progress)
        self.counts.seconds += time.perf_counter() - started
        return out

    def _launch(self, batch: Batch, sequences: Sequence[np.ndarray]) -> jax.Array:
        tokens = np.zeros((batch.rows, batch.length), np.int32)
        lengths = np.zeros(batch.rows, np.int32)
        for row, i in enumerate(batch.indices):
            tokens[row, : len(sequences[i])] = sequences[i]
            lengths[row] = len(sequences[i])
        put = lambda x: jax.device_put(x, batch_sharding(self.mesh, self.rules, x.shape))  # noqa: E731
        with activation_sharding(self.mesh, self.rules):
            values = self._rewards(self.state, put(tokens), put(lengths))
        self.counts.sequences += len(batch.indices)
        self.counts.tokens += int(lengths.sum())
        self.counts.padded_tokens += tokens.size
        self.counts.batches += 1
        return values

    def _collect(
        self, batch: Batch, values: jax.Array, out: np.ndarray, progress: tqdm | None
    ) -> None:
        out[batch.indices] = np.asarray(values)[: len(batch.indices)]
        if progress is not None:
            progress.update(len(batch.indices))

    # --- rows and texts to token sequences ---------------------------------------------------

    def check_score_row(self, row: Any, where: str) -> dict[str, Any]:
        """`row` if it is a scoring row this model can score (POLAR needs its reference)."""
        check_row(row, "score", where)
        if self.objective == "polar" and row.get("reference") is None:
            raise BadRow(
                f"{where}: field 'reference' is missing (a POLAR model scores against one)"
            )
        return row

    def score_sequence(self, row: dict[str, Any]) -> np.ndarray:
        """The tokens of a checked scoring row, as the model's template builds them: its response
        as the only candidate, so no other response shortens it."""
        return self.template({**row, "ranked": [row["response"]]}).sequences[0]

    def text_sequence(self, text: str) -> tuple[np.ndarray, bool]:
        """(tokens, truncated) of an already formatted text: BOS + text + the reward token, its
        start dropped when it is longer than `data.max_length` (the end is where the reward is
        read)."""
        ids = self.template.tokenizer.encode(text, add_special_tokens=True)
        prefix = self.template.special_prefix
        budget = self.max_length - 1
        truncated = len(ids) > budget
        if truncated:
            ids = prefix + ids[len(ids) - (budget - len(prefix)) :]
        return np.asarray([*ids, self.template.reward_id], np.int32), truncated


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_file(scorer: Scorer, data: str, out: str | Path) -> dict[str, Any]:
    """Writes every scoring row of `data` with its `reward` to the JSONL file `out` (nothing
    at all when a row is malformed); returns the throughput summary."""
    out = Path(out).absolute()
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out")
    rows, bar = 0, None
    with staged_file(out) as staging, staging.open("w", encoding="utf-8") as f:
        for chunk in chunks(read_rows(data), CHUNK_ROWS):
            checked = [scorer.check_score_row(row, where) for where, row in chunk]
            sequences = [scorer.score_sequence(row) for row in checked]
            bar = bar or tqdm(desc="scoring", total=0, unit="seq", dynamic_ncols=True)
            bar.total += len(sequences)
            for row, reward in zip(checked, scorer.rewards(sequences, bar), strict=True):
                scored = {**row, "reward": float(reward)}
                f.write(json.dumps(scored, ensure_ascii=False, default=_plain) + "\n")
            rows += len(checked)
        if bar is not None:
            bar.close()
        if rows == 0:
            raise UserError(f"{data}: no rows to score")
    return {"rows": rows, "out": str(out), **scorer.counts.summary()}


def _plain(value: Any) -> Any:
    """JSON for the values Parquet and TFDS rows may hold besides JSON's own (arrays, dates)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def add_scorer_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that loads a model to score shares."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run, checkpoint or HF directory")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config changes for scoring, e.g. model.dtype=float32 data.max_length=4096",
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=8192, help="tokens per device in one batch"
    )
    parser.add_argument("--max-rows", type=int, default=256, help="sequences in one batch, at most")


def open_scorer(args: argparse.Namespace) -> Scorer:
    if args.batch_tokens < 1 or args.max_rows < 1:
        raise UserError("--batch-tokens and --max-rows must be positive")
    return Scorer.open(
        args.checkpoint, args.overrides, batch_tokens=args.batch_tokens, max_rows=args.max_rows
    )


def cmd_score(args: argparse.Namespace) -> None:
    summary = score_file(open_scorer(args), args.data, args.out)
    print(json.dumps(summary))


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    score = commands.add_parser(
        "score",
        help="one reward per scoring row, written beside the row",
        description="Score every row {prompt, reference?, response} of --data (JSONL, Parquet, "
        "ArrayRecord or tfds:...) with the checkpoint's own template and write each row with "
        "its 'reward' to --out (JSONL). Sequences of similar length are batched together; the "
        "summary gives throughput and the share of padding.",
    )
    add_scorer_options(score)
    score.add_argument("--data", required=True, help="scoring rows")
    score.add_argument("--out", required=True, help="new JSONL file for the scored rows")
    score.set_defaults(run=cmd_score)
