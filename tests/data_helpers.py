"""Shared test material: a SentencePiece tokenizer trained on generated text, and generated rows."""

import json
import random
from pathlib import Path

from jaxrm.toy import train_tokenizer

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
    """jaxrm's toy tokenizer (<|reward|> and <|score|> added) trained on generated sentences."""
    rng = random.Random(0)
    lines = [sentence(rng, rng.randint(3, 15)) for _ in range(3000)]
    return train_tokenizer(lines, directory, vocab_size)


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
