"""Regression reward models (`objective: regression`): rows {prompt, response, score}, trained
with the squared error, judged by how their rewards correlate with held-out scores, and exported
with a regression head that transformers runs to the same outputs; multi-attribute heads
(`model.attributes`, HelpSteer-style) the same per attribute, served, imported and fine-tuned on
preferences by their weighted reward. (A one-label head exports as every reward model does:
tests/test_hf.py.)"""

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
from test_serve import post, start_server

from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data.pipeline import decode_example, encode_example, train_batches
from jaxrm.data.rows import BadRow, check_row
from jaxrm.data.templates import Example
from jaxrm.errors import UserError
from jaxrm.hf.configs import head_labels
from jaxrm.model.decoder import create_model
from jaxrm.scoring.evaluate import regression_report
from jaxrm.scoring.scorer import Scorer
from jaxrm.sharding import make_mesh
from jaxrm.train.loop import train
from jaxrm.train.losses import regression as regression_loss
from jaxrm.train.losses import totals
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
        losses.append(float(metrics["squared_error"]) / float(metrics["ratings"]))
    return jax.device_get(trainer.params(state)), losses


@pytest.mark.slow
def test_sharded_and_accumulated_steps_equal_one_device_one_batch(tmp_path):
    """With a multi-attribute head whose rows leave some attributes unrated: the squared error
    is divided by the whole batch's rated entries, so the parts add up to the whole."""
    tokenizer = train_sentencepiece(tmp_path)
    rows = write_jsonl(tmp_path / "train.jsonl", attributed_rows(64, seed=3))
    settings = tiny_run(rows, tokenizer, "objective=regression", f"model.attributes={ATTRIBUTES}")
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


# --- multi-attribute heads (HelpSteer-style) -----------------------------------------------------

WORD_OF = {"rewards": "reward", "policies": "policy"}  # an attribute: how often its word occurs
ATTRIBUTES = list(WORD_OF)
WEIGHTS = [1.0, 0.5]


