"""The per-host Grain pipeline: rows -> checked -> templated -> packed rows -> host batches.

    batches = train_batches(config, tokenizer)          # endless, shuffled anew each epoch
    batch = next(batches)                               # dict of [rows per host, ...] numpy
    state = batches.get_state()                         # store with the checkpoint ...
    batches.set_state(state)                            # ... and resume exactly there

The shuffle is one global permutation per epoch (seeded by `train.seed`). Row `j` of every global
batch of R = `train.batch_size` rows is packed from its own stream: examples j, j + R, j + 2R, ...
of that order, packed by first-fit decreasing over windows of `pack_window` examples. A host reads
only the streams of its rows (host i of n: rows i·R/n to (i+1)·R/n - 1), so hosts see disjoint
examples that together cover the data, and a global batch is the same on any number of hosts: a
run on a pod equals the same run on one host. With `data.num_workers` W > 0, worker process k
reads, templates and packs streams k, k + W, ... of this host, and this process puts their rows
back in order, so the batches are the same for any W (at most one worker per stream is used);
with W = 0 threads of this process do it all. The iterator state is, per stream, the position of
its current window plus the rows already taken from it, so a restored iterator yields exactly the
batches an uninterrupted one would.

A malformed row stops the run with its file, line and field, unless `data.skip_bad_rows`: then it
is counted, each batch reports the rows skipped since the previous one in `bad_rows`, and their
messages travel with the batch (from the workers too) to `take_skipped()` of the iterator. Once
every row of an epoch was bad, the iterator stops with one line saying so.
"""

import collections
import dataclasses
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from jaxrm import storage
from jaxrm.config import Config
from jaxrm.data.packing import empty_row, pack
from jaxrm.data.rows import BadRow, check_row, count_kinds, describe_bad_row
from jaxrm.data.sources import open_source
from jaxrm.data.templates import Example, Template, regression_target
from jaxrm.data.tokenizer import load_tokenizer
from jaxrm.errors import UserError

# Examples packed together over a batch's streams (at least MIN_STREAM_WINDOW per stream): larger
# windows pack tighter, and a restore replays more.
PACK_WINDOW = 1024
MIN_STREAM_WINDOW = 64
MANIFEST = "manifest.json"
# Keys of the rows and batches inside the pipeline, taken off before a batch leaves it: the
# messages of the rows skipped before a row, and (from a worker) whether all its streams ended.
SKIPPED = "skipped"
ENDED = "ended"
PREPARED_FORMAT = "jaxrm-examples/1"
# The settings a prepared (tokenised) dataset was made with; they must match the run's.
PROCESS_KEYS = ("step_separator", "max_steps")  # recorded for objective prm only
TEMPLATE_KEYS = (
    "objective",
    "tokenizer_sha256",
    "max_length",
    "max_response_length",
    "wrapper",
    "separator",
    "reward_marker",
    "reward_token",
)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A malformed row that `data.skip_bad_rows` lets the run step over (and count)."""

    message: str


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """Everything needed to rebuild the template in a worker process."""

    tokenizer: str
    objective: str
    max_length: int
    max_response_length: int
    wrapper: str
    separator: str
    reward_marker: str | int
    reward_token: str | int | None
    step_separator: str = "\n"
    max_steps: int = 16
    attributes: tuple[str, ...] = ()  # a multi-attribute regression head's, in order

    def build(self) -> Template:
        settings = dataclasses.asdict(self)
        settings.pop("attributes")
        tokenizer = load_tokenizer(settings.pop("tokenizer"))
        return Template(tokenizer, settings.pop("objective"), **settings)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a prepared dataset records, with the tokenizer by content."""
        settings = dataclasses.asdict(self)
        settings["tokenizer_sha256"] = _tokenizer_sha256(Path(settings.pop("tokenizer")))
        keys = TEMPLATE_KEYS + (PROCESS_KEYS if self.objective == "prm" else ())
        if self.attributes:  # recorded only then, so one-score sets keep their fingerprints
            keys += ("attributes",)
            settings["attributes"] = list(self.attributes)
        return {key: settings[key] for key in keys}


