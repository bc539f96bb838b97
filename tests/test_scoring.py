"""eval, score and best-of-n: the numbers against hand computation and against the model run on
one sequence at a time (no batching, no padding)."""

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import write_jsonl
from flax import nnx

from jaxrm.checkpoint.items import save_model
from jaxrm.checkpoint.loading import load_model
from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data.pipeline import template_spec
from jaxrm.hf.convert import export_hf
from jaxrm.model.decoder import create_model
from jaxrm.scoring.evaluate import (
    REWARDBENCH_COUNTS,
    best_of_n_report,
    oracle_accuracy,
    preference_report,
    top_of_subset_accuracy,
)
from jaxrm.scoring.scorer import Grid, Groups, Scorer, bucket_length, plan_batches

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy"


def make_checkpoint(path: Path, objective: str) -> Path:
    config = load_config(
        ROOT / "configs" / "tiny_polar.yaml",
        [f"objective={objective}", "model.reward_head_init=normal", "data.max_length=512"],
    )
    save_model(path, create_model(config.model, seed=3), config, TOY / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def polar_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("polar") / "ckpt", "polar")


@pytest.fixture(scope="module")
def pairwise_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pairwise") / "ckpt", "pairwise")


def reference_rewards(checkpoint: Path, rows: list[dict]) -> list[np.ndarray]:
    """Each row's responses scored one sequence at a time, best first."""
    loaded = load_model(checkpoint)
    template = template_spec(loaded.config, loaded.tokenizer_dir).build()
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def last_reward(state, ids, length):
        model = nnx.merge(graphdef, state)
        positions = jnp.arange(ids.shape[1])[None]
        hidden = model(ids, (positions < length).astype(jnp.int32), positions)
        return model.token_rewards(hidden)[0, length - 1]

    def reward(tokens: np.ndarray) -> float:
        ids = np.zeros((1, 512), np.int32)
        ids[0, : len(tokens)] = tokens
        return float(last_reward(state, ids, len(tokens)))

    return [np.asarray([reward(t) for t in template(row).sequences]) for row in rows]


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_preference_report_equals_hand_computation():
    rows = [
        {"category": "a", "subset": "alpacaeval-easy"},
        {"category": "a", "subset": "math-prm"},
        {"category": "b", "subset": "hep-go"},
        {"category": "b", "subset": "hep-go"},
        {"category": "b", "subset": "my-own"},
    ]
    rewards = [
        np.array([1.0, 0.0]),  # right
        np.array([0.5, 0.5]),  # a tie: wrong
        np.array([0.0, 2.0]),  # wrong
        np.array([3.0, 1.0, 2.0]),  # right: above both others; pairs 2 of 3 ordered
        np.array([2.0, 3.0, 1.0]),  # wrong; pairs 2 of 3 ordered (2 > 1, 3 > 1)
    ]
    report = preference_report(rows, rewards, by="category")
    assert report["examples"] == 5
    assert report["accuracy"] == pytest.approx(2 / 5)
    assert report["ties"] == 1
    assert report["margin"] == pytest.approx((1 + 0 - 2 + 2 - 1) / 5)
    assert report["pair_accuracy"] == pytest.approx((1 + 0 + 0 + 2 + 2) / 9)
    assert report["reward"]["max"] == 3.0 and report["reward"]["min"] == 0.0
    assert report["by"]["category"]["a"]["accuracy"] == pytest.approx(1 / 2)
    assert report["by"]["category"]["b"]["accuracy"] == pytest.approx(1 / 3)
    assert report["subsets"]["hep-go"] == {"examples": 2, "accuracy": 0.5, "margin": 0.0}
    # math-prm (0.0) weighs 984 against hep-go's (0.5) 164; my-own is a section of its own.
    reasoning = (0.0 * 984 + 0.5 * 164) / (984 + 164)
    assert REWARDBENCH_COUNTS["math-prm"] == 984
    assert report["sections"] == pytest.approx({"Chat": 1.0, "Reasoning": reasoning, "Other": 0.0})
    assert report["score"] == pytest.approx((1.0 + reasoning + 0.0) / 3)


