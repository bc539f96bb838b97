"""`jaxrm data prefixes`: seeded initial segments of documents, exact slices of their text."""

import argparse
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import sentence, train_sentencepiece, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxrm.data.prefixes import PrefixCounts, add_command, draw_prefixes, prefix_ends
from jaxrm.data.tokenizer import load_tokenizer
from jaxrm.errors import UserError

ODD_TEXTS = [
    "naïve café — 東京 😀 the fox",
    "  two  spaces\n\nand a blank line  ",
    "東京",
    "line one\r\nline two\tand a tab",
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp")).parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE, as Llama 3 and Qwen2 use: non-ASCII characters split into byte tokens."""
    directory = tmp_path_factory.mktemp("hf")
    rng = random.Random(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([sentence(rng, 12) for _ in range(2000)], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(params=["sentencepiece", "hf"])
def tokenizer_dir(request, sp_dir, hf_dir):
    return sp_dir if request.param == "sentencepiece" else hf_dir


def documents(count: int = 30) -> list[str]:
    rng = random.Random(1)
    return [sentence(rng, rng.randint(1, 20)) for _ in range(count)] + ODD_TEXTS


def run_prefixes(*argv) -> None:
    """What `jaxrm data prefixes ARGV` runs, without jaxrm.cli."""
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["prefixes", *map(str, argv)])
    args.run(args)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prompts_are_exact_slices_ending_at_token_l(tmp_path, tokenizer_dir):
    texts = documents()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "prompts.jsonl"
    run_prefixes(
        "--corpus", corpus, "--out", out, "--tokenizer", tokenizer_dir,
        "--min-tokens", 2, "--max-tokens", 9, "--per-document", 3,
    )  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = read_rows(out)
    by_document: dict[str, list[int]] = {}
    for row in rows:
        text = texts[int(row["document"].rsplit(":", 1)[1]) - 1]
        length, prompt = row["prefix_tokens"], row["prompt"]
        offsets = tokenizer.token_offsets(text)
        assert len(offsets) == len(tokenizer.encode(text)) > length
        assert 2 <= length <= 9
        assert text.startswith(prompt) and offsets[length - 1][1] == len(prompt)
        by_document.setdefault(row["document"], []).append(length)
    assert all(len(set(lengths)) == len(lengths) for lengths in by_document.values())
    assert any(len(lengths) == 3 for lengths in by_document.values())
    non_ascii = [row["prompt"] for row in rows if row["document"] == f"{corpus}:31"]
    assert non_ascii and all(ODD_TEXTS[0].startswith(p) for p in non_ascii)


def test_same_seed_same_file_and_another_seed_differs(tmp_path, sp_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in documents()])
    outputs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.jsonl"
        run_prefixes("--corpus", corpus, "--out", out, "--tokenizer", sp_dir, "--seed", seed)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] != outputs[2]


def test_a_documents_prefix_depends_only_on_seed_and_index(sp_dir):
    tokenizer = load_tokenizer(sp_dir)
    texts = documents()
    changed = ["the fox", *texts[1:]]

    def others(docs: list[str]) -> list[dict]:
        rows = draw_prefixes(enumerate(docs), tokenizer, max_tokens=8, per_document=2)
        return [row for row in rows if row["document"] != 0]

    assert others(texts) == others(changed)


