"""Capability salience on a sweep of tiny runs: does a salience-weighted validation loss predict
held-out checkpoints' downstream accuracy better than the mean loss?

Two runs of a shipped tiny config on its toy data (POLAR by default: configs/tiny_polar.yaml;
`--objective codepmp` for the CodePMP one, whose LM head adds a unit per LM-target token), one of
the tiny preset (hidden 64) and one smaller (hidden 32), save a checkpoint every `--every` steps.
`jaxrm salience collect` takes each checkpoint's unit losses on held-out validation rows and its
accuracy on other held-out rows (`jaxrm eval`, per category); then `jaxrm salience fit` fits, per
target (overall accuracy and each category's), the salience law and the mean-loss law on part of
the checkpoints and prints R² on the rest, two ways: every third checkpoint held out, and the
whole smaller run held out.

    python benchmarks/bench_salience.py                  # about 4 minutes on 2 CPU cores
    python benchmarks/bench_salience.py --steps 100 --every 25    # a quick check
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": [],
    "small": [
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_heads=2",
        "model.num_kv_heads=1",
    ],
}


def jaxrm(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "jaxrm", *args], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode:
        sys.exit(f"jaxrm {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", choices=("polar", "codepmp"), default="polar")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lr", type=float, help="optimizer.lr (default: the config's)")
    parser.add_argument("--floor", type=float, default=0.5, help="accuracy at chance")
    parser.add_argument("--out", help="directory to keep (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="salience-"))
    out.mkdir(parents=True, exist_ok=True)

    from jaxrm.data import toy

    make_rows = toy.polar_rows if args.objective == "polar" else toy.codepmp_rows
    for name, (count, seed) in {"val": (64, 11), "bench": (192, 12)}.items():
        rows = make_rows(count, seed=seed, held_out=True)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    for size, shape in SIZES.items():
        run = out / size
        runs.append(str(run))
        settings = [f"output_dir={run}", f"train.steps={args.steps}", "train.eval_every=0"]
        settings += [f"checkpoint.every={args.every}", "checkpoint.keep=1000", *shape]
        settings += [f"optimizer.lr={args.lr}"] if args.lr else []
        jaxrm("train", f"configs/tiny_{args.objective}.yaml", *settings)
    table = out / "table.jsonl"
    table.unlink(missing_ok=True)
    jaxrm(
        "salience",
        "collect",
        *runs,
        "--data",
        str(out / "val.jsonl"),
        "--eval",
        str(out / "bench.jsonl"),
        "--by",
        "category",
        "--out",
        str(table),
    )
    first = json.loads(table.read_text().splitlines()[0])
    targets = ["accuracy", *sorted(k for k in first["scores"] if k.startswith("accuracy/"))]
    print(
        f"{len(table.read_text().splitlines())} checkpoints, units: "
        f"{len(first['units']['rank'])} rank + {len(first['units'].get('lm', []))} lm\n"
    )
    print("| target | held out | R² salience | R² mean loss | l2 (by CV) | top-10 weight share |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        for label, held in (("every 3rd", []), ("run small", ["--held-out-run", runs[1]])):
            report = json.loads(
                jaxrm(
                    "salience",
                    "fit",
                    str(table),
                    "--target",
                    target,
                    "--floor",
                    str(args.floor),
                    *held,
                )
            )
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(
                f"| {target} | {label} | {fmt(report['salience']['r2_held_out'])} | "
                f"{fmt(report['mean_loss']['r2_held_out'])} | {report['salience']['l2']:g} | "
                f"{report['salience']['top_weight_share']:.3f} |"
            )


if __name__ == "__main__":
    main()
