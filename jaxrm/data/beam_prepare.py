"""`jaxrm data prepare --runner beam`: the single-process prepare as an Apache Beam pipeline.

    prepare_with_beam(config, "data/train.jsonl", "data/prepared")     # 2 local worker processes
    prepare_with_beam(config, "gs://b/rows/*.jsonl", "gs://b/prepared", runner="DataflowRunner",
                      pipeline_args=["--project=P", "--region=R", "--temp_location=gs://b/tmp"])

It writes what `data/prepare.py` writes, record for record: the rows are cut by index into chunks
of CHUNK_ROWS that the workers template in parallel; the examples each chunk kept give the number
of its first example, so shard k holds examples k·S to (k+1)·S - 1 (S = shard size) in row order,
as the single-process prepare writes them, and the manifest is the same (the runner is not
recorded: the data does not depend on it).

    row chunks -> template -> totals (one element: each chunk's first example, the counts)
               -> cut into shard parts -> group by shard -> write shards -> count -> manifest

`runner="beam"` is Beam's FnApiRunner, the engine its DirectRunner runs batch pipelines on, in
worker processes of this machine (DIRECT_DEFAULTS; the --direct_* options change them). It is
named directly because the DirectRunner of Beam 2.78 first tries its Prism runner, a program it
downloads; `--runner DirectRunner` still does that.

The last step writes the manifest once every shard is written: a reader that finds it finds every
shard. A local --out is filled in a staging directory beside it and renamed into place, so its
workers must share this machine's disk (LOCAL_RUNNERS); a bucket --out is written by the workers
themselves and removed again if the pipeline fails. A runner whose workers run elsewhere
(Dataflow) needs bucket paths for the rows, the tokenizer and --out, and jaxrm installed on its
workers (--setup_file, --requirements_file or --sdk_container_image). Rows are numbered as the
single-process prepare numbers them: this process and each worker open the rows with RowSource
(for JSONL, one pass over the files to find their lines), which suits data that one machine can
read through in a few minutes, not a corpus only a fleet can.

With data.skip_bad_rows, bad rows are counted in the manifest as the single-process prepare
counts them. Without it, the first bad row a worker meets stops the pipeline with that row's
one-line error (file and line); when several rows are bad, chunks are templated in parallel and
the one named may be another than the single-process prepare names (the first in the file).
"""

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxrm import storage
from jaxrm.config import Config
from jaxrm.data.pipeline import (
    RowSource,
    Skipped,
    ToExample,
    encode_example,
    read_manifest,
    template_spec,
)
from jaxrm.data.prepare import (
    example_tokens,
    make_manifest,
    open_shard,
    shard_name,
    write_manifest,
)
from jaxrm.errors import UserError

# Rows one worker templates at a time: small enough to spread a few thousand rows over the
# workers, large enough that Beam's cost per element is lost in the tokeniser's.
CHUNK_ROWS = 500
# The FnApiRunner's defaults here: worker processes (its own default is one thread, in this
# process); options given on the command line come after these and win.
DIRECT_DEFAULTS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")
# Runners whose workers are processes of this machine, which can fill a local staging directory.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")
# A UserError raised in a worker reaches this process only as text inside Beam's error (a
# traceback, quoted in whatever way the runner quotes): its message travels hex-encoded.
USER_ERROR_TAG = "jaxrm-user-error:"
TAGGED_USER_ERROR = re.compile(re.escape(USER_ERROR_TAG) + r"([0-9a-f]+)")


