"""Power laws of loss against training compute and model size over your own runs (as in POLAR).

    jaxrm scaling fit runs/s1 runs/s2 runs/s3 runs/s4 --out scaling.png

Each RUN_DIR is an output_dir of `jaxrm train` and gives one point (N, C, L):
- L: the metric (default eval/loss) at the last line of `metrics.jsonl` that has it.
- N: non-embedding parameters, as Kaplan et al. count them: every parameter of the model minus
  the embedding table and minus an untied LM head; LoRA adapters are not counted.
- C: training FLOPs, `flops` of the last train line at or before L's step: what the run logged
  as done so far, counted as in jaxrm/flops.py (matmuls, and the attention pairs its packed
  sequences actually attend).
`fit_power_law` fits L = a·X^b by least squares on log L = log a + b·log X; R² is that
regression's, in log space.
"""

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrm import storage
from jaxrm.errors import UserError


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L = a·X^b, fitted over n points with coefficient of determination r2 (in log space)."""

    a: float
    b: float
    r2: float
    n: int

    def equation(self, x: str = "X") -> str:
        return f"L = {self.a:#.4g} · {x}^{self.b:#.3g}  (R² {self.r2:.3f}, {self.n} runs)"

    def __str__(self) -> str:
        return self.equation()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.power(x, self.b)


@dataclasses.dataclass(frozen=True)
class RunPoint:
    """One run's point: `value` of `metric` at `step`, `params` (N) and `flops` (C)."""

    run: str
    metric: str
    step: int
    value: float
    params: int
    flops: float


def fit_power_law(x: Sequence[float], y: Sequence[float], variable: str = "x") -> PowerLaw:
    """Least-squares fit of log y = log a + b·log x over positive x, y (`variable` names x)."""
    log_x, log_y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    distinct = len(set(log_x.tolist()))
    if distinct < 2:
        raise UserError(
            f"fitting L against {variable} needs at least 2 runs with distinct {variable}; "
            f"got {len(log_x)} run(s) with {distinct} distinct {variable}"
        )
    b, log_a = np.polyfit(log_x, log_y, 1)
    residual = np.sum((log_y - (log_a + b * log_x)) ** 2)
    total = np.sum((log_y - log_y.mean()) ** 2)
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return PowerLaw(a=float(np.exp(log_a)), b=float(b), r2=float(r2), n=len(log_x))


def run_point(run_dir: str | Path, metric: str = "eval/loss") -> RunPoint:
    """N, C and L (see the module docstring) of the run written to `run_dir`."""
    from jaxrm.config import load_config
    from jaxrm.model.decoder import count_params
    from jaxrm.train.metrics import read_metrics

    if not storage.is_dir(run_dir):
        raise UserError(f"{run_dir} is not a directory")
    records = read_metrics(run_dir)
    config = load_config(storage.local(storage.join(run_dir, "config.yaml")))
    at = next((r for r in reversed(records) if metric in r), None)
    if at is None:
        raise UserError(f"{run_dir}: no line of metrics.jsonl has {metric}")
    value, step = at[metric], int(at["step"])
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{run_dir}: {metric} at step {step} is {value}; a power law needs L > 0")
    trained = next((r for r in reversed(records) if "flops" in r and r["step"] <= step), None)
    if trained is None or not trained["flops"] > 0:
        raise UserError(
            f"{run_dir}: metrics.jsonl has no train line with `flops` at or before step "
            f"{step}; C is the training FLOPs a run logs"
        )
    model = dataclasses.replace(config.model, lora_rank=0)
    embedding = model.vocab_size * model.hidden_size
    untied_lm_head = model.lm_head and not model.tie_embeddings
    params = count_params(model) - embedding * (2 if untied_lm_head else 1)
    return RunPoint(str(run_dir), metric, step, value, params, trained["flops"])


def fit_runs(points: Sequence[RunPoint]) -> dict[str, PowerLaw]:
    """The fits of L against C ("C") and against N ("N"); a variable that has one value over all
    runs (a compute sweep of one model size) is left out."""
    values = [p.value for p in points]
    x = {"C": [p.flops for p in points], "N": [float(p.params) for p in points]}
    fits = {name: fit_power_law(v, values, name) for name, v in x.items() if len(set(v)) > 1}
    if not fits:
        fit_power_law(x["C"], values, "C")  # raises, naming what is missing
    return fits


