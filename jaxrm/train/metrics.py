"""Training metrics: `metrics.jsonl`, TensorBoard events and PNG curves of a run.

    jaxrm plot runs/tiny_polar --out plots/

`metrics.jsonl` holds one JSON object per logged step, `{"step": 10, "loss": 0.69, ...}`; eval
metrics go on lines of their own with keys prefixed "eval/". A non-finite value (nan, inf) is
written as null, so every line is valid JSON for any reader (jq, pandas); TensorBoard keeps the
exact value, and `read_metrics` returns null as nan, which plots as a gap in the curve.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxrm import storage
from jaxrm.errors import UserError

METRICS_FILE = "metrics.jsonl"
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
    """Appends metrics to `run_dir/metrics.jsonl` and `run_dir/tensorboard/`; use on process 0 only.

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

        self._remote = str(run_dir) if storage.is_remote(run_dir) else None
        if self._remote:
            local_dir = Path(tempfile.mkdtemp(prefix="jaxrm-metrics-"))
            remote_metrics = storage.join(self._remote, METRICS_FILE)
            if storage.is_file(remote_metrics):
                storage.download(remote_metrics, local_dir / METRICS_FILE)
        else:
            local_dir = Path(run_dir)
            local_dir.mkdir(parents=True, exist_ok=True)
        self._local_dir = local_dir
        path = local_dir / METRICS_FILE
        if path.exists():
            _replace(path, [r for r in _records(path) if r["step"] <= resume_step])
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open until close())
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

    def close(self) -> None:
        self.sync()
        self._file.close()
        self._tensorboard.close()
        if self._remote:
            shutil.rmtree(self._local_dir, ignore_errors=True)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
