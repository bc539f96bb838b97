"""Packed rows (with or without shared prefixes) compute the rewards (and CodePMP LM loss) of each
sequence run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import polar_rows, train_sentencepiece

from jaxrm.config import load_config
from jaxrm.data.packing import common_prefix_length, pack
from jaxrm.data.templates import Example, Template
from jaxrm.data.tokenizer import load_tokenizer
from jaxrm.model.decoder import create_model, rewards_at

SEQ_LEN = 384
MAX_CANDIDATES = 4  # above the longest list here, so pairs and lists both leave -1 entries


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("sp")))


def examples(tokenizer, objective, count=16):
    """Pairs, and every third row a ranked list of 3 responses."""
    template = Template(tokenizer, objective, max_length=SEQ_LEN // 3, reward_token="<|score|>")
    extra = polar_rows(count, seed=4)
    out = []
    for i, row in enumerate(polar_rows(count, seed=3)):
        if i % 3 == 0:
            row["ranked"] = [row.pop("chosen"), row.pop("rejected"), extra[i]["chosen"]]
        example = template(row)
        example.margin = float(i)  # identifies the example after packing reorders them
        out.append(example)
    return out


def batch(rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


@jax.jit
def token_rewards(model, tokens, segment_ids, positions, prefix_ids):
    return model.token_rewards(model(tokens, segment_ids, positions, prefix_ids))


def rewards_by_example(model, rows):
    """{example: its rewards, best response first}, read at each row's `reward_index`."""
    b = batch(rows)
    scores = token_rewards(model, b["tokens"], b["segment_ids"], b["positions"], b["prefix_ids"])
    index, ids = np.stack([r["reward_index"] for r in rows]), np.stack([r["margin"] for r in rows])
    rewards = np.asarray(rewards_at(scores, index.reshape(len(rows), -1))).reshape(index.shape)
    used = index[..., 0] >= 0
    return {
        int(i): r[k >= 0] for i, r, k in zip(ids[used], rewards[used], index[used], strict=True)
    }


def rewards_alone(model, data):
    """{example: its rewards}, each sequence run as the only one of its row."""
    sequences = [s for e in data for s in e.sequences]
    length = max(map(len, sequences))
    tokens, segment_ids, positions = np.zeros((3, len(sequences), length), np.int32)
    for n, s in enumerate(sequences):
        tokens[n, : len(s)], segment_ids[n, : len(s)] = s, 1
        positions[n, : len(s)] = np.arange(len(s))
    scores = token_rewards(model, tokens, segment_ids, positions, np.zeros_like(tokens))
    ends = np.asarray([len(s) - 1 for s in sequences])
    rewards = np.asarray(scores)[np.arange(len(sequences)), ends]
    splits = np.cumsum([len(e.sequences) for e in data])[:-1]
    return dict(enumerate(np.split(rewards, splits)))


def test_reward_index_points_at_each_sequence_reward_token(tokenizer):
    data = examples(tokenizer, "polar")
    for shared_prefix in (True, False):
        rows = pack(data, SEQ_LEN, 16, MAX_CANDIDATES, shared_prefix, objective="pairwise")
        seen = []
        for r in rows:
            assert r["reward_index"].shape == (16, MAX_CANDIDATES)
            for slot in np.flatnonzero(r["reward_index"][:, 0] >= 0):
                example = data[int(r["margin"][slot])]
                index = r["reward_index"][slot]
                count = len(example.sequences)
                assert (index[:count] >= 0).all() and (index[count:] == -1).all()
                got = [packed_sequence(r, i) for i in index[:count]]
                assert all(
                    np.array_equal(g, s) for g, s in zip(got, example.sequences, strict=True)
                )
                seen.append(int(r["margin"][slot]))
        assert sorted(seen) == list(range(len(data)))


def packed_sequence(row, end):
    """The whole sequence whose last token is at `end`: its shared prefix, then its own tokens."""
    segments, prefix = row["segment_ids"], row["prefix_ids"][end]
    assert end + 1 == len(segments) or segments[end + 1] != segments[end]
    in_prefix = (segments == prefix) & (prefix > 0)
    return np.concatenate([row["tokens"][in_prefix], row["tokens"][segments == segments[end]]])


@pytest.mark.parametrize("objective", ["polar", "codepmp"])
def test_packed_rewards_equal_each_sequence_alone(tokenizer, objective):
    config = load_config(None, ["model.dtype=float32", "model.lm_head=true"])
    model = create_model(config.model, seed=0)
    data = examples(tokenizer, objective)
    assert {len(e.sequences) for e in data} == {2, 3}
    with_lm = objective == "codepmp"
    shared = pack(data, SEQ_LEN, 16, MAX_CANDIDATES, shared_prefix=True, objective=objective)
    full = pack(data, SEQ_LEN, 16, MAX_CANDIDATES, shared_prefix=False, objective=objective)
    tokens = lambda rows: sum(int((r["segment_ids"] > 0).sum()) for r in rows)  # noqa: E731
    assert tokens(shared) < tokens(full)
    assert any(r["prefix_ids"].any() for r in shared) and not any(
        r["prefix_ids"].any() for r in full
    )

    want = rewards_alone(model, data)
    for rows in (shared, full):
        got = rewards_by_example(model, rows)
        assert sorted(got) == list(range(len(data)))
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
        rows = pack(data, SEQ_LEN, 16, MAX_CANDIDATES, shared_prefix, objective="codepmp")
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
    three = [np.array([1, 2, 3, 4]), np.array([1, 2, 3]), np.array([1, 5, 3])]
    assert common_prefix_length(three) == 1
    rows = pack([Example(same)], 16, 4, 3, shared_prefix=True, objective="pairwise")
    assert rows[0]["reward_index"][0].tolist() == [2, 3, -1]
    assert rows[0]["positions"][:4].tolist() == [0, 1, 2, 2]