def attributed_rows(count: int, seed: int) -> list[dict]:
    """Responses scored on two attributes, how often they say "reward" and "policy"; some rows
    leave an attribute unrated, and the scores come in each layout a row may use."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = [
            rng.choice(["reward", "policy"]) if rng.random() < 0.6 else rng.choice(WORDS[:16])
            for _ in range(rng.randint(3, 8))
        ]
        scores = {name: float(words.count(word)) for name, word in WORD_OF.items()}
        if rng.random() < 0.2:
            scores[rng.choice(ATTRIBUTES)] = None
        prompt = " ".join(rng.choice(WORDS[:16]) for _ in range(4))
        row = {"prompt": prompt, "response": " ".join(words)}
        if i % 3 == 0:
            row.update(scores)  # HelpSteer's layout: a field per attribute
        elif i % 3 == 1:
            row["score"] = [scores[name] for name in ATTRIBUTES]
        else:
            row["score"] = {k: v for k, v in scores.items() if v is not None}
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    rows, held_out = attributed_rows(800, seed=4), attributed_rows(96, seed=5)
    directory = tmp_path_factory.mktemp("attributes")
    return trained_run(
        directory,
        rows,
        held_out,
        "objective=regression",
        f"model.attributes={ATTRIBUTES}",
        f"model.attribute_weights={WEIGHTS}",
        "train.steps=400",
    )


@pytest.mark.slow
def test_a_multi_attribute_model_fits_each_attribute_on_held_out_rows(attributed, capsys):
    run, held_out, summary = attributed
    assert summary["loss"] == summary["mse"]
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(held_out)]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    rated = {
        name: sum(check_row(r, "regression", "", ATTRIBUTES)["score"][k] is not None for r in rows)
        for k, name in enumerate(ATTRIBUTES)
    }
    assert report["ratings"] == sum(rated.values()) < 2 * len(rows)
    for name in ATTRIBUTES:
        fit = report["attributes"][name]
        assert fit["examples"] == rated[name]
        assert fit["spearman"] >= 0.9 and fit["mse"] < 0.5, (name, fit)


@pytest.mark.slow
def test_attribute_scores_agree_scored_exported_imported_and_served(attributed, tmp_path):
    run, held_out, _ = attributed
    rows = [json.loads(line) for line in held_out.read_text().splitlines()[:8]]
    items = [{k: r[k] for k in ("prompt", "response")} for r in rows]
    scoring = write_jsonl(tmp_path / "rows.jsonl", items)
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(run), "--data", str(scoring), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    scores = np.array([[s["scores"][name] for name in ATTRIBUTES] for s in scored])
    np.testing.assert_allclose([s["reward"] for s in scored], scores @ WEIGHTS, rtol=1e-6)

    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["num_labels"] == 2 and hf_config["problem_type"] == "regression"
    assert hf_config["id2label"] == {"0": "rewards", "1": "policies"}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    scorer = Scorer.open(run)
    with torch.no_grad():
        logits = [
            model.float().eval()(torch.from_numpy(scorer.score_sequence(row)[None])).logits[0]
            for row in items
        ]
    np.testing.assert_allclose(np.stack(logits), scores, atol=1e-4, rtol=0)
    imported = Scorer.open(tmp_path / "hf")  # the Hugging Face directory read back
    assert imported.attributes == ATTRIBUTES
    np.testing.assert_allclose(
        imported.scores([imported.score_sequence(row) for row in items]), scores, atol=1e-5
    )

    grid = ["--max-rows", "4", "data.max_length=64"]  # the trained length; few shapes to compile
    process, port = start_server(run, str(tmp_path / "cache"), *grid)
    try:
        reply = post(port, "/score", {"items": items})
        texts = [scorer.template.tokenizer.decode(scorer.score_sequence(r).tolist()) for r in items]
        classified = post(
            port, "/classify", {"input": [s.tolist() for s in map(scorer.score_sequence, items)]}
        )
        rewarded = post(port, "/get_reward", {"query": texts[:1]})
    finally:
        process.terminate()
        process.wait(timeout=60)
    np.testing.assert_allclose(reply["rewards"], [s["reward"] for s in scored], atol=1e-5)
    served = [[item[name] for name in ATTRIBUTES] for item in reply["scores"]]
    np.testing.assert_allclose(served, scores, atol=1e-5)
    probs = [item["probs"] for item in classified["data"]]
    np.testing.assert_allclose(probs, scores, atol=1e-5)
    assert [item["label"] for item in classified["data"]] == [
        ATTRIBUTES[int(np.argmax(s))] for s in scores
    ]
    assert len(rewarded["rewards"]) == 1


@pytest.mark.slow
def test_a_multi_attribute_model_fine_tunes_on_preferences_by_its_reward(attributed, tmp_path):
    """NeMo's recipe, Bradley-Terry after regression, from a run's weights (which bring their
    tokenizer and reward token along): the run goes on with the head's attributes and ranks by
    their weighted sum, which already orders most pairs."""
    run, held_out, _ = attributed
    rows = [
        check_row(json.loads(line), "regression", "", ATTRIBUTES)
        for line in held_out.read_text().splitlines()
    ]
    rated = [r for r in rows if None not in r["score"]]
    reward = lambda r: float(np.dot(r["score"], WEIGHTS))  # noqa: E731
    pairs = [
        {"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"]}
        for a, b in (
            sorted(rated[i : i + 2], key=lambda r: -reward(r)) for i in range(0, len(rated) - 1, 2)
        )
        if reward(a) > reward(b)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    settings = [f"output_dir={tmp_path / 'bt'}", "objective=pairwise", f"data.train={data}"]
    settings += [f"train.init_from={run}", "data.seq_len=256", "train.batch_size=8"]
    summary = train(load_config(None, [*settings, "train.steps=2", "model.dtype=float32"]))
    assert summary["accuracy"] >= 0.75
    saved = load_config(tmp_path / "bt" / "config.yaml")
    assert saved.model.attributes == ATTRIBUTES and saved.model.attribute_weights == WEIGHTS


@pytest.mark.parametrize(
    "row, score",
    [
        ({"score": {"rewards": 2, "policies": None}}, [2.0, None]),
        ({"score": {"policies": 1.5}}, [None, 1.5]),
        ({"score": [0, 3]}, [0.0, 3.0]),
        ({"rewards": 1, "policies": 0, "other": "kept"}, [1.0, 0.0]),  # HelpSteer's fields
    ],
)
def test_a_row_scores_its_attributes_in_any_layout(row, score):
    checked = check_row({"prompt": "p", "response": "r", **row}, "regression", "f:1", ATTRIBUTES)
    assert checked["score"] == score


@pytest.mark.parametrize(
    "row, error",
    [
        ({}, "a score per attribute: a 'score' object or fields named rewards, policies"),
        ({"score": {"reward": 1}}, "names 'reward', not among the model's attributes"),
        ({"score": [1]}, "holds 1 values; the model has 2 attributes"),
        ({"score": 2.0}, "must be an object or a list of 2 numbers"),
        ({"score": {"rewards": "high"}}, "attribute 'rewards' must be a finite number or null"),
        ({"score": [None, None]}, "rates no attribute"),
    ],
)
def test_a_bad_attribute_score_names_its_field(row, error):
    with pytest.raises(BadRow, match=f"^f:1: .*{error}"):
        check_row({"prompt": "p", "response": "r", **row}, "regression", "f:1", ATTRIBUTES)


def test_an_unrated_attribute_adds_nothing_to_the_loss():
    """The squared error sums the rated entries only, counted apart from the examples."""
    config = load_config(
        None, ["objective=regression", f"model.attributes={ATTRIBUTES}", "model.dtype=float32"]
    )
    model = create_model(config.model, 0)
    row = np.arange(1, 17, dtype=np.int32)[None]
    segments = np.repeat(np.arange(1, 5, dtype=np.int32), 4)[None]
    batch = {
        "tokens": row,
        "segment_ids": segments,
        "positions": np.tile(np.arange(4, dtype=np.int32), 4)[None],
        "prefix_ids": np.zeros_like(row),
        "reward_index": np.array([[[3], [7], [11], [-1]]], np.int32),
        "margin": np.zeros((1, 4), np.float32),
        "target": np.array([[[1, np.nan], [np.nan, 2], [0.5, -1], [9, 9]]], np.float32),
    }
    counts = totals(batch)
    loss, sums = regression_loss(model, batch, config, counts)
    hidden = model(batch["tokens"], batch["segment_ids"], batch["positions"], batch["prefix_ids"])
    outputs = np.asarray(model.token_scores(hidden))[0]
    rated = [(3, 0, 1.0), (7, 1, 2.0), (11, 0, 0.5), (11, 1, -1.0)]
    expected = sum((outputs[t, k] - y) ** 2 for t, k, y in rated)
    assert int(counts["ratings"]) == int(sums["ratings"]) == 4 and int(sums["examples"]) == 3
    assert float(sums["squared_error"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(expected / 4, rel=1e-5)
    grads = jax.grad(lambda m: regression_loss(m, batch, config, counts)[0])(model)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_a_prepared_example_keeps_its_attribute_targets():
    example = Example([np.arange(5, dtype=np.int32)], target=np.array([1.5, np.nan], np.float32))
    target = decode_example(encode_example(example)).target
    np.testing.assert_array_equal(target, [1.5, np.nan])


@pytest.mark.parametrize(
    "hf, result",
    [
        ({}, []),
        ({"num_labels": 1}, []),
        (
            {"num_labels": 2, "problem_type": "regression", "id2label": {"1": "b", "0": "a"}},
            ["a", "b"],
        ),
        (
            {"num_labels": 3, "id2label": {"0": "x", "1": "y", "2": "z"}},
            "without problem_type regression",
        ),
        ({"num_labels": 2, "problem_type": "regression", "id2label": {"0": "a"}}, "disagree"),
    ],
)
def test_an_imported_head_is_a_reward_or_attribute_head(hf, result):
    if isinstance(result, list):
        assert head_labels(hf, "config.json") == result
    else:
        with pytest.raises(UserError, match=f"^config.json: .*{result}"):
            head_labels(hf, "config.json")
