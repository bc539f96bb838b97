"""A small BPE SentencePiece tokenizer trained on generated text, for the toy data and tests.

Nothing is downloaded: the toy configs and the tests train their tokenizer in about a second.
"""

import io
import json
from collections.abc import Iterable
from pathlib import Path

REWARD_MARKER = "<|reward|>"
REWARD_TOKEN = "<|score|>"  # the toy configs' data.reward_token
# SentencePiece's ids for these, then the two user symbols: 4 and 5.
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Trains a BPE SentencePiece model (the kind Llama and InternLM2 use) on `texts`; returns
    out_dir/tokenizer.model.

    At most `vocab_size` pieces (fewer where the texts cannot fill more). <unk> <s> </s> <pad>
    are ids 0-3 and `<|reward|>` `<|score|>` ids 4-5, each always one token. Byte fallback covers
    any text (newlines included), and identity normalisation keeps text as it is, whitespace
    too. Beside the model, a `tokenizer_config.json` in transformers' LlamaTokenizer format: BOS
    added, no EOS, the special tokens and their ids.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # SentencePiece reads sentences; a newline inside one would only be split off again.
        sentence_iterator=(line for text in texts for line in text.splitlines() if line),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        user_defined_symbols=[REWARD_MARKER, REWARD_TOKEN],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,  # one thread: the same texts give the same model bytes
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    tokens = [*SPECIAL_TOKENS.values(), REWARD_MARKER, REWARD_TOKEN]
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        # Text after a special token starts a new SentencePiece text (with its leading space),
        # as in jaxrm's tokenizer and InternLM2's; transformers needs `legacy` to do the same.
        "legacy": True,
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "normalized": False}
            for i, t in enumerate(tokens)
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return path
