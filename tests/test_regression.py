"""Regression reward models (`objective: regression`): rows {prompt, response, score}, trained
with the squared error, judged by how their rewards correlate with held-out scores, and exported
as a one-label regression head that transformers runs to the same rewards."""

import json
import random

import jax
import numpy as np
import pytest
import torch
import transformers
from data_helpers import (
    WORDS,
    sentence,
    tiny_run,
    train_sentencepiece,
    trained_run,
    write_jsonl,
)
from scipy import stats

from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data.pipeline import decode_example, encode_example, train_batches
from jaxrm.data.rows import BadRow, check_row
from jaxrm.data.templates import Example
from jaxrm.model.decoder import create_model
from jaxrm.scoring.evaluate import regression_report
from jaxrm.scoring.scorer import Scorer
from jaxrm.sharding import make_mesh
from jaxrm.train.loop import train
from jaxrm.train.trainer import Trainer


def scored_rows(count: int, seed: int) -> list[dict]:
    """Responses whose score is how often they say "reward": something a tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [
            "reward" if rng.random() < 0.3 else rng.choice(WORDS[:16])
            for _ in range(rng.randint(3, 8))
        ]
        score = float(words.count("reward"))
        rows.append({"prompt": sentence(rng, 4), "response": " ".join(words), "score": score})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rows, held_out = scored_rows(400, seed=1), scored_rows(96, seed=2)
    directory = tmp_path_factory.mktemp("regression")
    return trained_run(directory, rows, held_out, "objective=regression", "train.steps=150")


@pytest.mark.slow
def test_a_trained_regression_model_ranks_held_out_rows_by_their_scores(trained, capsys):
    run, held_out, summary = trained
    assert summary["loss"] == summary["mse"] and summary["accuracy"] > 0.8
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(held_out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 96
    assert report["spearman"] >= 0.9, report
    assert report["accuracy"] >= 0.85 and report["mse"] < 0.5, report


@pytest.mark.slow
def test_the_export_gives_the_rewards_of_jaxrm_score_in_transformers(trained, tmp_path, capsys):
    run, held_out, _ = trained
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["num_labels"] == 1 and hf_config["problem_type"] == "regression"
    rows = [json.loads(line) for line in held_out.read_text().splitlines()[:12]]
    scoring = write_jsonl(
        tmp_path / "rows.jsonl", [{k: r[k] for k in ("prompt", "response")} for r in rows]
    )
    assert (
        main(["score", str(run), "--data", str(scoring), "--out", str(tmp_path / "s.jsonl")]) == 0
    )
    jaxrm_rewards = [
        json.loads(x)["reward"] for x in (tmp_path / "s.jsonl").read_text().splitlines()
    ]

    scorer = Scorer.open(run)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    model = model.float().eval()
    with torch.no_grad():
        hf_rewards = [
            float(model(torch.from_numpy(scorer.score_sequence(row)[None])).logits[0, 0])
            for row in rows
        ]
    np.testing.assert_allclose(hf_rewards, jaxrm_rewards, atol=1e-4, rtol=0)


def test_the_report_equals_scipy():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 50).astype(float)  # with ties
    rewards = scores + rng.normal(0, 1, 50)
    rows = [{"score": s, "group": "a" if i % 2 else "b"} for i, s in enumerate(scores)]
    report = regression_report(rows, rewards, "group")
    assert report["spearman"] == pytest.approx(stats.spearmanr(rewards, scores).statistic)
    assert report["pearson"] == pytest.approx(stats.pearsonr(rewards, scores).statistic)
    assert report["mse"] == pytest.approx(np.mean((rewards - scores) ** 2))
    pairs = [(i, j) for i in range(50) for j in range(50) if scores[i] > scores[j]]
    right = sum(rewards[i] > rewards[j] for i, j in pairs)
    assert report["accuracy"] == pytest.approx(right / len(pairs))
    assert report["by"]["group"]["a"]["examples"] == 25


@pytest.mark.parametrize(
    "row, error",
    [
        ({"prompt": "p", "response": "r"}, "field 'score' is missing"),
        ({"prompt": "p", "response": "r", "score": float("nan")}, "'score' must be a finite"),
        ({"prompt": "p", "response": "r", "score": "high"}, "'score' must be a finite"),
        ({"prompt": "p", "response": "", "score": 1}, "field 'response' is empty"),
    ],
)
def test_a_bad_regression_row_names_its_field(row, error):
    with pytest.raises(BadRow, match=error):
        check_row(row, "regression", "rows.jsonl:3")


def steps_of(config, mesh, batches):
    trainer = Trainer(config, mesh)
    state = trainer.init_state(
        create_model(config.model, config.train.seed, mesh, config.mesh.rules)
    )
    losses = []
    for step, batch in enumerate(batches):
        state, metrics = trainer.step(state, trainer.global_batch(batch), step)
        losses.append(float(metrics["squared_error"]) / float(metrics["examples"]))
    return jax.device_get(trainer.params(state)), losses


@pytest.mark.slow
def test_sharded_and_accumulated_steps_equal_one_device_one_batch(tmp_path):
    tokenizer = train_sentencepiece(tmp_path)
    rows = write_jsonl(tmp_path / "train.jsonl", scored_rows(64, seed=3))
    settings = tiny_run(rows, tokenizer, "objective=regression")
    config = load_config(None, settings)
    batches = [batch for batch, _ in zip(train_batches(config), range(3), strict=False)]
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    single = steps_of(config, one, batches)
    runs = {
        "sharded": steps_of(config, make_mesh(1, 4, 2), batches),
        "accumulated": steps_of(
            load_config(None, [*settings, "train.micro_batches=4"]), one, batches
        ),
    }
    for params, losses in runs.values():
        np.testing.assert_allclose(losses, single[1], atol=1e-5)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(single[0]), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)


def test_a_prepared_example_keeps_its_target():
    example = Example([np.arange(5, dtype=np.int32)], target=2.5)
    assert decode_example(encode_example(example)).target == 2.5


@pytest.mark.slow
def test_a_regression_model_fine_tunes_on_preferences_as_nemo_does(trained, tmp_path):
    """NeMo's recipe: regression first, then Bradley-Terry on pairs from its weights, which
    bring their tokenizer and reward token along."""
    run, held_out, _ = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    ordered = [sorted(rows[i : i + 2], key=lambda r: -r["score"]) for i in range(0, 96, 2)]
    pairs = [
        {"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"]}
        for a, b in ordered
        if a["score"] > b["score"]
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    config = load_config(
        None,
        [
            f"output_dir={tmp_path / 'bt'}",
            "objective=pairwise",
            f"data.train={data}",
            f"train.init_from={run}",
            "data.seq_len=128",
            "train.batch_size=8",
            "train.steps=2",
            "model.dtype=float32",
        ],
    )
    summary = train(config)
    # The regression head already orders most pairs before any preference step.
    assert summary["step"] == 2 and summary["accuracy"] >= 0.75