def plot_fits(
    points: Sequence[RunPoint], fits: dict[str, PowerLaw], out: storage.PathLike
) -> storage.PathLike:
    """Writes one PNG with two log-log panels, L against C and against N, with the fitted lines."""
    # Figure without pyplot renders PNGs with Agg and switches no backend under a notebook.
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatterSciNotation

    figure = Figure(figsize=(11, 4.5), layout="tight")
    labels = {"C": "training FLOPs C", "N": "non-embedding parameters N"}
    for axes, (name, label) in zip(figure.subplots(1, 2), labels.items(), strict=True):
        x = np.array([p.flops if name == "C" else p.params for p in points], float)
        y = [p.value for p in points]
        axes.scatter(x, y, zorder=3)
        for xi, yi, p in zip(x, y, points, strict=True):
            axes.annotate(storage.name(p.run), (xi, yi), xytext=(4, 4), textcoords="offset points")
        if name in fits:
            line = np.geomspace(x.min(), x.max(), 50)
            axes.plot(line, fits[name](line), color="C1", label=fits[name].equation(name))
            axes.legend()
        axes.set(xscale="log", yscale="log", xlabel=label, ylabel=points[0].metric)
        # Minor tick labels only where no power of ten is in view: more of them overlap.
        axes.xaxis.set_minor_formatter(LogFormatterSciNotation(minor_thresholds=(0, 0.5)))
        axes.grid(alpha=0.3, which="both")
    with storage.staged_file(out) as staging:
        figure.savefig(staging, dpi=100, format="png")
    return out


def format_table(points: Sequence[RunPoint]) -> str:
    width = max(len("run"), *(len(p.run) for p in points))
    lines = [f"{'run':<{width}}  {'N':>10}  {'C':>10}  {'step':>7}  {points[0].metric}"]
    lines += [
        f"{p.run:<{width}}  {p.params:>10.3e}  {p.flops:>10.3e}  {p.step:>7}  {p.value:.4f}"
        for p in points
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `jaxrm scaling fit RUN_DIR... [--metric NAME] [--out PNG] [--json]`."""
    scaling = commands.add_parser(
        "scaling",
        help="scaling laws over several runs",
        description="Scaling analysis of your own training runs.",
    )
    scaling_commands = scaling.add_subparsers(
        dest="scaling_command", required=True, metavar="COMMAND"
    )
    fit = scaling_commands.add_parser(
        "fit",
        help="fit L = a·C^b and L = a·N^b over runs and plot them",
        description="Fit the power laws L = a·C^b (C: training FLOPs) and L = a·N^b (N: "
        "non-embedding parameters) over two or more run directories by least squares in log "
        "space; print each run's N, C and L and the fits with R², and write a log-log plot.",
    )
    fit.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a jaxrm run")
    fit.add_argument(
        "--metric",
        default="eval/loss",
        help="L: the metric taken at its last logged step (default eval/loss)",
    )
    fit.add_argument(
        "--out",
        default="scaling.png",
        metavar="PNG",
        help="the plot to write (default scaling.png)",
    )
    fit.add_argument("--json", action="store_true", help="print the runs and fits as JSON")
    fit.set_defaults(run=cmd_fit)


def cmd_fit(args: argparse.Namespace) -> None:
    points = [run_point(run_dir, args.metric) for run_dir in args.run_dirs]
    fits = fit_runs(points)
    plot = plot_fits(points, fits, args.out)
    if args.json:
        report = {
            "runs": [dataclasses.asdict(p) for p in points],
            "fits": {name: dataclasses.asdict(fit) for name, fit in fits.items()},
            "plot": str(plot),
        }
        print(json.dumps(report, indent=2))
        return
    print(format_table(points))
    print()
    for name in ("C", "N"):
        print(
            fits[name].equation(name)
            if name in fits
            else f"{name}: one value in all runs; not fitted"
        )
    print(f"plot: {plot}")