def template_spec(config: Config, tokenizer: str | Path | None = None) -> TemplateSpec:
    data = config.data
    path = tokenizer or data.tokenizer
    if path is None:
        raise UserError("no tokenizer: set data.tokenizer (a .model, tokenizer.json or directory)")
    reward_token = data.reward_token
    if reward_token is None:
        reward_token = config.model.reward_token_id
    return TemplateSpec(
        tokenizer=str(load_tokenizer(path).path),
        objective=config.objective,
        max_length=data.max_length,
        max_response_length=data.max_response_length,
        wrapper=data.wrapper,
        separator=data.separator,
        reward_marker=data.reward_marker,
        reward_token=reward_token,
        step_separator=data.step_separator,
        max_steps=data.max_steps,
        attributes=template_attributes(config),
    )


def template_attributes(config: Config) -> tuple[str, ...]:
    """The attributes regression rows are scored on: the head's, when it has several names."""
    return tuple(config.model.attributes) if config.objective == "regression" else ()


class ToExample:
    """(where, row) -> Example, or Skipped when bad rows may be skipped. Runs in workers."""

    def __init__(self, spec: TemplateSpec, skip_bad_rows: bool, max_candidates: int):
        self.spec = spec
        self.kind = spec.objective
        self.skip_bad_rows = skip_bad_rows
        self.max_candidates = max_candidates
        self._template: Template | None = None

    def __call__(self, item: tuple[str, Any]) -> Example | Skipped:
        where, row = item
        try:
            if isinstance(row, BadRow):
                raise row
            row = check_row(row, self.kind, where, self.spec.attributes)
            ranked = row.get("ranked") or []
            if len(ranked) > self.max_candidates:
                raise BadRow(
                    f"{where}: field 'ranked' holds {len(ranked)} responses, more than "
                    f"data.max_candidates ({self.max_candidates}); raise data.max_candidates"
                )
            if self._template is None:
                self._template = self.spec.build()
            return self._template(row)
        except BadRow as e:
            if not self.skip_bad_rows:
                raise
            return Skipped(str(e))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_template": None}


class RowSource:
    """A grain data source of (where, row); a row that cannot be parsed becomes its BadRow."""

    def __init__(self, spec: str | Sequence[str], tfds_data_dir: str | None):
        self.source = open_source(spec, tfds_data_dir)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        try:
            return self.source.read(index)
        except BadRow as e:
            return "", e


