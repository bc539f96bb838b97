"""Shared test material: a SentencePiece tokenizer trained on generated text, and generated rows."""

import json
import random
from pathlib import Path

import sentencepiece as spm

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "code",
    "function",
    "return",
    "value",
    "print",
    "list",
    "data",
    "model",
    "reward",
    "policy",
    "answer",
    "question",
    "because",
    "which",
    "while",
    "where",
    "think",
    "first",
    "second",
    "result",
]


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def train_sentencepiece(directory: Path, vocab_size: int = 300) -> Path:
    """A byte-fallback unigram model that keeps newlines, with <|reward|> and <|score|> added."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [sentence(rng, rng.randint(3, 15)) for _ in range(3000)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        user_defined_symbols=["<|reward|>", "<|score|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    corpus.unlink()
    return directory / "tokenizer.model"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def polar_rows(count: int, seed: int = 0, lengths: tuple[int, int] = (3, 12)) -> list[dict]:
    rng = random.Random(seed)
    text = lambda: sentence(rng, rng.randint(*lengths))  # noqa: E731
    return [
        {"prompt": text(), "reference": text(), "chosen": text(), "rejected": text()}
        for _ in range(count)
    ]
