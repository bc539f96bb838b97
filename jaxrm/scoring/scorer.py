"""Rewards for many token sequences at once, in a fixed grid of compiled batch shapes.

    scorer = Scorer.open("runs/tiny_polar")              # a run, checkpoint or HF directory
    sequences = [scorer.score_sequence(row) for row in rows]   # {prompt, reference?, response}
    rewards = scorer.rewards(sequences)                  # np.ndarray [len(sequences)], float32

Every batch has a shape of the grid (`Grid`): a row length from the half-octave buckets 32, 48,
64, 96, 128, 192, ... up to the bucket of `data.max_length`, and a row count of the devices that
split the batch times a power of two, at most `batch_tokens` tokens per device (and `max_rows`
rows). So padding costs at most a third of a row's compute, and the shapes are few and known in
advance: `compile_grid()` compiles them all (what `jaxrm serve` does before it answers), after
which no input ever waits on a compile. `jaxrm score` compiles the shapes it meets as it goes.

Sequences are packed into rows as in training: several to a row, each its own segment with its
own positions, so attention never crosses them and a reward is the one the sequence gets alone
(within float rounding), while a batch of short texts is a few rows, not one row each. A group's
responses share their prefix (`Row.group`): it is packed once, and each response attends to it
and to itself, with positions that continue the prefix's. The device returns the reward head at
every token; each sequence's reward is the value at its last token. A multi-attribute head
(`model.attributes`) returns an output per attribute there (`scores`), and its reward is their
weighted sum (`model.attribute_weights`, by default their mean).

`jaxrm score CHECKPOINT --data FILE --out FILE` writes each scoring row with its `reward` added
(and, with attributes, its `scores` by attribute name).
"""

import argparse
import bisect
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxrm import storage
from jaxrm.checkpoint.loading import load_model
from jaxrm.data.packing import common_prefix_length
from jaxrm.data.pipeline import template_spec
from jaxrm.data.rows import BadRow, check_row
from jaxrm.data.sources import read_rows
from jaxrm.data.templates import Template
from jaxrm.errors import UserError
from jaxrm.model.decoder import Loaded
from jaxrm.sharding import activation_sharding, batch_sharding, make_mesh
from jaxrm.storage import staged_file

MIN_BUCKET = 32
CHUNK_ROWS = 16384  # rows read, templated and scored at a time, so memory stays bounded
ROW_FIELDS = ("tokens", "segment_ids", "positions", "prefix_ids")


def bucket_length(length: int) -> int:
    """The grid's row length for `length` tokens: the next of 32, 48, 64, 96, 128, 192, ..."""
    if length <= MIN_BUCKET:
        return MIN_BUCKET
    power = 2 ** (math.ceil(math.log2(length)) - 1)
    return power * 3 // 2 if length <= power * 3 // 2 else power * 2