def test_eval_polar_rows_equals_hand_computation(polar_checkpoint, tmp_path, capsys):
    rows = read_rows(TOY / "polar_eval.jsonl")[:12]
    rows[3] = {**rows[3], "chosen": rows[3]["rejected"]}  # identical responses: a tie, wrong
    rows[5] = {k: v for k, v in rows[5].items() if k not in ("chosen", "rejected")}
    rows[5]["ranked"] = [rows[4]["chosen"], rows[4]["rejected"], rows[6]["chosen"]]
    data = write_jsonl(tmp_path / "hand.jsonl", rows)
    report = run_json(
        capsys, "eval", str(polar_checkpoint), "--data", str(data), "--by", "category"
    )

    rewards = reference_rewards(polar_checkpoint, rows)
    correct = [r[0] > max(r[1:]) for r in rewards]
    assert not correct[3]
    assert report["accuracy"] == pytest.approx(sum(correct) / len(rows))
    assert report["margin"] == pytest.approx(np.mean([r[0] - r[1] for r in rewards]), abs=1e-6)
    for category in {row["category"] for row in rows}:
        mine = [c for c, row in zip(correct, rows, strict=True) if row["category"] == category]
        assert report["by"]["category"][category]["accuracy"] == pytest.approx(np.mean(mine))
    assert report["scoring"]["sequences"] == 2 * len(rows) + 1


def test_eval_plain_pairs_without_reference(pairwise_checkpoint, capsys):
    data = TOY / "codepmp_eval.jsonl"
    report = run_json(capsys, "eval", str(pairwise_checkpoint), "--data", str(data))
    rewards = reference_rewards(pairwise_checkpoint, read_rows(data))
    assert report["examples"] == len(rewards)
    assert report["accuracy"] == pytest.approx(np.mean([r[0] > r[1] for r in rewards]))
    assert report["reward"]["mean"] == pytest.approx(np.mean(np.concatenate(rewards)), abs=1e-6)


def test_score_writes_one_reward_per_row_equal_to_unbatched_rewards(
    polar_checkpoint, tmp_path, capsys
):
    rows = [
        {"prompt": r["prompt"], "reference": r["reference"], "response": r[key]}
        for r in read_rows(TOY / "polar_eval.jsonl")[:20]
        for key in ("chosen", "rejected")
    ]
    rows[7]["prompt"] = rows[7]["prompt"] * 30  # long: the prompt cut to data.max_length
    data, out = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "scored.jsonl"
    summary = run_json(
        capsys, "score", str(polar_checkpoint), "--data", str(data), "--out", str(out)
    )
    scored = read_rows(out)
    assert [{k: v for k, v in r.items() if k != "reward"} for r in scored] == rows
    as_pairs = [{**r, "chosen": r["response"], "rejected": r["response"]} for r in rows]
    expected = [r[0] for r in reference_rewards(polar_checkpoint, as_pairs)]
    np.testing.assert_allclose([r["reward"] for r in scored], expected, atol=1e-5, rtol=0)
    assert summary["rows"] == 40 and summary["tokens_per_sec"] > 0
    # 40 sequences of 25-509 tokens (2023 in all) packed several to a row: one batch of 512-token
    # rows (8 of them: the tests run on 8 CPU devices that split the rows)
    assert summary["batches"] == 1 and summary["tokens"] == 2023


