"""The toy datasets: seeded, valid, held out, shipped as generated, with a fitting tokenizer."""

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm

from jaxrm.data import toy
from jaxrm.data.rows import check_row
from jaxrm.data.tokenizer import load_tokenizer
from jaxrm.errors import UserError
from jaxrm.presets import PRESETS

SHIPPED = Path(__file__).parent.parent / "configs" / "toy"
KINDS = {
    "polar_train": "polar",
    "polar_eval": "polar",
    "codepmp_train": "codepmp",
    "codepmp_eval": "codepmp",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return toy.write_toy_data(tmp_path_factory.mktemp("toy"))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_seed_gives_the_same_rows():
    for rows in (toy.polar_rows, toy.codepmp_rows):
        assert rows(40, seed=3) == rows(40, seed=3)
        assert rows(40, seed=3) != rows(40, seed=4)


def test_rows_pass_the_row_check(generated):
    for name, kind in KINDS.items():
        rows = read(generated[name])
        assert rows
        for line, row in enumerate(rows, 1):
            check_row(row, kind, f"{name}:{line}")


def test_reference_and_chosen_come_from_one_policy_rejected_from_another():
    policy_of = {r["response"]: r["policy"] for r in toy.trajectory_rows(60, seed=0)}
    rows = toy.polar_rows(120, seed=0)
    for row in rows:
        assert row["reference"] != row["chosen"]
        assert policy_of[row["reference"]] == policy_of[row["chosen"]] == row["category"]
        assert policy_of[row["rejected"]] != row["category"]
    # Every style loses as often as it wins: the candidates alone tell nothing.
    assert Counter(r["category"] for r in rows) == Counter(policy_of[r["rejected"]] for r in rows)


def test_strong_functions_parse_and_weak_ones_differ(generated):
    for name in ("codepmp_train", "codepmp_eval"):
        for row in read(generated[name]):
            ast.parse(row["chosen"])
            assert row["rejected"] != row["chosen"]


def test_eval_prompts_are_not_training_prompts(generated):
    for kind in ("polar", "codepmp"):
        train = {r["prompt"] for r in read(generated[f"{kind}_train"])}
        held_out = {r["prompt"] for r in read(generated[f"{kind}_eval"])}
        assert not train & held_out


def test_shipped_rows_are_what_write_toy_data_writes(generated):
    for name in KINDS:
        assert read(SHIPPED / f"{name}.jsonl") == read(generated[name]), (
            f"configs/toy/{name}.jsonl is stale: regenerate with `jaxrm data toy --out configs/toy`"
        )


def test_tokenizer_keeps_reward_tokens_whole_and_fits_the_tiny_preset(generated):
    tokenizer = load_tokenizer(generated["tokenizer"])
    assert tokenizer.vocab_size <= PRESETS["tiny"]["vocab_size"]
    assert tokenizer.encode("a", add_special_tokens=True)[0] == tokenizer.bos_id == 1
    raw = spm.SentencePieceProcessor(model_file=str(generated["tokenizer"]))
    for token in ("<|reward|>", "<|score|>"):
        token_id = tokenizer.token_to_id(token)
        assert tokenizer.encode(f"yes{token}no").count(token_id) == 1
        assert raw.encode(f"yes{token}no").count(token_id) == 1  # without tokenizer_config.json


def test_command_writes_a_new_directory_only(tmp_path):
    parser = argparse.ArgumentParser()
    toy.add_command(parser.add_subparsers(required=True))
    args = parser.parse_args(["toy", "--out", str(tmp_path / "toy"), "--seed", "1"])
    args.run(args)
    names = {p.name for p in (tmp_path / "toy").iterdir()}
    assert names == {*(f"{n}.jsonl" for n in KINDS), "tokenizer.model", "tokenizer_config.json"}
    assert read(tmp_path / "toy" / "polar_eval.jsonl")[:6] == toy.polar_rows(
        6, seed=1, held_out=True
    )
    with pytest.raises(UserError, match="not empty"):
        args.run(args)