class PreparedSource:
    """Examples tokenised ahead of time by `jaxrm data prepare` (ArrayRecord shards)."""

    def __init__(self, directory: str, expected: dict[str, Any], max_candidates: int):
        from grain.sources import ArrayRecordDataSource

        manifest = read_manifest(directory)
        prepared_candidates = manifest["data"].get("max_candidates", 2)
        if prepared_candidates > max_candidates:
            raise UserError(
                f"{directory} was prepared with data.max_candidates {prepared_candidates}; "
                f"set data.max_candidates to at least that (it is {max_candidates})"
            )
        differing = [k for k in expected if manifest["template"].get(k) != expected[k]]
        if differing:
            details = ", ".join(
                f"{k}: {manifest['template'].get(k)!r} there, {expected.get(k)!r} here"
                for k in differing
            )
            raise UserError(
                f"{directory} was prepared with other settings ({details}); prepare it again"
            )
        self.records = ArrayRecordDataSource(
            [str(storage.join(directory, name)) for name in manifest["shards"]]
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        return decode_example(self.records[index])


def encode_example(example: Example) -> bytes:
    return json.dumps(
        {
            "sequences": [s.tolist() for s in example.sequences],
            "lm_mask": None if example.lm_mask is None else example.lm_mask.tolist(),
            "margin": example.margin,
            "target": _plain_target(example.target),
            **({} if example.reads is None else {"reads": example.reads.tolist()}),
            **({} if example.labels is None else {"labels": example.labels.tolist()}),
        },
        separators=(",", ":"),
    ).encode()


def decode_example(record: bytes) -> Example:
    data = json.loads(record)
    mask = data["lm_mask"]
    return Example(
        [np.asarray(s, np.int32) for s in data["sequences"]],
        None if mask is None else np.asarray(mask, np.int8),
        float(data["margin"]),
        regression_target(data.get("target", 0.0)),
        None if "reads" not in data else np.asarray(data["reads"], np.int32),
        None if "labels" not in data else np.asarray(data["labels"], np.float32),
    )


def _plain_target(target: float | np.ndarray) -> float | list:
    """JSON of a target: per attribute, null where not rated."""
    if isinstance(target, np.ndarray):
        return [None if np.isnan(v) else float(v) for v in target]
    return target


def read_manifest(directory: str) -> dict[str, Any]:
    path = storage.join(directory, MANIFEST)
    try:
        manifest = json.loads(storage.read_text_file(path))
    except (UserError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable jaxrm data manifest ({e})") from None
    if manifest.get("format") != PREPARED_FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r} is not {PREPARED_FORMAT!r}")
    return manifest


def is_prepared(spec: str | Sequence[str]) -> bool:
    return isinstance(spec, str) and storage.is_file(storage.join(spec, MANIFEST))


def examples_dataset(
    spec: str | Sequence[str], config: Config, template: TemplateSpec
) -> grain.MapDataset:
    """A random-access dataset of Examples (or Skipped rows), templated lazily on access."""
    if is_prepared(spec):
        prepared = PreparedSource(spec, template.fingerprint(), config.data.max_candidates)
        return grain.MapDataset.source(prepared)
    data = config.data
    rows = grain.MapDataset.source(RowSource(spec, data.tfds_data_dir))
    return rows.map(ToExample(template, data.skip_bad_rows, data.max_candidates))


def pack_window(config: Config) -> int:
    """Examples one row stream packs together: PACK_WINDOW shared by a batch's streams."""
    return max(MIN_STREAM_WINDOW, PACK_WINDOW // config.train.batch_size)


class PackIterDataset(grain.IterDataset):
    """Packs the Examples of its parent into rows, window by window (see the module doc)."""

    def __init__(self, parent: grain.IterDataset, config: Config):
        super().__init__(parent)
        self.config = config
        self.window = pack_window(config)

    def __iter__(self) -> "PackIterator":
        return PackIterator(self._parent.__iter__(), self)


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, packer: PackIterDataset):
        super().__init__(parent)
        self.config = packer.config
        self.window = packer.window
        self.window_start = parent.get_state()
        self.rows: list[dict[str, np.ndarray]] = []
        self.taken = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while self.taken == len(self.rows):
            self._pack_window()
        row = self.rows[self.taken]
        self.taken += 1
        return row

    def _pack_window(self) -> None:
        self.window_start = self._parent.get_state()
        examples, skipped = [], []
        for item in self._parent:
            if isinstance(item, Skipped):
                skipped.append(item.message)
            else:
                examples.append(item)
            if len(examples) + len(skipped) == self.window:
                break
        if not examples and not skipped:
            raise StopIteration
        rows = pack_rows(examples, self.config, self.config.data.shared_prefix)
        rows = [{**r, "bad_rows": np.int32(0)} for r in rows] or [padding_row(self.config)]
        rows[0]["bad_rows"] = np.int32(len(skipped))
        rows[0][SKIPPED] = tuple(skipped)
        self.rows, self.taken = rows, 0

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self.window_start, "taken": self.taken}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._pack_window()
        self.taken = state["taken"]


class StackRows(grain.IterDataset):
    """Batches whose row k comes from stream k; a stream that ends gives padding rows until the
    last one ends. Grain's worker processes call `set_slice`: worker k of W keeps streams k::W,
    and never ends on its own but marks its batches ENDED, so that all workers give as many."""

    def __init__(self, streams: Sequence[grain.IterDataset], config: Config):
        super().__init__(streams)
        self.config = config
        self.sliced = False

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self._parents = tuple(self._parents[sl])
        self.sliced = True

    def __iter__(self) -> "StackRowsIterator":
        streams = [stream.__iter__() for stream in self.parents]
        return StackRowsIterator(streams, self.config, self.sliced)


class StackRowsIterator(grain.DatasetIterator):
    def __init__(self, streams: list[grain.DatasetIterator], config: Config, sliced: bool):
        super().__init__(streams)
        self.padding = padding_row(config)
        self.ended = [False] * len(streams)
        self.sliced = sliced

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row(k) for k in range(len(self._parents))]
        if all(self.ended) and not self.sliced:
            raise StopIteration
        batch = {key: np.stack([row[key] for row in rows]) for key in self.padding}
        batch[SKIPPED] = np.empty(len(rows), object)
        for k, row in enumerate(rows):
            batch[SKIPPED][k] = row.get(SKIPPED, ())
        if self.sliced:
            batch[ENDED] = all(self.ended)
        return batch

    def _next_row(self, k: int) -> dict[str, np.ndarray]:
        if not self.ended[k]:
            try:
                return next(self._parents[k])
            except StopIteration:
                self.ended[k] = True
        return self.padding

    def get_state(self) -> dict[str, Any]:
        return {"streams": [s.get_state() for s in self._parents], "ended": self.ended}

    def set_state(self, state: dict[str, Any]) -> None:
        for stream, stream_state in zip(self._parents, state["streams"], strict=True):
            stream.set_state(stream_state)
        self.ended = list(state["ended"])