@dataclasses.dataclass(frozen=True)
class Grid:
    """The batch shapes (rows, length) a scorer runs: known before the first input arrives."""

    max_length: int  # longest row, in tokens
    batch_tokens: int  # tokens per device in one batch, at most (a row longer than that: 1 row)
    row_multiple: int  # devices that split the rows
    max_rows: int

    def lengths(self) -> list[int]:
        lengths = [MIN_BUCKET]
        while lengths[-1] < self.max_length:
            lengths.append(bucket_length(lengths[-1] + 1))
        return lengths

    def row_counts(self, length: int) -> list[int]:
        per_device = min(self.batch_tokens // length, self.max_rows // self.row_multiple)
        top = 2 ** int(math.log2(max(1, per_device)))
        return [self.row_multiple * 2**k for k in range(int(math.log2(top)) + 1)]

    def shapes(self) -> list[tuple[int, int]]:
        return [(rows, length) for length in self.lengths() for rows in self.row_counts(length)]

    def rows_for(self, length: int, needed: int) -> int:
        return next(r for r in self.row_counts(length) if r >= needed or r == self.capacity(length))

    def capacity(self, length: int) -> int:
        return self.row_counts(length)[-1]

    def plan(self, lengths: Sequence[int]) -> list["Batch"]:
        """Batches over rows of `lengths`, longest first (a too-large shape fails early)."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        buckets: dict[int, list[int]] = {}
        for i in order:
            buckets.setdefault(bucket_length(int(lengths[i])), []).append(int(i))
        batches = []
        for length, members in buckets.items():
            capacity = self.capacity(length)
            for start in range(0, len(members), capacity):
                chunk = members[start : start + capacity]
                batches.append(Batch(length, self.rows_for(length, len(chunk)), np.asarray(chunk)))
        return batches


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, row_multiple: int, max_rows: int
) -> list["Batch"]:
    return Grid(max(lengths), batch_tokens, row_multiple, max_rows).plan(lengths)


@dataclasses.dataclass
class Batch:
    length: int  # padded length
    rows: int  # padded row count
    indices: np.ndarray  # which rows of the input, in row order


@dataclasses.dataclass
class Row:
    """One row's tokens: one sequence, or a shared prefix and the responses that follow it.
    `ends[k]` is one past the last token of its k-th sequence (where its reward is read)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    prefix_ids: np.ndarray
    ends: list[int]

    @classmethod
    def single(cls, sequence: np.ndarray) -> "Row":
        n = len(sequence)
        ones, zeros = np.ones(n, np.int32), np.zeros(n, np.int32)
        return cls(np.asarray(sequence, np.int32), ones, np.arange(n, dtype=np.int32), zeros, [n])

    @classmethod
    def group(cls, prefix: np.ndarray, responses: Sequence[np.ndarray]) -> "Row":
        """The prefix once (segment 1), then each response as a segment that attends to it."""
        parts, segments, positions, prefixes, ends = [prefix], [], [], [], []
        segments.append(np.ones(len(prefix), np.int32))
        positions.append(np.arange(len(prefix), dtype=np.int32))
        prefixes.append(np.zeros(len(prefix), np.int32))
        used = len(prefix)
        for k, response in enumerate(responses):
            n = len(response)
            parts.append(response)
            segments.append(np.full(n, k + 2, np.int32))
            positions.append(np.arange(len(prefix), len(prefix) + n, dtype=np.int32))
            prefixes.append(np.ones(n, np.int32))
            used += n
            ends.append(used)
        tokens = np.concatenate(parts).astype(np.int32)
        return cls(tokens, *map(np.concatenate, (segments, positions, prefixes)), ends)

    @classmethod
    def concat(cls, rows: Sequence["Row"]) -> "Row":
        """`rows` one after another in one row, each keeping its own segments and prefix."""
        segments, prefixes, ends, offset, start = [], [], [], 0, 0
        for row in rows:
            segments.append(row.segment_ids + offset)
            prefixes.append(np.where(row.prefix_ids > 0, row.prefix_ids + offset, 0))
            ends += [start + end for end in row.ends]
            offset += int(row.segment_ids.max())
            start += len(row)
        return cls(
            np.concatenate([r.tokens for r in rows]).astype(np.int32),
            np.concatenate(segments).astype(np.int32),
            np.concatenate([r.positions for r in rows]).astype(np.int32),
            np.concatenate(prefixes).astype(np.int32),
            ends,
        )

    def __len__(self) -> int:
        return len(self.tokens)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of rows of `lengths` packed into bins of at most `capacity` tokens: longest
    first, each into the fullest bin it fits (best fit decreasing)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


@dataclasses.dataclass
class Groups:
    """Groups of sequences that share a prefix (each group: one prompt's responses), packed into
    rows: the prefix once per row, then as many responses as fit within `max_length` (packed by
    `pack_rows`). `owners[r]` says which group row r serves and which of its sequences."""

    rows: list[Row]
    owners: list[tuple[int, list[int]]]
    sizes: list[int]

    @classmethod
    def pack(cls, groups: Sequence[Sequence[np.ndarray]], max_length: int) -> "Groups":
        packed = cls([], [], [len(g) for g in groups])
        for g, sequences in enumerate(groups):
            if len(sequences) == 1:
                packed.rows.append(Row.single(sequences[0]))
                packed.owners.append((g, [0]))
                continue
            shared = common_prefix_length(list(sequences))
            suffixes = [len(s) - shared for s in sequences]
            for members in pack_rows(suffixes, max_length - shared):
                responses = [sequences[i][shared:] for i in members]
                packed.rows.append(Row.group(sequences[0][:shared], responses))
                packed.owners.append((g, members))
        return packed

    def rewards(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each group's head outputs at its sequences' last tokens, in order, from the rows'
        values at every position."""
        per_token = values[0].shape[1:] if values else ()
        out = [np.zeros((n, *per_token), np.float32) for n in self.sizes]
        for row, row_values, (g, members) in zip(self.rows, values, self.owners, strict=True):
            out[g][members] = row_values[np.asarray(row.ends) - 1]
        return out


@dataclasses.dataclass
class Counts:
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # tokens computed, padding included
    batches: int = 0
    seconds: float = 0.0
    compiles: int = 0  # batch shapes compiled by this scorer

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
    """A loaded reward model, its template, and one compiled reward function per grid shape."""

    def __init__(
        self, loaded: Loaded, mesh: Mesh, *, batch_tokens: int = 8192, max_rows: int = 256
    ):
        self.config = loaded.config
        self.mesh, self.rules = mesh, loaded.config.mesh.rules
        self.max_length = loaded.config.data.max_length
        row_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        max_rows = max(max_rows, row_multiple)
        self.grid = Grid(bucket_length(self.max_length), batch_tokens, row_multiple, max_rows)
        self.template: Template = template_spec(loaded.config, loaded.tokenizer_dir).build()
        self.graphdef, self.state = nnx.split(loaded.model)
        # A multi-attribute head's outputs come back per attribute; `reward_of` weighs them.
        self.attributes = list(loaded.config.model.attributes)
        self.weights = np.asarray(loaded.config.model.reward_weights, np.float32)
        self.counts = Counts()
        self._jitted = jax.jit(self._token_values)
        self._compiled: dict[tuple[int, int], Any] = {}

    @classmethod
    def open(cls, checkpoint: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> "Scorer":
        """The model behind a CHECKPOINT argument, on all devices (FSDP)."""
        mesh = make_mesh(fsdp=-1)
        return cls(load_model(checkpoint, mesh, overrides=overrides), mesh, **kwargs)

    @property
    def objective(self) -> str:
        return self.config.objective

    def _token_values(self, state: Any, *row: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, state)
        tokens, segment_ids, positions, prefix_ids = row
        hidden = model(tokens, segment_ids, positions, prefix_ids)
        return model.token_scores(hidden) if self.attributes else model.token_rewards(hidden)

    def reward_of(self, values: np.ndarray) -> np.ndarray:
        """Rewards from head outputs (one per attribute on the last axis, with attributes)."""
        return values @ self.weights if self.attributes else values

    def named(self, scores: np.ndarray) -> dict[str, float]:
        """One sequence's attribute scores by name."""
        return {name: float(v) for name, v in zip(self.attributes, scores, strict=True)}

    def compile_grid(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compiles every grid shape now; `progress(done, total)` after each."""
        shapes = self.grid.shapes()
        for done, shape in enumerate(shapes, 1):
            self._executable(shape)
            if progress is not None:
                progress(done, len(shapes))

    def _executable(self, shape: tuple[int, int]) -> Any:
        if shape not in self._compiled:
            sharding = batch_sharding(self.mesh, self.rules, shape)
            spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
            with activation_sharding(self.mesh, self.rules):
                lowered = self._jitted.lower(self.state, *[spec] * len(ROW_FIELDS))
            self._compiled[shape] = lowered.compile()
            self.counts.compiles += 1
        return self._compiled[shape]

    def rewards(self, sequences: Sequence[np.ndarray], progress: tqdm | None = None) -> np.ndarray:
        """One reward per token sequence, in order."""
        return self.reward_of(self.scores(sequences, progress))

    def scores(self, sequences: Sequence[np.ndarray], progress: tqdm | None = None) -> np.ndarray:
        """The head's outputs at each sequence's last token: [sequences], or with attributes
        [sequences, attributes]."""
        values = self.row_rewards([Row.single(s) for s in sequences], progress)
        if not values:
            return np.zeros((0, len(self.attributes)) if self.attributes else 0, np.float32)
        return np.stack([v[-1] for v in values]).astype(np.float32)

    def group_rewards(self, groups: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """Each group's rewards, its shared prefix computed once per row."""
        packed = Groups.pack(groups, self.grid.max_length)
        return [self.reward_of(r) for r in packed.rewards(self.row_rewards(packed.rows))]

    def row_rewards(self, rows: Sequence[Row], progress: tqdm | None = None) -> list[np.ndarray]:
        """The reward head at every token of each row (no padding), in order: [tokens], or with
        attributes [tokens, attributes].

        Rows are packed together into rows of up to the grid's longest length first (each keeps
        its own segments, so attention never crosses them): a few long rows instead of many
        short ones, as little padding as the grid allows and few batches to launch."""
        bins = self._bins([len(r) for r in rows])
        packed = self._run([Row.concat([rows[i] for i in members]) for members in bins], progress)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(rows)
        for members, values in zip(bins, packed, strict=True):
            start = 0
            for i in members:
                out[i] = values[start : start + len(rows[i])]
                start += len(rows[i])
        return out

    def _bins(self, lengths: Sequence[int]) -> list[list[int]]:
        """Rows packed into bins of the grid length that computes the fewest padded tokens."""
        if not lengths:
            return []
        best: tuple[int, list[list[int]]] | None = None
        longest = max(lengths)
        for length in self.grid.lengths():
            if length < longest:
                continue
            bins = pack_rows(lengths, length)
            used = [sum(lengths[i] for i in members) for members in bins]
            padded = sum(b.rows * b.length for b in self.grid.plan(used))
            if best is None or padded < best[0]:
                best = (padded, bins)
        assert best is not None
        return best[1]

    def _run(self, rows: Sequence[Row], progress: tqdm | None) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(rows)
        started = time.perf_counter()
        running: tuple[Batch, jax.Array] | None = None
        for batch in self.grid.plan([len(r) for r in rows]):
            launched = (batch, self._launch(batch, rows))
            if running is not None:  # the device works on this batch while the last one is read
                self._collect(*running, rows, out, progress)
            running = launched
        if running is not None:
            self._collect(*running, rows, out, progress)
        self.counts.seconds += time.perf_counter() - started
        return out

    def _launch(self, batch: Batch, rows: Sequence[Row]) -> jax.Array:
        shape = (batch.rows, batch.length)
        fields = {name: np.zeros(shape, np.int32) for name in ROW_FIELDS}
        for r, i in enumerate(batch.indices):
            for name in ROW_FIELDS:
                fields[name][r, : len(rows[i])] = getattr(rows[i], name)
        sharding = batch_sharding(self.mesh, self.rules, shape)
        arrays = [jax.device_put(fields[name], sharding) for name in ROW_FIELDS]
        values = self._executable(shape)(self.state, *arrays)
        self.counts.sequences += sum(len(rows[i].ends) for i in batch.indices)
        self.counts.tokens += sum(len(rows[i]) for i in batch.indices)
        self.counts.padded_tokens += batch.rows * batch.length
        self.counts.batches += 1
        return values

    def _collect(
        self,
        batch: Batch,
        values: jax.Array,
        rows: Sequence[Row],
        out: list[np.ndarray],
        progress: tqdm | None,
    ) -> None:
        host = np.asarray(values)
        for r, i in enumerate(batch.indices):
            out[i] = host[r]
        if progress is not None:
            progress.update(sum(len(rows[i].ends) for i in batch.indices))

    # --- rows and texts to token sequences ---------------------------------------------------

    def check_score_row(self, row: Any, where: str) -> dict[str, Any]:
        """`row` if it is a scoring row this model can score (POLAR needs its reference)."""
        if self.objective == "prm":
            raise BadRow(
                f"{where}: a process reward model judges solutions step by step: score rows "
                "{prompt, steps} with `jaxrm score` or POST /score"
            )
        check_row(row, "score", where)
        if self.objective == "polar" and row.get("reference") is None:
            raise BadRow(
                f"{where}: field 'reference' is missing (a POLAR model scores against one)"
            )
        return row

    def check_process_row(self, row: Any, where: str) -> dict[str, Any]:
        """`row` ({prompt, steps, labels?}) if this process-reward model can score it."""
        return check_row(row, "process_score", where)

    def process_sequence(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, where each step is judged) of a checked process-scoring row."""
        return self.template.process(row["prompt"], row["steps"], row.get("wrapper"))

    def step_rewards(
        self, solutions: Sequence[tuple[np.ndarray, np.ndarray]], progress: tqdm | None = None
    ) -> list[np.ndarray]:
        """The reward of every judged step of each (tokens, reads) solution, in order."""
        values = self.row_rewards([Row.single(tokens) for tokens, _ in solutions], progress)
        return [v[reads] for v, (_, reads) in zip(values, solutions, strict=True)]

    def score_sequence(self, row: dict[str, Any]) -> np.ndarray:
        """The tokens of a checked scoring row, as the model's template builds them: its response
        as the only candidate, so no other response shortens it."""
        return self.template({**row, "ranked": [row["response"]]}).sequences[0]

    def text_sequence(self, text: str) -> tuple[np.ndarray, bool, bool]:
        """(tokens, reward token added, truncated) of an already formatted text.

        BOS (the tokenizer's special prefix) goes first, once: a text that starts with it as
        text does not get a second. The reward token goes last, once: a text that already ends
        with it (the form vLLM and POLAR's client send) keeps its own.
        """
        ids = self.template.tokenizer.encode(text, add_special_tokens=True)
        prefix = self.template.special_prefix
        if prefix and ids[len(prefix) : 2 * len(prefix)] == prefix:
            ids = ids[len(prefix) :]
        return self._with_reward_token(ids)

    def ids_sequence(self, ids: Sequence[int]) -> tuple[np.ndarray, bool, bool]:
        """(tokens, reward token added, truncated) of a client's token ids, taken as they are
        (no BOS added) once every id is checked to be in the vocabulary."""
        vocab = self.config.model.vocab_size
        outside = np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= vocab)]
        if outside.size:
            raise UserError(
                f"token id {int(outside[0])} is outside the model's vocabulary (0..{vocab - 1})"
            )
        return self._with_reward_token(list(ids))

    def _with_reward_token(self, ids: list[int]) -> tuple[np.ndarray, bool, bool]:
        """The reward token appended unless `ids` end with it. A sequence longer than
        `data.max_length` loses its start, after the special prefix when it begins with one (the
        end is where the reward is read)."""
        added = not ids or ids[-1] != self.template.reward_id
        if added:
            ids = [*ids, self.template.reward_id]
        prefix = self.template.special_prefix
        keep = len(prefix) if prefix and ids[: len(prefix)] == prefix else 0
        truncated = len(ids) > self.max_length
        if truncated:
            ids = ids[:keep] + ids[len(ids) - (self.max_length - keep) :]
        return np.asarray(ids, np.int32), added, truncated


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
    out = storage.absolute(out)
    if storage.exists(out):
        raise UserError(f"{out} already exists; choose a new --out")
    rows, bar = 0, None
    with staged_file(out) as staging, staging.open("w", encoding="utf-8") as f:
        check = scorer.check_process_row if scorer.objective == "prm" else scorer.check_score_row
        for chunk in chunks(read_rows(data), CHUNK_ROWS):
            checked = [check(row, where) for where, row in chunk]
            bar = bar or tqdm(desc="scoring", total=0, unit="seq", dynamic_ncols=True)
            bar.total += len(checked)
            for scored in _scored_rows(scorer, checked, bar):
                f.write(json.dumps(scored, ensure_ascii=False, default=_plain) + "\n")
            rows += len(checked)
        if bar is not None:
            bar.close()
        if rows == 0:
            raise UserError(f"{data}: no rows to score")
    return {"rows": rows, "out": str(out), **scorer.counts.summary()}


def _scored_rows(scorer: Scorer, checked: list[dict], bar: tqdm) -> list[dict]:
    """Checked rows with their `reward`; a process-reward model's also with every step's reward
    (`step_rewards`) and the last one's (`reward_last`), `reward` being the lowest."""
    if scorer.objective != "prm":
        scores = scorer.scores([scorer.score_sequence(row) for row in checked], bar)
        rewards = scorer.reward_of(scores)
        scored = [{**row, "reward": float(r)} for row, r in zip(checked, rewards, strict=True)]
        if scorer.attributes:
            for row, values in zip(scored, scores, strict=True):
                row["scores"] = scorer.named(values)
        return scored
    steps = scorer.step_rewards([scorer.process_sequence(row) for row in checked], bar)
    return [{**row, **process_rewards(s)} for row, s in zip(checked, steps, strict=True)]


def process_rewards(step_rewards: np.ndarray) -> dict[str, Any]:
    """A solution's rewards from its steps': all of them, the lowest (a solution is as good as
    its worst step) and the last."""
    return {
        "step_rewards": [float(r) for r in step_rewards],
        "reward": float(step_rewards.min()),
        "reward_last": float(step_rewards[-1]),
    }


def reward_statistics(scorer: Scorer, data: str) -> dict[str, float]:
    """Mean and standard deviation (n - 1, as torch and OpenRLHF compute it) of the rewards of
    the scoring rows of `data`, and how many rows there were."""
    rows = [scorer.check_score_row(row, where) for where, row in read_rows(data)]
    if len(rows) < 2:
        raise UserError(f"{data}: need at least 2 scoring rows to calibrate, got {len(rows)}")
    rewards = scorer.rewards([scorer.score_sequence(row) for row in rows]).astype(np.float64)
    return {"mean": float(rewards.mean()), "std": float(rewards.std(ddof=1)), "rows": len(rows)}


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