def prepare_with_beam(
    config: Config,
    spec: str | Sequence[str],
    out: str | Path,
    *,
    runner: str = "beam",
    pipeline_args: Sequence[str] = (),
    shard_size: int = 100_000,
) -> dict[str, Any]:
    """Writes what `prepare` writes with a Beam pipeline; returns the manifest. `runner`: "beam"
    (the FnApiRunner in DIRECT_DEFAULTS' worker processes) or a Beam runner's name;
    `pipeline_args` go to Beam's PipelineOptions unchanged."""
    runner = "FnApiRunner" if runner == "beam" else runner
    with beam_log() as log:
        beam = import_beam()
        options = pipeline_options(runner, pipeline_args)
        out = storage.require_new_dir(out, "output directory")
        if not storage.is_remote(out) and runner.rsplit(".", 1)[-1] not in LOCAL_RUNNERS:
            raise UserError(
                f"--runner {runner}: its workers may run on other machines, which cannot write "
                f"to the local directory {out}; give a bucket path (gs://...) as --out"
            )
        rows = len(RowSource(spec, config.data.tfds_data_dir))
        template_spec(config)  # a missing tokenizer is named here, not by every worker
        try:
            if storage.is_remote(out):
                try:
                    run_pipeline(beam, options, config, spec, rows, shard_size, str(out))
                except BaseException:
                    storage.remove(out)
                    raise
            else:
                with storage.staged_directory(out) as staging:
                    run_pipeline(beam, options, config, spec, rows, shard_size, str(staging))
        except UserError:
            raise
        except Exception as e:
            tagged = TAGGED_USER_ERROR.search(str(e))
            if tagged:
                raise UserError(bytes.fromhex(tagged[1]).decode()) from None
            e.add_note(f"Beam's log: {log.keep()}")
            raise
    return read_manifest(str(out))


def import_beam() -> Any:
    try:
        import apache_beam
    except ImportError:
        raise UserError(
            "--runner beam needs Apache Beam, which is not installed: pip install 'jaxrm[beam]'"
        ) from None
    return apache_beam


def pipeline_options(runner: str, args: Sequence[str]) -> Any:
    """Beam's PipelineOptions of `args` after the defaults; a value Beam cannot parse, an option
    it does not know and a runner it cannot make are one-line errors."""
    import argparse

    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import create_runner

    flags = [*DIRECT_DEFAULTS, f"--runner={runner}", *args]
    parsers: list[argparse.ArgumentParser] = []

    def raise_instead_of_exiting(parser: argparse.ArgumentParser) -> None:
        parser.exit_on_error = False  # argparse would print its usage and exit
        parsers.append(parser)

    options = PipelineOptions(flags)
    try:
        options.get_all_options(add_extra_args_fn=raise_instead_of_exiting)
    except argparse.ArgumentError as e:
        raise UserError(f"Beam pipeline options: {e}") from None
    unknown = [flag for flag in parsers[0].parse_known_args(flags)[1] if flag.startswith("-")]
    if unknown:
        raise UserError(f"not a Beam pipeline option: {' '.join(unknown)}")
    try:
        create_runner(runner)
    except (ValueError, ImportError) as e:
        raise UserError(f"--runner {runner}: {e}") from None
    return options


def run_pipeline(
    beam: Any,
    options: Any,
    config: Config,
    spec: str | Sequence[str],
    rows: int,
    shard_size: int,
    directory: str,
) -> None:
    """Templates `rows` rows of `spec` into shards and a manifest in `directory`."""
    from apache_beam.runners.runner import PipelineState

    pipeline = beam.Pipeline(options=options)
    templated = (
        pipeline
        | "Row chunks" >> beam.Create(row_chunks(rows))
        | "Spread chunks" >> beam.Reshuffle()
        | "Template" >> beam.Map(TemplateChunk(config, spec))
    )
    totals = beam.pvalue.AsSingleton(
        templated
        | "Chunk counts" >> beam.Map(chunk_counts)
        | "All chunk counts" >> beam.combiners.ToList()
        | "Totals" >> beam.Map(add_up)
    )
    (
        templated
        | "Cut into shards" >> beam.FlatMap(shard_parts, totals, shard_size)
        | "Group by shard" >> beam.GroupByKey()
        | "Write shards" >> beam.Map(write_shard, directory, totals, shard_size)
        | "Count shards" >> beam.combiners.Count.Globally()
        | "Write manifest" >> beam.Map(write_last, directory, totals, shard_size, config, spec)
    )
    result = pipeline.run()
    result.wait_until_finish()
    if result.state != PipelineState.DONE:
        raise UserError(f"the Beam pipeline ended {result.state}; nothing was prepared")


