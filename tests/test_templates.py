"""Token-for-token templates (METHODS.md §1, §2) on a SentencePiece model trained here."""

import numpy as np
import pytest
import sentencepiece as spm
from data_helpers import train_sentencepiece

from jaxrm.data.templates import Template
from jaxrm.data.tokenizer import load_tokenizer
from jaxrm.errors import UserError

BOS = 1  # bos_id of the trained SentencePiece model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp(model_file):
    return spm.SentencePieceProcessor(model_file=str(model_file))


def template(model_file, objective="polar", **settings):
    settings = {"max_length": 4096, "reward_token": "<|score|>", **settings}
    return Template(load_tokenizer(model_file), objective, **settings)


def ids(sp, *parts):
    """Expected ids: strings are SentencePiece-encoded on their own, ints kept as they are."""
    out = []
    for part in parts:
        out += sp.encode(part) if isinstance(part, str) else [part]
    return out


def polar(t, row, wrapper=None):
    return [
        s.tolist() for s in t.polar(row["prompt"], row["reference"], row["candidates"], wrapper)
    ]


def test_polar_sft_wrapper(model_file, sp):
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    row = {
        "prompt": "the quick fox",
        "reference": "dog code",
        "candidates": ["lazy data", "answer"],
    }
    chosen, rejected = polar(template(model_file), row)
    p = "the quick fox"
    assert chosen == ids(sp, BOS, f"{p}\ndog code", marker, f"{p}\nlazy data", score)
    assert rejected == ids(sp, BOS, f"{p}\ndog code", marker, f"{p}\nanswer", score)


def test_polar_pretrain_wrapper_and_row_override(model_file, sp):
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    row = {"prompt": "the quick", "reference": " fox jumps", "candidates": [" dog", " code"]}
    expected = ids(sp, BOS, "the quick fox jumps", marker, "the quick dog", score)
    assert polar(template(model_file), row, "pretrain")[0] == expected
    example = template(model_file)(
        {
            "prompt": "the quick",
            "reference": " fox jumps",
            "chosen": " dog",
            "rejected": " code",
            "wrapper": "pretrain",
        }
    )
    assert example.sequences[0].tolist() == expected
    assert polar(template(model_file, wrapper="pretrain"), row)[0] == expected


def test_polar_flattens_messages_and_skips_separator_for_empty_reference(model_file, sp):
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    row = {
        "prompt": [
            {"role": "system", "content": "think first"},
            {"role": "user", "content": "why"},
        ],
        "reference": [{"role": "assistant", "content": ""}],
        "candidates": [[{"role": "assistant", "content": "because"}, {"content": "result"}], "x"],
    }
    chosen, _ = polar(template(model_file), row)
    p = "think first\nwhy"
    assert chosen == ids(sp, BOS, p, marker, f"{p}\nbecause\nresult", score)


def test_polar_responses_keep_their_head(model_file, sp):
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    reference = "the quick brown fox jumps over the lazy dog"
    candidate = "print list data model reward policy answer"
    row = {"prompt": "why", "reference": reference, "candidates": [candidate, "dog"]}
    # max_response_length counts BOS, as xtuner's add_special_tokens=True lengths do.
    chosen, rejected = polar(template(model_file, max_response_length=5), row)
    head_ref = sp.decode(sp.encode(reference)[:4])
    head_candidate = sp.decode(sp.encode(candidate)[:4])
    assert len(sp.encode(reference)) > 4 and len(sp.encode(candidate)) > 4
    assert chosen == ids(sp, BOS, f"why\n{head_ref}", marker, f"why\n{head_candidate}", score)
    assert rejected == ids(sp, BOS, f"why\n{head_ref}", marker, "why\ndog", score)


def test_polar_prompt_is_cut_from_the_left(model_file, sp):
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    prompt = "first second result which while where think"
    row = {"prompt": prompt, "reference": "dog", "candidates": ["fox jumps", "code"]}
    reference_len, longest = len(sp.encode("dog")) + 1, len(sp.encode("fox jumps")) + 1
    prompt_ids = [BOS, *sp.encode(prompt)]
    # A cut at a word boundary, so the decoded tail re-encodes to the same tokens.
    keep = next(k for k in range(5, 12) if sp.id_to_piece(prompt_ids[-k]).startswith("▁"))
    max_length = 2 * keep + reference_len + longest + 4  # budget formula of METHODS.md §1
    chosen, _ = polar(template(model_file, max_length=max_length), row)
    tail = sp.decode(prompt_ids[-keep:])
    assert len(prompt_ids) > keep and tail != prompt
    assert chosen == ids(sp, BOS, f"{tail}\ndog", marker, f"{tail}\nfox jumps", score)
    assert len(chosen) <= max_length


