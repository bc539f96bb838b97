"""Training metrics: `metrics.jsonl`, TensorBoard events and PNG curves of a run.

    jaxrm plot runs/tiny_polar --out plots/

`metrics.jsonl` holds one JSON object per logged step, `{"step": 10, "loss": 0.69, ...}`; eval
metrics go on lines of their own with keys prefixed "eval/". A non-finite value (nan, inf) is
written as null, so every line is valid JSON for any reader (jq, pandas); TensorBoard keeps the
exact value, and `read_metrics` returns null as nan, which plots as a gap in the curve.

`bad_rows.jsonl`, when `data.skip_bad_rows` skipped any, holds one object per skipped row:
`{"step", "file", "line" (or "row", "record", "example"), "kind", "error"}`, where the row was
read for step `step` or an earlier one, and `kind` is its error without the row's particulars.
"""

import argparse
import collections
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrm import storage
from jaxrm.data.rows import count_kinds, describe_bad_row
from jaxrm.errors import UserError

METRICS_FILE = "metrics.jsonl"
BAD_ROWS_FILE = "bad_rows.jsonl"
# The metrics `plot_run` draws when they are logged, each with its "eval/" twin on the same axes.
PLOTTED = (
    "loss",
    "accuracy",
    "lr",
    "reward_mean",
    "reward_std",
    "margin",
    "grad_norm",
    "tokens_per_sec",
    "mfu",
)


