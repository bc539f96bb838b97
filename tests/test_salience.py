"""Capability salience: the fit finds planted salient units where the mean loss cannot, and the
unit losses `collect` writes add up to the training objective's own sums."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from data_helpers import write_jsonl

from jaxrm.checkpoint.items import save_model
from jaxrm.checkpoint.loading import load_model
from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data.pipeline import eval_batches
from jaxrm.errors import UserError
from jaxrm.model.decoder import create_model
from jaxrm.scoring.salience import (
    L2_GRID,
    Table,
    fit_report,
    fit_salience,
    held_out_mask,
    r_squared,
)
from jaxrm.train import losses

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy"
UNITS, SALIENT = 60, 12


def planted_checkpoints(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit losses of 20 checkpoints of each of two runs and a score that follows the first 12
    units only. The second run (another data mix) learns the other units 2.5 times faster, so
    its mean loss runs ahead of its score: the mean loss cannot serve both runs."""
    rng = np.random.default_rng(seed)
    rate, scale, base = (
        rng.uniform(0.3, 2, UNITS),
        rng.uniform(0.5, 2, UNITS),
        rng.uniform(0.5, 1.5, UNITS),
    )
    speed = np.ones((2, UNITS))
    speed[1, SALIENT:] = 2.5
    progress = np.linspace(0.1, 3, 20)
    curves = [scale * np.exp(-np.outer(progress, rate * s)) + base for s in speed]
    x = np.concatenate(curves) + rng.normal(0, 0.01, (40, UNITS))
    salient = x[:, :SALIENT].mean(axis=1)
    return x, 0.5 + 0.5 / (1 + np.exp(-5 * (salient.mean() - salient)))


def test_the_fit_recovers_planted_salient_units():
    x, y = planted_checkpoints()
    held_out = np.arange(len(y)) % 3 == 2
    law = fit_salience(x[~held_out], y[~held_out], floor=0.5)  # l2 by cross-validation
    mean_law = fit_salience(x[~held_out], y[~held_out], floor=0.5, uniform=True)
    r2, mean_r2 = (
        r_squared(law(x[held_out]), y[held_out]),
        r_squared(mean_law(x[held_out]), y[held_out]),
    )
    assert r2 >= 0.98 and mean_r2 < 0.9, (r2, mean_r2)
    assert law.weights[:SALIENT].sum() >= 0.8  # from 0.2 when uniform
    assert law.l2 in L2_GRID and mean_law.l2 is None
    np.testing.assert_allclose(mean_law.weights, 1 / UNITS)


def test_fit_reports_both_laws_on_held_out_runs(tmp_path, capsys):
    x, y = planted_checkpoints(seed=1)
    lines = [
        {
            "run": f"runs/{'a' if i < 20 else 'b'}",
            "step": i,
            "units": {"rank": list(v)},
            "scores": {"accuracy": s},
        }
        for i, (v, s) in enumerate(zip(x, y, strict=True))
    ]
    table_file = write_jsonl(tmp_path / "table.jsonl", lines)
    table = Table.read(str(table_file), "all")
    assert table.unit_names[:2] == ["rank:0", "rank:1"]
    capsys.readouterr()
    # Both runs must be in the fit: one run alone shows no unit apart from the others.
    assert main(["salience", "fit", str(table_file), "--floor", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoints"] == {"fit": 27, "held_out": 13}
    assert report["salience"]["r2_held_out"] > report["mean_loss"]["r2_held_out"] + 0.1
    assert all(int(u["unit"].split(":")[1]) < SALIENT for u in report["salience"]["top_units"][:5])
    with pytest.raises(UserError, match="--held-out-run runs/c: not a run"):
        held_out_mask(table, ["runs/c"], 3)
    with pytest.raises(UserError, match="no score 'bleu'"):
        fit_report(table, "bleu", held_out_mask(table, ["runs/b"], 3), floor=0.5, l2=1e-4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A run directory with two CodePMP checkpoints (random models with an LM head)."""
    run = tmp_path_factory.mktemp("salience") / "run"
    config = load_config(
        ROOT / "configs" / "tiny_codepmp.yaml", [f"output_dir={run}", "data.seq_len=256"]
    )
    model = create_model(config.model, seed=1)
    save_model(run / "checkpoints" / "10", model, config, TOY / "tokenizer.model")
    shutil.copytree(run / "checkpoints" / "10", run / "checkpoints" / "20")  # a run's 2nd save
    return run


def test_collected_unit_losses_add_up_to_the_training_objective(checkpoints, tmp_path, capsys):
    run = checkpoints
    rows = [json.loads(line) for line in (TOY / "codepmp_eval.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "val.jsonl", rows[:12])
    bench = write_jsonl(tmp_path / "bench.jsonl", rows[12:40])
    out = tmp_path / "table.jsonl"
    args = ["salience", "collect", str(run), "--data", str(data), "--eval", str(bench)]
    args += ["--compile-cache", str(tmp_path / "xla")]
    assert main([*args, "--by", "category", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20]
    assert any(key.startswith("accuracy/") for key in lines[0]["scores"])

    # The training objective on the same rows, packed as training packs them.
    settings = ["train.batch_size=1", "data.seq_len=2048", "data.pairs_per_row=16"]
    packed = load_config(run / "checkpoints" / "20" / "config" / "jaxrm.yaml", settings)
    model = load_model(run / "checkpoints" / "20").model
    sums = {"rank_loss": 0.0, "lm_loss": 0.0}
    for batch in eval_batches(packed, str(data), TOY / "tokenizer.model"):
        batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
        _, step_sums = losses.objective(model, batch, packed, losses.totals(batch))
        for key in sums:
            sums[key] += float(step_sums[key])
    units = lines[1]["units"]
    assert len(units["rank"]) == 12 and len(units["lm"]) == len(units["lm_rows"])
    assert sum(units["rank"]) == pytest.approx(sums["rank_loss"], rel=1e-4)
    assert sum(units["lm"]) == pytest.approx(sums["lm_loss"], rel=1e-4)