def test_a_hugging_face_export_scores_the_same(polar_checkpoint, tmp_path, capsys):
    rows = [
        {"prompt": r["prompt"], "reference": r["reference"], "response": r["chosen"]}
        for r in read_rows(TOY / "polar_eval.jsonl")[:8]
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    export_hf(load_model(polar_checkpoint), tmp_path / "hf")
    scored = {}
    for name, checkpoint in (("jaxrm", polar_checkpoint), ("hf", tmp_path / "hf")):
        out = tmp_path / f"{name}.jsonl"
        run_json(capsys, "score", str(checkpoint), "--data", str(data), "--out", str(out))
        scored[name] = [r["reward"] for r in read_rows(out)]
    np.testing.assert_allclose(scored["hf"], scored["jaxrm"], atol=1e-5, rtol=0)


def test_export_calibrate_writes_openrlhf_reward_statistics(polar_checkpoint, tmp_path, capsys):
    rows = [
        {"prompt": r["prompt"], "reference": r["reference"], "response": r[key]}
        for r in read_rows(TOY / "polar_eval.jsonl")[:6]
        for key in ("chosen", "rejected")
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    run_json(capsys, "score", str(polar_checkpoint), "--data", str(data), "--out", str(out))
    rewards = np.asarray([r["reward"] for r in read_rows(out)], np.float64)
    argv = ["export", str(polar_checkpoint), str(tmp_path / "hf"), "--calibrate", str(data)]
    assert main(argv) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["normalize_reward"] is True
    assert config["mean"] == pytest.approx(rewards.mean(), abs=1e-6)
    assert config["std"] == pytest.approx(rewards.std(ddof=1), abs=1e-6)
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "## Serving" in readme and "vllm serve" in readme and "`std`" in readme


def test_score_errors_name_the_row_and_write_nothing(polar_checkpoint, tmp_path, capsys):
    rows = [{"prompt": "a", "reference": "b", "response": "c"}, {"prompt": "a", "response": "c"}]
    data, out = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "scored.jsonl"
    assert main(["score", str(polar_checkpoint), "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data}:2" in err and "'reference'" in err
    assert list(tmp_path.iterdir()) == [data]
    out.write_text("")
    assert main(["score", str(polar_checkpoint), "--data", str(data), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_batches_group_similar_lengths_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 3000, size=500).tolist()
    batches = plan_batches(lengths, batch_tokens=8192, row_multiple=4, max_rows=64)
    assert sorted(i for b in batches for i in b.indices) == list(range(500))
    padded = sum(b.rows * b.length for b in batches)
    assert sum(lengths) / padded > 0.75
    for b in batches:
        assert b.rows % 4 == 0 and b.rows <= 64 and len(b.indices) <= b.rows
        assert all(bucket_length(lengths[i]) == b.length for i in b.indices)
        assert b.rows * b.length <= 4 * max(8192, b.length)
    assert len({(b.rows, b.length) for b in batches}) < 40  # shapes to compile


def brute_force(rewards, correct, n):
    """Averages over every n-subset: the top reward's correctness (ties split), any correct."""
    top, oracle = [], []
    for subset in itertools.combinations(range(len(rewards)), n):
        best = max(rewards[i] for i in subset)
        top.append(np.mean([correct[i] for i in subset if rewards[i] == best]))
        oracle.append(any(correct[i] for i in subset))
    return np.mean(top), np.mean(oracle)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_best_of_n_expectations_equal_every_subset_enumerated(n):
    rewards = np.array([0.3, 1.2, 1.2, -0.5, 0.9, 1.2])  # a three-way tie on top
    correct = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    top, oracle = brute_force(rewards, correct, n)
    assert top_of_subset_accuracy(rewards, correct, n) == pytest.approx(top)
    assert oracle_accuracy(correct, n) == pytest.approx(oracle)


def test_best_of_n_report_by_hand():
    rows = [
        {
            "candidates": ["a", "b", "c", "d"],
            "correct": [1, 0, 0, 0],
            "answers": ["1", "2", "2", "3"],
        },
        {
            "candidates": ["a", "b", "c", "d"],
            "correct": [0, 1, 1, 0],
            "answers": ["7", "5", "5", "6"],
        },
    ]
    rewards = [np.array([4.0, 3.0, 2.0, 1.0]), np.array([4.0, 3.0, 2.0, 1.0])]
    report = best_of_n_report(rows, rewards, samples=64)
    assert report["n"] == [1, 2, 4]
    # N=4: the top candidate is candidate 0 in both rows: right, then wrong.
    assert report["reward"][-1] == pytest.approx(0.5)
    # N=1: a random candidate: 1/4 and 2/4 correct.
    assert report["reward"][0] == report["random"][0] == pytest.approx(0.375)
    # N=4 majority: "2" wins row 0 (wrong), "5" wins row 1 (right).
    assert report["majority"][-1] == pytest.approx(0.5)
    assert report["oracle"][-1] == 1.0 and report["majority_over"] == "answers"


def test_best_of_n_command(polar_checkpoint, tmp_path, capsys):
    source = read_rows(TOY / "polar_eval.jsonl")
    rows = [
        {
            "prompt": r["prompt"],
            "reference": r["reference"],
            "candidates": [r["chosen"], r["rejected"], source[i + 1]["chosen"]],
            "correct": [True, False, False],
        }
        for i, r in enumerate(source[:6])
    ]
    data = write_jsonl(tmp_path / "bon.jsonl", rows)
    report = run_json(capsys, "best-of-n", str(polar_checkpoint), "--data", str(data))
    assert report["n"] == [1, 2, 3] and report["rows"] == 6
    assert report["random"] == pytest.approx([1 / 3] * 3)
    assert report["oracle"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    scored = reference_rewards(
        polar_checkpoint,
        [{**r, "chosen": c, "rejected": c} for r in rows for c in r["candidates"]],
    )
    tops = [np.argmax([s[0] for s in scored[3 * i : 3 * i + 3]]) for i in range(6)]
    assert report["reward"][-1] == pytest.approx(np.mean([t == 0 for t in tops]))

    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "correct": [True]}])
    assert main(["best-of-n", str(polar_checkpoint), "--data", str(bad)]) == 1
    assert f"{bad}:1: field 'correct'" in capsys.readouterr().err


def test_by_groups_rows_without_the_field_and_refuses_a_field_no_row_has(
    polar_checkpoint, tmp_path, capsys
):
    report = preference_report(
        [{"category": "a"}, {}], [np.array([1.0, 0.0]), np.array([0.0, 1.0])], by="category"
    )
    assert report["by"]["category"] == {
        "(none)": {"examples": 1, "accuracy": 0.0, "margin": -1.0},
        "a": {"examples": 1, "accuracy": 1.0, "margin": 1.0},
    }
    data = TOY / "polar_eval.jsonl"
    assert main(["eval", str(polar_checkpoint), "--data", str(data), "--by", "categroy"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"jaxrm: error: --by categroy: no row of {data} has a field 'categroy'"


def test_every_planned_batch_has_a_grid_shape():
    grid = Grid(max_length=1536, batch_tokens=4096, row_multiple=2, max_rows=64)
    shapes = set(grid.shapes())
    assert [length for length in grid.lengths()] == [
        32,
        48,
        64,
        96,
        128,
        192,
        256,
        384,
        512,
        768,
        1024,
        1536,
    ]
    rng = np.random.default_rng(1)
    for _ in range(20):
        lengths = rng.integers(1, 1537, size=int(rng.integers(1, 300))).tolist()
        for batch in grid.plan(lengths):
            assert (batch.rows, batch.length) in shapes
            assert batch.rows * batch.length <= 2 * max(4096, batch.length)


def test_groups_share_their_prefix_and_get_the_rewards_of_each_alone(polar_checkpoint):
    scorer = Scorer.open(polar_checkpoint, batch_tokens=2048, max_rows=16)
    source = read_rows(TOY / "polar_eval.jsonl")[:3]
    groups = [
        [
            scorer.score_sequence(
                {"prompt": r["prompt"], "reference": r["reference"], "response": x}
            )
            for x in (r["chosen"], r["rejected"], r["reference"], r["chosen"] + " Sure.", "Ok.")
        ]
        for r in source
    ]
    alone = scorer.rewards([s for group in groups for s in group])
    grouped = np.concatenate(scorer.group_rewards(groups))
    np.testing.assert_allclose(grouped, alone, atol=1e-5, rtol=0)
    packed = Groups.pack(groups, scorer.grid.max_length)
    assert len(packed.rows) == 3  # one row per group: the prefix once, then its five responses
    assert sum(len(r) for r in packed.rows) < 0.6 * sum(len(s) for g in groups for s in g)
    # A row length too short for a whole group: the responses spill into more rows, each
    # starting with the prefix again; the rewards stay the same.
    longest = max(len(s) for g in groups for s in g)
    split = Groups.pack(groups, longest + 8)
    assert len(split.rows) > 3 and all(len(r) <= longest + 8 for r in split.rows)
    values = split.rewards(scorer.row_rewards(split.rows))
    np.testing.assert_allclose(np.concatenate(values), alone, atol=1e-5, rtol=0)


def test_after_compile_grid_no_input_compiles(polar_checkpoint):
    scorer = Scorer.open(polar_checkpoint, ["data.max_length=128"], batch_tokens=512, max_rows=8)
    scorer.compile_grid()
    compiled = scorer.counts.compiles
    assert compiled == len(scorer.grid.shapes())
    rng = np.random.default_rng(2)
    sequences = [
        rng.integers(5, 900, size=int(n)).astype(np.int32) for n in rng.integers(1, 129, 200)
    ]
    scorer.rewards(sequences)
    assert scorer.counts.compiles == compiled