class MetricsLogger:
    """Appends metrics to `run_dir/metrics.jsonl` and `run_dir/tensorboard/`, and skipped rows to
    `run_dir/bad_rows.jsonl`; use on process 0 only.

    A run resumed from its checkpoint at `resume_step` drops what the interrupted process logged
    after that checkpoint, and a line it tore when killed, so the files read as one run.

    Object storage cannot append, and TensorBoard would upload its whole event file at every
    flush, so for a remote `run_dir` both files are written in a local directory and uploaded by
    `sync` (the train loop calls it with every checkpoint, at most every SYNC_SECONDS when
    logging, and at the end).
    """

    SYNC_SECONDS = 60.0

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        # Imported here, not at the top, so that the command line never pays for it:
        # tensorboardX imports torch whenever torch is installed.
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        self._remote = str(run_dir) if storage.is_remote(run_dir) else None
        if self._remote:
            local_dir = Path(tempfile.mkdtemp(prefix="jaxrm-metrics-"))
        else:
            local_dir = Path(run_dir)
            local_dir.mkdir(parents=True, exist_ok=True)
        self._local_dir = local_dir
        for name in (METRICS_FILE, BAD_ROWS_FILE):
            if self._remote and storage.is_file(storage.join(self._remote, name)):
                storage.download(storage.join(self._remote, name), local_dir / name)
            path = local_dir / name
            if path.exists():
                _replace(path, [r for r in _records(path) if r["step"] <= resume_step])
        self._file = open(local_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._bad_rows_file: Any = None  # opened at the first skipped row
        # TensorBoard hides the events of earlier files from purge_step on.
        self._tensorboard = SummaryWriter(
            str(local_dir / "tensorboard"), purge_step=resume_step + 1
        )
        self._synced = time.monotonic()

    def sync(self) -> None:
        """Uploads the files of a remote run directory (nothing to do for a local one)."""
        if self._remote is None:
            return
        self._file.flush()
        self._tensorboard.flush()
        storage.upload(self._local_dir, self._remote)
        self._synced = time.monotonic()

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Writes `{"step": step, prefix + name: value, ...}` as one line and as scalar events."""
        values = {prefix + name: float(value) for name, value in metrics.items()}
        finite = {name: value if math.isfinite(value) else None for name, value in values.items()}
        self._file.write(json.dumps({"step": int(step), **finite}) + "\n")
        self._file.flush()
        for tag, value in values.items():
            self._tensorboard.add_scalar(tag, value, int(step))
        if time.monotonic() - self._synced > self.SYNC_SECONDS:
            self.sync()

    def log_bad_rows(self, step: int, records: list[dict[str, Any]]) -> None:
        """Writes `{"step": step, **record}` for each skipped row of `records`."""
        if self._bad_rows_file is None:
            path = self._local_dir / BAD_ROWS_FILE
            self._bad_rows_file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._bad_rows_file.writelines(json.dumps({"step": int(step), **r}) + "\n" for r in records)
        self._bad_rows_file.flush()

    def close(self) -> None:
        self.sync()
        self._file.close()
        if self._bad_rows_file is not None:
            self._bad_rows_file.close()
        self._tensorboard.close()
        if self._remote:
            shutil.rmtree(self._local_dir, ignore_errors=True)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SkippedRows:
    """The rows `data.skip_bad_rows` skipped, on every host: written to `bad_rows.jsonl` by
    process 0's `logger` (the other hosts have none), and summed up at the end of the run."""

    def __init__(self, logger: MetricsLogger | None):
        self.logger = logger
        self.kinds: collections.Counter[str] = collections.Counter()
        self.files: collections.Counter[str] = collections.Counter()

    def write(self, step: int, messages: list[str]) -> None:
        """Records this host's `messages` (of rows read up to `step`) with every other host's;
        every host calls it at the same steps."""
        records = [describe_bad_row(m) for m in _gather(messages)]
        self.kinds.update(r["kind"] for r in records)
        self.files.update(r.get("file", "?") for r in records)
        if self.logger and records:
            self.logger.log_bad_rows(step, records)

    def summary(self) -> str | None:
        """On process 0 when rows were skipped, a line like "skipped 3 bad rows (2x field
        'chosen' is missing, 1x not valid JSON) in a.jsonl; see RUN/bad_rows.jsonl"."""
        if self.logger is None or not self.kinds:
            return None
        files = ", ".join(name for name, _ in self.files.most_common(3))
        if len(self.files) > 3:
            files += f" and {len(self.files) - 3} more files"
        return (
            f"skipped {self.kinds.total()} bad rows ({count_kinds(self.kinds)}) in {files}; "
            f"see {storage.join(self.logger.run_dir, BAD_ROWS_FILE)}"
        )


def _gather(messages: list[str]) -> list[str]:
    """Every host's `messages`, host by host; a collective when there are several hosts."""
    import jax

    if jax.process_count() == 1:
        return messages
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(messages).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(len(data)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    hosts = multihost_utils.process_allgather(padded)
    return [
        m for host, size in zip(hosts, sizes, strict=True) for m in json.loads(bytes(host[:size]))
    ]


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The records of `run_dir/metrics.jsonl` in file order, with null (non-finite) as nan."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.is_file(path):
        raise UserError(f"{path} does not exist; is {run_dir} a jaxrm run directory?")
    return [
        {name: math.nan if value is None else value for name, value in record.items()}
        for record in _records(path)
    ]


def _records(path: storage.PathLike) -> list[dict[str, Any]]:
    """The objects of a metrics file as written; a last line torn by a kill mid-write is left out."""
    lines = storage.read_text_file(path).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
    return records


def _replace(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrites `path` with `records`; a kill meanwhile leaves either the old or the new file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def plot_run(
    run_dir: storage.PathLike, out_dir: storage.PathLike | None = None
) -> list[storage.PathLike]:
    """Writes `NAME.png`, NAME against step, for each logged metric of PLOTTED (train and eval on
    the same axes) to `out_dir`, by default `run_dir/plots`; returns the paths written."""
    # Figure without pyplot renders PNGs with Agg and switches no backend under a notebook.
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{storage.join(run_dir, METRICS_FILE)} is empty; nothing to plot")
    out = storage.join(run_dir, "plots") if out_dir is None else out_dir
    written = []
    for name in PLOTTED:
        keys = [key for key in (name, f"eval/{name}") if any(key in r for r in records)]
        if not keys:
            continue
        figure = Figure(figsize=(7, 4), layout="tight")
        axes = figure.subplots()
        for key in keys:
            steps = [r["step"] for r in records if key in r]
            values = [r[key] for r in records if key in r]
            if key == name:
                axes.plot(steps, values, label="train")
            else:  # evals are sparse: mark each point
                axes.plot(steps, values, label="eval", marker="o", markersize=3)
        axes.set(xlabel="step", ylabel=name, title=f"{storage.name(run_dir)}: {name}")
        axes.grid(alpha=0.3)
        axes.legend()
        path = storage.join(out, f"{name}.png")
        with storage.staged_file(path) as staging:
            figure.savefig(staging, dpi=100, format="png")
        written.append(path)
    return written


# ----------------------------------------------------------------------------- command line


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `jaxrm plot RUN_DIR [--out DIR]`."""
    plot = commands.add_parser(
        "plot",
        help="draw a run's metrics against step as PNG files",
        description=f"Read RUN_DIR/{METRICS_FILE} and write one PNG per logged metric of "
        f"{', '.join(PLOTTED)} against step, train and eval on the same axes, then print the "
        "paths written.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (output_dir of a run)")
    plot.add_argument("--out", metavar="DIR", help="directory for the PNGs (default RUN_DIR/plots)")
    plot.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> None:
    for path in plot_run(args.run_dir, args.out):
        print(path)
