"""Shared-prefix packing computes the same rewards (and CodePMP LM loss) as packing every sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import polar_rows, train_sentencepiece

from jaxrm.config import load_config
from jaxrm.losses import pair_rewards
from jaxrm.model import create_model
from jaxrm.packing import common_prefix_length, pack
from jaxrm.templates import Example, Template
from jaxrm.tokenizer import load_tokenizer

SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("sp")))


def examples(tokenizer, objective, count=16):
    template = Template(tokenizer, objective, max_length=SEQ_LEN // 2, reward_token="<|score|>")
    out = []
    for i, row in enumerate(polar_rows(count, seed=3)):
        example = template(row)
        example.margin = float(i)  # identifies the example after packing reorders them
        out.append(example)
    return out


def batch(rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def rewards_by_example(model, rows):
    b = batch(rows)
    chosen, rejected, valid = jax.jit(pair_rewards)(model, b)
    ids = np.asarray(b["margin"])[np.asarray(valid)]
    pairs = np.stack(
        [np.asarray(chosen)[np.asarray(valid)], np.asarray(rejected)[np.asarray(valid)]]
    )
    return {int(i): pairs[:, n] for n, i in enumerate(ids)}


@pytest.mark.parametrize("objective", ["polar", "codepmp"])
def test_shared_prefix_rewards_equal_unshared(tokenizer, objective):
    config = load_config(None, ["model.dtype=float32", "model.lm_head=true"])
    model = create_model(config.model, seed=0)
    data = examples(tokenizer, objective)
    with_lm = objective == "codepmp"
    shared = pack(data, SEQ_LEN, 16, shared_prefix=True, with_lm=with_lm)
    full = pack(data, SEQ_LEN, 16, shared_prefix=False, with_lm=with_lm)
    tokens = lambda rows: sum(int((r["segment_ids"] > 0).sum()) for r in rows)  # noqa: E731
    assert tokens(shared) < tokens(full)
    assert any(r["prefix_ids"].any() for r in shared) and not any(
        r["prefix_ids"].any() for r in full
    )

    got, want = rewards_by_example(model, shared), rewards_by_example(model, full)
    assert sorted(got) == sorted(want) == list(range(len(data)))
    for i in want:
        np.testing.assert_allclose(got[i], want[i], atol=1e-5, rtol=0)
    if with_lm:
        np.testing.assert_allclose(lm_loss(model, shared), lm_loss(model, full), rtol=1e-5)


def lm_loss(model, rows):
    b = batch(rows)
    hidden = model(b["tokens"], b["segment_ids"], b["positions"], b["prefix_ids"])
    logits = model.lm_logits(hidden)
    targets = jnp.roll(b["tokens"], -1, axis=-1)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    weights = b["lm_weights"]
    return float(-(log_probs * weights).sum() / weights.sum())


def test_lm_weights_cover_exactly_the_chosen_response(tokenizer):
    data = examples(tokenizer, "codepmp", count=4)
    for shared_prefix in (True, False):
        rows = pack(data, SEQ_LEN, 16, shared_prefix=shared_prefix, with_lm=True)
        expected = sorted(tuple(e.sequences[0][np.flatnonzero(e.lm_mask)].tolist()) for e in data)
        got = []
        for r in rows:
            predicted_at = np.flatnonzero(r["lm_weights"])
            targets = r["tokens"][predicted_at + 1]
            # Split the targets into runs, one per example.
            breaks = np.flatnonzero(np.diff(predicted_at) > 1) + 1
            got += [tuple(run.tolist()) for run in np.split(targets, breaks)]
        assert sorted(got) == expected


def test_common_prefix_leaves_each_candidate_its_reward_token():
    same = [np.array([1, 2, 3]), np.array([1, 2, 3])]
    assert common_prefix_length(same) == 2
    assert common_prefix_length([np.array([1, 2, 3]), np.array([1, 5, 3])]) == 1
    assert common_prefix_length([np.array([4, 2]), np.array([1, 2])]) == 0
    rows = pack([Example(same)], 16, 4, shared_prefix=True, with_lm=False)
    assert rows[0]["chosen_index"][0] == 2 and rows[0]["rejected_index"][0] == 3
    assert rows[0]["positions"][:4].tolist() == [0, 1, 2, 2]