def test_polar_never_exceeds_max_length(model_file, sp):
    # Cut mid-word, the decoded prompt tail re-encodes longer; the prompt then gives way.
    prompt = "first second result which while where think " * 3
    row = {"prompt": prompt, "reference": "dog", "candidates": ["fox jumps", "code"]}
    for max_length in range(12, 40):
        chosen, rejected = polar(template(model_file, max_length=max_length), row)
        assert len(chosen) <= max_length and len(rejected) <= max_length


def test_polar_without_room_for_a_prompt_keeps_none(model_file, sp):
    row = {"prompt": "the quick fox", "reference": "dog", "candidates": ["code", "data"]}
    reference_len, longest = len(sp.encode("dog")) + 1, len(sp.encode("code")) + 1
    chosen, _ = polar(template(model_file, max_length=reference_len + longest + 4 + 1), row)
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    assert chosen == ids(sp, BOS, "\ndog", marker, "\ncode", score)


def test_tokens_by_id(model_file, sp):
    marker = sp.piece_to_id("<|reward|>")
    score = sp.piece_to_id("<|score|>")
    by_id = template(model_file, reward_marker=marker, reward_token=score)
    by_string = template(model_file)
    row = {"prompt": "why", "reference": "dog", "candidates": ["fox", "code"]}
    assert polar(by_id, row) == polar(by_string, row)
    with pytest.raises(UserError, match=r"data\.reward_token"):
        template(model_file, reward_token=100_000)
    with pytest.raises(UserError, match="not in the vocabulary"):
        template(model_file, reward_marker="<|nope|>")


def test_codepmp_template_and_lm_mask(model_file, sp):
    score = sp.piece_to_id("<|score|>")
    t = template(model_file, "codepmp")
    example = t({"prompt": "print list", "chosen": "return value", "rejected": "data"})
    prompt = [BOS, *sp.encode("print list\n")]
    chosen_response = sp.encode("return value")
    assert example.sequences[0].tolist() == [*prompt, *chosen_response, score]
    assert example.sequences[1].tolist() == [*prompt, *sp.encode("data"), score]
    mask = [0] * len(prompt) + [1] * len(chosen_response) + [0]
    assert example.lm_mask.tolist() == mask


def test_codepmp_truncation(model_file, sp):
    score = sp.piece_to_id("<|score|>")
    prompt = "first second result which while where think"
    chosen = "return value print list data model reward policy"
    t = template(model_file, "codepmp", max_length=16, max_response_length=4)
    example = t({"prompt": prompt, "chosen": chosen, "rejected": "data"})
    keep = 16 - 1 - 1 - 4  # budget minus BOS, minus the longest response
    expected = [BOS, *sp.encode(prompt + "\n")[-keep:], *sp.encode(chosen)[:4], score]
    assert example.sequences[0].tolist() == expected
    assert len(expected) == 16
    assert np.sum(example.lm_mask) == 4


def test_pairwise_has_no_lm_mask(model_file):
    example = template(model_file, "pairwise")({"prompt": "a", "chosen": "b", "rejected": "c"})
    assert example.lm_mask is None and len(example.sequences) == 2


@pytest.mark.parametrize("count", [3, 4])
def test_polar_ranked_row_gives_a_sequence_per_response_best_first(model_file, sp, count):
    marker, score = sp.piece_to_id("<|reward|>"), sp.piece_to_id("<|score|>")
    ranked = ["lazy data", [{"role": "assistant", "content": "answer"}], "fox jumps", "code"]
    row = {"prompt": "the quick fox", "reference": "dog code", "ranked": ranked[:count]}
    example = template(model_file)(row)
    p = "the quick fox"
    expected = [
        ids(sp, BOS, f"{p}\ndog code", marker, f"{p}\n{c}", score)
        for c in ["lazy data", "answer", "fox jumps", "code"][:count]
    ]
    assert [s.tolist() for s in example.sequences] == expected


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("objective", ["pairwise", "codepmp"])
def test_ranked_row_gives_a_sequence_per_response_best_first(model_file, sp, objective, count):
    score = sp.piece_to_id("<|score|>")
    ranked = ["return value", "data", "print list", "model reward"][:count]
    example = template(model_file, objective)({"prompt": "why", "ranked": ranked})
    prompt = [BOS, *sp.encode("why\n")]
    expected = [[*prompt, *sp.encode(c), score] for c in ranked]
    assert [s.tolist() for s in example.sequences] == expected
    if objective == "codepmp":  # the LM targets are the best response's tokens
        best = sp.encode(ranked[0])
        assert example.lm_mask.tolist() == [0] * len(prompt) + [1] * len(best) + [0]
    else:
        assert example.lm_mask is None