ROWS = "rows"  # the data state's record of the global batch rows it feeds


class HostBatches(grain.IterDataset):
    """The batches of StackRows (put back together from the workers' parts), with the skipped
    rows' messages taken off; stops with one line once every row of an epoch was bad."""

    def __init__(
        self,
        parent: grain.IterDataset,
        workers: int,
        spec: str | Sequence[str],
        rows: range,
        size: int,
        total: int,
    ):
        super().__init__(parent)
        self.workers = workers
        self.spec = spec
        self.rows = rows
        # Stream j reads examples j, j + total, ...: the first len(range(j, size, total)) of them
        # are its share of an epoch.
        self.epoch_share = np.asarray([len(range(j, size, total)) for j in rows])

    def __iter__(self) -> "HostBatchesIterator":
        return HostBatchesIterator(self._parent.__iter__(), self)


class HostBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batches: HostBatches):
        super().__init__(parent)
        self.workers, self.spec = batches.workers, batches.spec
        self.epoch_share = batches.epoch_share
        self.rows = [batches.rows.start, batches.rows.stop]
        # Worker k's part holds streams k, k + W, ...: the rows of the parts put back in order.
        streams = np.arange(len(self.epoch_share))
        parts = [streams[k :: self.workers] for k in range(self.workers)]
        self.order = np.argsort(np.concatenate(parts)) if self.workers > 1 else None
        self._restart()

    def _restart(self) -> None:
        self.skipped: list[str] = []
        self.some_good = False
        self.bad = np.zeros_like(self.epoch_share)
        self.bad_messages: set[str] = set()

    def __next__(self) -> dict[str, np.ndarray]:
        if self.workers <= 1:
            batch = next(self._parent)
        else:
            parts = [next(self._parent) for _ in range(self.workers)]
            if all([part.pop(ENDED) for part in parts]):
                raise StopIteration
            batch = {key: np.concatenate([p[key] for p in parts])[self.order] for key in parts[0]}
        messages = [message for row in batch.pop(SKIPPED) for message in row]
        self.skipped += messages
        if not self.some_good:
            self._stop_if_every_row_was_bad(batch, messages)
        return batch

    def _stop_if_every_row_was_bad(self, batch: dict[str, np.ndarray], messages: list[str]) -> None:
        if (batch["reward_index"][..., 0] >= 0).any():
            self.some_good, self.bad_messages = True, set()
            return
        self.bad += batch["bad_rows"]
        self.bad_messages.update(messages)
        if self.bad.any() and (self.bad >= self.epoch_share).all():
            kinds = collections.Counter(describe_bad_row(m)["kind"] for m in self.bad_messages)
            raise UserError(
                f"{self.spec}: every row was bad ({len(self.bad_messages)} rows: "
                f"{count_kinds(kinds)}); nothing to train on"
            )

    def take_skipped(self) -> list[str]:
        """The messages of the rows skipped since the last call, in the order read."""
        taken, self.skipped = self.skipped, []
        return taken

    def get_state(self) -> dict[str, Any]:
        """The streams' positions and which global batch rows they feed (`rows`: [start, stop],
        so that positions saved by hosts that shared rows regroup)."""
        return {**self._parent.get_state(), ROWS: self.rows}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state({key: value for key, value in state.items() if key != ROWS})
        self._restart()


def host_batches(
    dataset: grain.MapDataset,
    config: Config,
    rows: range,
    *,
    shuffle: bool,
    num_epochs: int | None,
    spec: str | Sequence[str],
) -> grain.IterDataset:
    """Batches of the global batch rows `rows`, each packed from its own stream; `spec` names
    the data in errors."""
    size = len(dataset)
    if shuffle:
        dataset = dataset.shuffle(seed=config.train.seed)
    dataset = dataset.repeat(num_epochs)
    total = config.train.batch_size
    # One reading thread per stream, a window ahead. Grain's default (16 threads and 500
    # examples per stream) templated up to 16 rows of each stream at once, each taking ~50x its
    # size while tokenised, and read no faster: the GIL is the limit.
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=pack_window(config))
    streams = [PackIterDataset(dataset[j::total].to_iter_dataset(read), config) for j in rows]
    batches: grain.IterDataset = StackRows(streams, config)
    workers = min(config.data.num_workers, len(rows))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; jaxrm has none
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers)
        batches = batches.mp_prefetch(options, worker_init_fn=ExitWithParent(os.getpid()))
    return HostBatches(batches, workers, spec, rows, size, total)


