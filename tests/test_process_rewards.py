"""Process reward models (`objective: prm`): rows {prompt, steps, labels} as TRL lays them out, a
reward read at every step's reward token and trained with binary cross-entropy; judged by step
accuracy and ProcessBench's first-error F1, scored and served per step, and exported as a token
classifier that transformers runs to the same step rewards."""

import json
import random

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
from test_serve import post, start_server

from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data.pipeline import decode_example, encode_example, template_spec, train_batches
from jaxrm.data.rows import BadRow, check_row
from jaxrm.scoring.evaluate import _judged
from jaxrm.scoring.scorer import Scorer

ERROR = "reward"  # the planted error: a step that says it is wrong, and every step after it


def solutions(count: int, seed: int) -> list[dict]:
    """Solutions of 2 to 5 steps; half of them go wrong at a random step, which says "reward"
    (no right step does), and stay wrong from there."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        steps = [sentence_without_error(rng) for _ in range(rng.randint(2, 5))]
        labels = [True] * len(steps)
        if rng.random() < 0.5:
            wrong = rng.randrange(len(steps))
            words = steps[wrong].split()
            words.insert(rng.randrange(len(words) + 1), ERROR)
            steps[wrong] = " ".join(words)
            labels[wrong:] = [False] * (len(steps) - wrong)
        rows.append({"prompt": sentence(rng, 4), "steps": steps, "labels": labels})
    return rows


def sentence_without_error(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS[:16]) for _ in range(rng.randint(2, 4)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rows, held_out = solutions(2000, seed=1), solutions(96, seed=2)
    directory = tmp_path_factory.mktemp("prm")
    settings = ["objective=prm", "data.max_length=128", "train.steps=300"]  # steps fit whole
    return trained_run(directory, rows, held_out, *settings)


@pytest.mark.slow
def test_a_trained_process_reward_model_finds_the_planted_errors(trained, capsys):
    run, held_out, summary = trained
    assert summary["loss"] == summary["loss"] and "first_error_f1" in summary  # last batch's
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(held_out)]) == 0
    report = json.loads(capsys.readouterr().out)
    labelled = sum(len(json.loads(line)["labels"]) for line in held_out.read_text().splitlines())
    assert report["examples"] == 96 and report["steps"] + report["steps_left_out"] == labelled
    assert report["steps_left_out"] < 0.01 * labelled  # the few that did not fit max_length
    assert report["step_accuracy"] >= 0.9, report
    assert report["first_error_f1"] >= 0.8, report


@pytest.mark.slow
def test_scored_served_and_exported_step_rewards_agree(trained, tmp_path, capsys):
    run, held_out, _ = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()[:8]]
    scoring = write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt": r["prompt"], "completions": r["steps"]} for r in rows]
    )
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(run), "--data", str(scoring), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    for row, s in zip(rows, scored, strict=True):
        assert len(s["step_rewards"]) == len(row["steps"])
        assert s["reward"] == min(s["step_rewards"]) and s["reward_last"] == s["step_rewards"][-1]

    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForTokenClassification"]
    model = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "hf")
    model = model.float().eval()
    scorer = Scorer.open(run)
    for row, s in zip(rows, scored, strict=True):
        tokens, reads = scorer.process_sequence({"prompt": row["prompt"], "steps": row["steps"]})
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens[None])).logits[0, :, 0].numpy()
        np.testing.assert_allclose(logits[reads], s["step_rewards"], atol=1e-4, rtol=0)

    small_grid = ["--max-rows", "4", "data.max_length=128"]  # fewer shapes to compile at start
    process, port = start_server(run, str(tmp_path / "cache"), *small_grid)
    try:
        items = [{"prompt": r["prompt"], "steps": r["steps"]} for r in rows]
        reply = post(port, "/score", {"items": items})
    finally:
        process.terminate()
        process.wait(timeout=60)
    for i, s in enumerate(scored):
        np.testing.assert_allclose(reply["step_rewards"][i], s["step_rewards"], atol=1e-5)
        assert reply["rewards"][i] == pytest.approx(s["reward"], abs=1e-5)
        assert reply["rewards_last"][i] == pytest.approx(s["reward_last"], abs=1e-5)


def test_each_step_is_judged_at_its_reward_token(tmp_path):
    tokenizer = train_sentencepiece(tmp_path)
    settings = tiny_run(tmp_path / "train.jsonl", tokenizer, "objective=prm", "data.max_steps=3")
    config = load_config(None, settings)
    template = template_spec(config).build()
    row = {"prompt": "the fox", "steps": ["a dog", "the code", "print list", "one more"]}
    example = template({**row, "labels": [True, 0.5, False, True]})
    (tokens,) = example.sequences
    assert np.flatnonzero(tokens == template.reward_id).tolist() == example.reads.tolist()
    assert len(example.reads) == 3 and example.reads[-1] == len(tokens) - 1  # max_steps = 3
    np.testing.assert_array_equal(example.labels, [1.0, 0.5, 0.0])
    step = template.tokenizer.encode("the code" + config.data.step_separator)
    assert tokens[example.reads[0] + 1 : example.reads[1]].tolist() == step
    assert decode_example(encode_example(example)).reads.tolist() == example.reads.tolist()

    write_jsonl(tmp_path / "train.jsonl", [{**row, "labels": [1, 1, 0, 0]}] * 8)
    batch = next(train_batches(config))
    first = batch["reward_index"][0, 0]
    assert (batch["tokens"][0, first] == template.reward_id).all()
    np.testing.assert_array_equal(batch["step_labels"][0, 0], [1, 1, 0])


def test_a_long_solution_keeps_its_first_steps(tmp_path):
    tokenizer = train_sentencepiece(tmp_path)
    config = load_config(
        None, tiny_run(tmp_path / "x", tokenizer, "objective=prm", "data.max_length=40")
    )
    template = template_spec(config).build()
    long_step = " ".join(["function"] * 60)
    tokens, reads = template.process("the fox", ["a dog", long_step])
    assert len(tokens) <= 40 and len(reads) == 1  # the second step does not fit
    tokens, reads = template.process("the fox", [long_step])
    assert len(tokens) == 40 and reads.tolist() == [39]  # a first step too long keeps its head


@pytest.mark.parametrize(
    "row, error",
    [
        ({"prompt": "p", "steps": ["a"]}, "field 'labels' is missing"),
        ({"prompt": "p", "steps": [], "labels": []}, "'steps' must be a non-empty list"),
        (
            {"prompt": "p", "steps": ["a", ""], "labels": [1, 1]},
            r"'steps\[1\]' must be a non-empty",
        ),
        ({"prompt": "p", "steps": ["a", "b"], "labels": [True]}, "one label per step"),
        ({"prompt": "p", "steps": ["a"], "labels": [1.5]}, r"'labels\[0\]' must be true, false"),
        ({"prompt": "p", "steps": ["a"], "labels": ["yes"]}, r"'labels\[0\]' must be true, false"),
    ],
)
def test_a_bad_process_row_names_its_field(row, error):
    with pytest.raises(BadRow, match=error):
        check_row(row, "prm", "rows.jsonl:3")


def test_trl_completions_are_the_steps():
    row = check_row({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}, "prm", "x")
    assert row["steps"] == ["a", "b"]


def test_first_error_scores_follow_processbench():
    rewards = [np.array([1.0, -1.0, -2.0]), np.array([1.0, 1.0]), np.array([2.0, 1.0, -1.0])]
    labels = [
        np.array([True, False, False]),
        np.array([True, True]),
        np.array([True, False, False]),
    ]
    report = _judged(rewards, labels)
    # Wrong solutions: the first is found at step 1, the third judged wrong only at step 2.
    assert report["first_error_accuracy"] == 0.5 and report["right_solution_accuracy"] == 1.0
    assert report["first_error_f1"] == pytest.approx(2 * 0.5 / 1.5)
    assert report["step_accuracy"] == pytest.approx(7 / 8)