def row_chunks(rows: int) -> list[tuple[int, int]]:
    """(first row, end) of each chunk of CHUNK_ROWS rows."""
    return [(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]


class TemplateChunk:
    """A chunk's (first row, end) -> (first row, its encoded examples, its skipped rows, its
    tokens). Runs in the workers; each opens the rows and builds the template once."""

    def __init__(self, config: Config, spec: str | Sequence[str]):
        self.config = config
        self.spec = spec
        self._rows: RowSource | None = None
        self._to_example: ToExample | None = None

    def __call__(self, chunk: tuple[int, int]) -> tuple[int, list[bytes], int, int]:
        start, end = chunk
        with user_errors_tagged():
            if self._rows is None or self._to_example is None:
                data = self.config.data
                self._rows = RowSource(self.spec, data.tfds_data_dir)
                template = template_spec(self.config)
                self._to_example = ToExample(template, data.skip_bad_rows, data.max_candidates)
            records, skipped, tokens = [], 0, 0
            for index in range(start, end):
                item = self._to_example(self._rows[index])
                if isinstance(item, Skipped):
                    skipped += 1
                    continue
                records.append(encode_example(item))
                tokens += example_tokens(item)
            return start, records, skipped, tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None, "_to_example": None}


def chunk_counts(chunk: tuple[int, list[bytes], int, int]) -> tuple[int, int, int, int]:
    start, records, skipped, tokens = chunk
    return start, len(records), skipped, tokens


def add_up(counts: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """Each chunk's first example (the examples of the chunks before it) and the counts."""
    first_example, examples, skipped, tokens = {}, 0, 0, 0
    for start, kept, chunk_skipped, chunk_tokens in sorted(counts):
        first_example[start] = examples
        examples += kept
        skipped += chunk_skipped
        tokens += chunk_tokens
    counts_ = {"examples": examples, "skipped_rows": skipped, "tokens": tokens}
    return {"first_example": first_example, "counts": counts_}


def shard_parts(
    chunk: tuple[int, list[bytes], int, int], totals: dict[str, Any], shard_size: int
) -> Iterator[tuple[int, tuple[int, list[bytes]]]]:
    """(shard, (first example, records)) for each shard a chunk's examples fall in."""
    start, records = chunk[0], chunk[1]
    first = totals["first_example"][start]
    taken = 0
    while taken < len(records):
        shard, example = divmod(first + taken, shard_size)
        part = records[taken : taken + shard_size - example]
        yield shard, (first + taken, part)
        taken += len(part)


def write_shard(
    grouped: tuple[int, Iterable[tuple[int, list[bytes]]]],
    directory: str,
    totals: dict[str, Any],
    shard_size: int,
) -> str:
    """Writes one shard's examples, its parts in order; returns its name."""
    shard, parts = grouped
    name = shard_name(shard, shard_count(totals, shard_size))
    with user_errors_tagged(), storage.staged_file(storage.join(directory, name)) as path:
        writer = open_shard(path)
        for _, records in sorted(parts):
            for record in records:
                writer.write(record)
        writer.close()
    return name


def write_last(
    written: int,
    directory: str,
    totals: dict[str, Any],
    shard_size: int,
    config: Config,
    spec: str | Sequence[str],
) -> None:
    """The manifest, once all `written` shards are."""
    count = shard_count(totals, shard_size)
    if written != count:
        raise RuntimeError(f"{written} shards were written of {count}")
    names = [shard_name(i, count) for i in range(count)]
    with user_errors_tagged():
        write_manifest(directory, make_manifest(config, spec, names, totals["counts"]))


def shard_count(totals: dict[str, Any], shard_size: int) -> int:
    return math.ceil(totals["counts"]["examples"] / shard_size)


@contextlib.contextmanager
def user_errors_tagged() -> Iterator[None]:
    """A UserError raised in a worker, tagged so that this process can find it in Beam's text."""
    try:
        yield
    except UserError as e:
        raise RuntimeError(f"{e} [{USER_ERROR_TAG}{str(e).encode().hex()}]") from None


class BeamLog:
    """Where Beam's output goes while it runs; kept only when asked (for a failure to read)."""

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(prefix="jaxrm-beam-", suffix=".log")
        os.close(handle)
        self.path = Path(name)
        self.kept = False

    def keep(self) -> Path:
        self.kept = True
        return self.path


@contextlib.contextmanager
def beam_log() -> Iterator[BeamLog]:
    """Sends this process's standard error, and so that of the workers it starts, to a log file.

    Beam logs at import and as its local workers start, and a worker prints the traceback of
    every failure to the standard error it inherits: a user who made a mistake is to see one
    line, and someone who finds a bug in jaxrm the log (its path is added to the error)."""
    log = BeamLog()
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log.path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if not log.kept:
            log.path.unlink(missing_ok=True)