class ExitWithParent:
    """Run in each worker process as it starts (Grain's and `data prepare`'s): the worker exits
    once the process that started it is gone, so a killed trainer leaves no workers behind."""

    def __init__(self, parent: int):
        self.parent = parent

    def __call__(self, *worker: int) -> None:
        threading.Thread(target=self._exit_without_parent, daemon=True).start()

    def _exit_without_parent(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(0.5)
        os._exit(1)


def host_rows(config: Config, process_index: int, process_count: int) -> range:
    """The rows of each global batch that host `process_index` of `process_count` feeds."""
    total = config.train.batch_size
    if total % process_count:
        raise UserError(
            f"train.batch_size ({total}) must be a multiple of the number of hosts "
            f"({process_count})"
        )
    per_host = total // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


def _default_rows(config: Config, index: int | None, count: int | None) -> range:
    return host_rows(
        config,
        jax.process_index() if index is None else index,
        jax.process_count() if count is None else count,
    )


def train_batches(
    config: Config,
    tokenizer: str | Path | None = None,
    *,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: range | None = None,
) -> grain.DatasetIterator:
    """This host's endless (or `num_epochs`) stream of [rows per host, ...] training batches:
    global batch `rows`, by default its share as `host_rows` says."""
    if config.data.train is None:
        raise UserError("data.train is not set")
    if rows is None:
        rows = _default_rows(config, process_index, process_count)
    template = template_spec(config, tokenizer)
    dataset = examples_dataset(config.data.train, config, template)
    if len(dataset) == 0:
        raise UserError(f"data.train ({config.data.train}) holds no rows")
    batches = host_batches(
        dataset,
        config,
        rows,
        shuffle=config.data.shuffle,
        num_epochs=num_epochs,
        spec=config.data.train,
    )
    return iter(batches)


def eval_batches(
    config: Config,
    spec: str | Sequence[str],
    tokenizer: str | Path | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: range | None = None,
) -> list[dict[str, np.ndarray]]:
    """This host's rows of every evaluation batch (`rows`, by default as `host_rows` says), in
    order, the last ones padded with empty rows.

    Every host packs the whole evaluation set (it is small), so all hosts agree on the number of
    batches, which a collective evaluation step needs.
    """
    if rows is None:
        rows = _default_rows(config, process_index, process_count)
    template = template_spec(config, tokenizer)
    dataset = examples_dataset(spec, config, template)
    everything = range(config.train.batch_size)
    batches = host_batches(dataset, config, everything, shuffle=False, num_epochs=1, spec=spec)
    return [{k: v[rows.start : rows.stop] for k, v in batch.items()} for batch in batches]


def pack_rows(
    examples: list[Example], config: Config, shared_prefix: bool
) -> list[dict[str, np.ndarray]]:
    """`examples` packed into rows as the config says (with or without shared prefixes)."""
    data = config.data
    try:
        return pack(
            examples,
            data.seq_len,
            data.pairs_per_row,
            reads_per_example(config),
            shared_prefix,
            config.objective,
            len(template_attributes(config)),
        )
    except ValueError as e:
        raise UserError(
            f"{e}; data.seq_len must hold an example's sequences (up to data.max_candidates of "
            "data.max_length tokens each)"
        ) from None


def reads_per_example(config: Config) -> int:
    """The rewards read per example: one per ranked response, or per step (objective prm)."""
    data = config.data
    return data.max_steps if config.objective == "prm" else data.max_candidates


def padding_row(config: Config) -> dict[str, np.ndarray]:
    """A row with no tokens and no pairs, to fill a batch."""
    data = config.data
    row = empty_row(
        data.seq_len,
        data.pairs_per_row,
        reads_per_example(config),
        config.objective,
        len(template_attributes(config)),
    )
    return {**row, "bad_rows": np.int32(0)}


def _tokenizer_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256(path.read_bytes())
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()
