"""`jaxrm demo`: the whole flow on a CPU in a few minutes.

1. Write a toy POLAR dataset: six toy policies answer the same questions, each in its own style;
   a triple asks whether a candidate comes from the same policy as the reference.
2. Train the `tiny` preset with the POLAR objective, evaluating on held-out questions.
3. Export the checkpoint as a Hugging Face reward model.
4. When torch and transformers are installed, load the export and score held-out triples with
   both, showing the rewards agree.
"""

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxrm.config import Config, config_from_dict
from jaxrm.storage import require_new_dir

DEMO_CONFIG: dict[str, Any] = {
    "objective": "polar",
    "model": {"preset": "tiny", "dtype": "float32"},
    "data": {"seq_len": 512, "reward_token": "<|score|>"},
    "train": {"steps": 300, "batch_size": 8, "log_every": 10, "eval_every": 100},
    "optimizer": {"lr": 2e-3, "weight_decay": 0.01},
    "checkpoint": {"every": 100, "keep": 1},
}


def demo_config(out: Path, paths: dict[str, Path], steps: int, seed: int) -> Config:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["output_dir"] = str(out / "run")
    raw["data"].update(
        train=str(paths["polar_train"]),
        eval=str(paths["polar_eval"]),
        tokenizer=str(paths["tokenizer"]),
    )
    raw["train"].update(steps=steps, seed=seed)
    return config_from_dict(raw)


def run_demo(out: Path, steps: int, seed: int) -> dict[str, Any]:
    from jaxrm.checkpoint.loading import load_model
    from jaxrm.data.toy import write_toy_data
    from jaxrm.hf.convert import export_hf
    from jaxrm.train.loop import train
    from jaxrm.train.metrics import read_metrics

    out = require_new_dir(out, "demo directory")
    print(f"1/4 toy data and tokenizer -> {out / 'data'}")
    paths = write_toy_data(out / "data", seed=seed)
    config = demo_config(out, paths, steps, seed)

    print(f"2/4 training the tiny preset ({steps} steps, POLAR objective) -> {config.output_dir}")
    summary = train(config)
    evals = [m for m in read_metrics(Path(config.output_dir)) if "eval/accuracy" in m]
    before, after = evals[0]["eval/accuracy"], summary["eval/accuracy"]
    print(f"    held-out policy-discrimination accuracy: {before:.1%} untrained -> {after:.1%}")

    print(f"3/4 exporting to Hugging Face format -> {out / 'hf'}")
    loaded = load_model(config.output_dir)
    export_hf(loaded, out / "hf")

    print("4/4 scoring held-out triples with jaxrm and with transformers")
    difference = _compare_with_transformers(loaded, out / "hf", paths["polar_eval"])
    result = {
        "accuracy_before": before,
        "accuracy_after": after,
        "max_reward_difference": difference,
    }
    print(json.dumps(result))
    return result


def _compare_with_transformers(loaded: Any, hf_dir: Path, rows_path: Path) -> float | None:
    try:
        import torch
        import transformers
    except ImportError:
        print("    (torch / transformers not installed: skipped)")
        return None
    from jaxrm.data.pipeline import template_spec

    template = template_spec(loaded.config, loaded.tokenizer_dir).build()
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()[:8]]
    sequences = [s for row in rows for s in template(row).sequences]
    ours = [float(_reward(loaded.model, s)) for s in sequences]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir)
    with torch.no_grad():
        theirs = [float(hf(torch.tensor([s.tolist()])).logits[0, 0]) for s in sequences]
    difference = float(np.max(np.abs(np.array(ours) - np.array(theirs))))
    for i, (a, b) in enumerate(zip(ours[:4], theirs[:4], strict=True)):
        print(f"    sequence {i}: jaxrm {a:+.5f}  transformers {b:+.5f}")
    print(f"    largest difference over {len(sequences)} sequences: {difference:.2e}")
    return difference


def _reward(model: Any, tokens: np.ndarray) -> float:
    import jax.numpy as jnp

    ids = jnp.asarray(tokens)[None]
    segments = jnp.ones_like(ids)
    hidden = model(ids, segments, jnp.arange(ids.shape[1])[None])
    return model.token_rewards(hidden)[0, -1]


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.out), args.steps, args.seed)


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole flow on CPU in minutes: toy data, train, evaluate, export, compare",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default="jaxrm-demo", help="new directory for everything")
    demo.add_argument("--steps", type=int, default=DEMO_CONFIG["train"]["steps"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
