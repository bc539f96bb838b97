"""Shared test material: a SentencePiece tokenizer trained on generated text, and generated rows."""

import json
import os
import random
from pathlib import Path

from jaxrm.data.toy_tokenizer import train_tokenizer

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


def hf_model(arch: str, kind: str, scale: float = 0.05, **config_keys):
    """A random tiny transformers model (vocab 256, pad id 0) with every weight (norms and
    biases too) non-trivial; `scale` sets the weights' spread (larger: peakier logits)."""
    import torch
    import transformers

    family = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    config_class = getattr(transformers, f"{family}Config")
    shape = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        num_labels=1,
    )
    config = config_class(**{**shape, **config_keys})
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}{kind}")(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            spread = 0.2 if "norm" in name else scale
            param.copy_((1.0 if "norm" in name else 0.0) + spread * torch.randn_like(param))
    return model


def child_xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process a test starts: this process's (conftest.py: LLVM -O1) without its
    eight devices, so one CPU device, or `devices` of them."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def jaxrm_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """`python -m jaxrm ARGS` started in the background with one CPU device, output captured."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "jaxrm", *args],
        cwd=cwd,
        env={**os.environ, "XLA_FLAGS": child_xla_flags(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def trained_run(directory: Path, rows: list, held_out: list, *overrides: str) -> tuple:
    """(run directory, held-out rows file, final metrics) of a tiny run trained on `rows`."""
    from jaxrm.config import load_config
    from jaxrm.train.loop import train

    tokenizer = train_sentencepiece(directory)
    write_jsonl(directory / "train.jsonl", rows)
    held_out_file = write_jsonl(directory / "held_out.jsonl", held_out)
    run = directory / "run"
    settings = tiny_run(directory / "train.jsonl", tokenizer, f"output_dir={run}", *overrides)
    return run, held_out_file, train(load_config(None, [*settings, "train.log_every=10"]))


def tiny_run(train: Path, tokenizer: Path, *overrides: str) -> list[str]:
    """Config overrides of a tiny float32 run on the rows `train` that trains in seconds."""
    return [
        f"data.train={train}",
        f"data.tokenizer={tokenizer}",
        "data.reward_token=<|score|>",
        "data.seq_len=128",
        "train.batch_size=8",
        "model.dtype=float32",
        "optimizer.lr=3e-3",
        *overrides,
    ]