def test_short_documents_are_skipped_and_counted(tmp_path, sp_dir, capsys):
    texts = ["", "the", "the quick brown fox jumps over the lazy dog"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "prompts.jsonl"
    run_prefixes("--corpus", corpus, "--out", out, "--tokenizer", sp_dir, "--min-tokens", 4)
    assert [row["document"] for row in read_rows(out)] == [f"{corpus}:3"]
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary
    assert "wrote 1 prefixes" in summary and "from 3 documents" in summary
    assert "skipped 2 documents as too short" in summary


def test_txt_parquet_and_jsonl_inputs(tmp_path, hf_dir):
    (tmp_path / "a.txt").write_bytes("naïve café — 東京\r\nthe quick fox\n".encode())
    (tmp_path / "b.txt").write_text("the lazy dog jumps over the fox")
    pq.write_table(pa.Table.from_pylist([{"body": "the brown dog"}]), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "d.jsonl", [{"body": "first question"}, {"body": "second answer"}])
    out = tmp_path / "prompts.jsonl"
    run_prefixes(
        "--corpus", tmp_path / "*.txt", tmp_path / "c.parquet", tmp_path / "d.jsonl",
        "--out", out, "--tokenizer", hf_dir, "--text-field", "body", "--per-document", 2,
    )  # fmt: skip
    rows = read_rows(out)
    assert list(dict.fromkeys(row["document"] for row in rows)) == [
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.txt"),
        f"{tmp_path / 'c.parquet'} row 0",
        f"{tmp_path / 'd.jsonl'}:1",
        f"{tmp_path / 'd.jsonl'}:2",
    ]
    assert "naïve café — 東京\r\nthe quick fox\n".startswith(rows[0]["prompt"])


def test_cuts_fall_between_characters():
    # SentencePiece: a word-start marker with no text, then byte-fallback pieces of 東 and 京.
    sentencepiece = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 2)]
    assert prefix_ends(sentencepiece, 1, 6) == {4: 1}
    # Byte-level BPE: every byte token of a character spans the whole character.
    byte_level = [(0, 1)] * 3 + [(1, 2)] * 3 + [(2, 5)]
    assert prefix_ends(byte_level, 1, 6) == {3: 1, 6: 2}
    # A prepended "▁" maps onto the first character, which the next token covers too.
    metaspace = [(0, 1), (0, 1), (1, 5), (5, 9)]
    assert prefix_ends(metaspace, 1, 3) == {2: 1, 3: 5}
    assert prefix_ends(metaspace, 3, 3) == {3: 5}


def test_token_offsets_slice_the_original_text(sp_dir, hf_dir):
    text = "x<|reward|>naïve 東京 😀  the\nfox"
    sp = load_tokenizer(sp_dir)
    offsets = sp.token_offsets(text)
    assert len(offsets) == len(sp.encode(text))
    assert (1, 11) in offsets and text[11:].startswith("naïve")
    hf = load_tokenizer(hf_dir)
    assert hf.token_offsets(text)[-1][1] == len(text) == sp.token_offsets(text)[-1][1]


def test_every_length_in_range_is_drawn(sp_dir):
    text = "the quick brown fox jumps over the lazy dog"
    tokenizer = load_tokenizer(sp_dir)
    counts = PrefixCounts()
    rows = list(draw_prefixes([("doc", text)], tokenizer, per_document=1000, counts=counts))
    usable = prefix_ends(tokenizer.token_offsets(text), 1, len(tokenizer.encode(text)) - 1)
    assert [row["prefix_tokens"] for row in rows] == sorted(usable)
    assert counts.fewer_lengths == 1 and counts.prefixes == len(usable)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"body": "the fox"}, "corpus.jsonl:2: field 'text' is missing"),
        ({"text": ["the", "fox"]}, "corpus.jsonl:2: field 'text' must be a string, got list"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, sp_dir, row, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "the fox"}, row])
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(UserError, match=message) as error:
        run_prefixes("--corpus", corpus, "--out", out, "--tokenizer", sp_dir)
    assert "\n" not in str(error.value) and not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-tokens", 0], "--min-tokens must be at least 1"),
        (["--min-tokens", 5, "--max-tokens", 4], r"--max-tokens \(4\) is smaller"),
        (["--per-document", 0], "--per-document must be at least 1"),
        (["--corpus", "nothing/*.jsonl"], "--corpus: no files match nothing/"),
    ],
)
def test_bad_options_name_the_flag(tmp_path, sp_dir, flags, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "the fox"}])
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(UserError, match=message) as error:
        run_prefixes("--corpus", corpus, "--out", out, "--tokenizer", sp_dir, *flags)
    assert "\n" not in str(error.value) and not out.exists()


def test_an_existing_out_file_is_refused(tmp_path, sp_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "the quick fox"}])
    out = tmp_path / "prompts.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(UserError, match="already exists"):
        run_prefixes("--corpus", corpus, "--out", out, "--tokenizer", sp_dir)
    assert out.read_text() == "keep me\n"
