"""Tokenizers: a SentencePiece `.model` or a Hugging Face `tokenizer.json`, behind one interface.

    tokenizer = load_tokenizer("path/to/model_dir")     # or the .model / tokenizer.json file
    ids = tokenizer.encode("text", add_special_tokens=True)

`encode(..., add_special_tokens=True)` adds what the Hugging Face tokenizer would add: BOS for
Llama / InternLM2 vocabularies, nothing for Qwen2. A SentencePiece model reads `add_bos_token`,
`add_eos_token` and the added tokens from a `tokenizer_config.json` beside it, and matches added
tokens in text before encoding the text between them, as transformers' slow tokenizers do.
"""

import abc
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxrm import storage
from jaxrm.errors import UserError


class Tokenizer(abc.ABC):
    """What the data pipeline needs of a tokenizer."""

    path: Path
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abc.abstractmethod
    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets in `text` of each token of `encode(text)`.

        Offsets index the original text (Python characters, not UTF-8 bytes), so
        `text[:end]` is an exact prefix where `decode` would normalise whitespace. A token
        that holds part of a character (a byte of a multi-byte one) or no text at all (a
        SentencePiece word-start marker) has an empty span or shares one with its neighbours.
        """

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None: ...

    @abc.abstractmethod
    def add_special_token(self, token: str) -> int:
        """Makes `token` match as one token in text; returns its id (new ones are refused)."""

    def resolve(self, token: str | int, key: str) -> int:
        """The id of a token given by string or by id; `key` names the setting in errors."""
        if isinstance(token, int):
            if not 0 <= token < self.vocab_size or self.id_to_token(token) is None:
                raise UserError(f"{key}: token id {token} is not in {self.path}")
            return token
        return self.add_special_token(token)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.path = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        settings = _read_json(model_file.parent / "tokenizer_config.json")
        self.add_bos = bool(settings.get("add_bos_token", True))
        self.add_eos = bool(settings.get("add_eos_token", False))
        self.bos_id = _sp_id(self.sp.bos_id())
        self.eos_id = _sp_id(self.sp.eos_id())
        self.pad_id = _sp_id(self.sp.pad_id())
        self.added: dict[str, int] = {}
        for token_id, entry in settings.get("added_tokens_decoder", {}).items():
            self.added[entry["content"]] = int(token_id)
        self.added.update(_read_json(model_file.parent / "added_tokens.json"))
        self.added_by_id = {v: k for k, v in self.added.items()}
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self.special_ids.add(self.sp.unk_id())
        self.special_ids.update(self.added.values())
        self._compile()

    def _compile(self) -> None:
        tokens = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None

    @property
    def vocab_size(self) -> int:
        return max(self.sp.get_piece_size(), max(self.added.values(), default=-1) + 1)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for chunk in self.split.split(text) if self.split else [text]:
            if chunk in self.added:
                ids.append(self.added[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        if add_special_tokens:
            ids = [self.bos_id] * (self.add_bos and self.bos_id is not None) + ids
            ids += [self.eos_id] * (self.add_eos and self.eos_id is not None)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        by_id = self.added_by_id
        parts, run = [], []
        for token_id in ids:
            if token_id in self.special_ids:
                parts.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    parts.append(by_id.get(token_id) or self.sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        offsets: list[tuple[int, int]] = []
        start = 0
        for chunk in self.split.split(text) if self.split else [text]:
            if chunk in self.added:
                offsets.append((start, start + len(chunk)))
            elif chunk:
                # For a str, the binding gives each piece's character offsets; byte-fallback
                # pieces of one character are empty but the last, which covers it.
                pieces = self.sp.encode_as_immutable_proto(chunk).pieces
                offsets += [(start + p.begin, start + p.end) for p in pieces]
            start += len(chunk)
        return offsets

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self.sp.piece_to_id(token)
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.added_by_id:
            return self.added_by_id[token_id]
        return self.sp.id_to_piece(token_id) if token_id < self.sp.get_piece_size() else None

    def add_special_token(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise UserError(f"token {token!r} is not in the vocabulary of {self.path}")
        if token not in self.added:
            self.added[token] = token_id
            self.added_by_id[token_id] = token
            self.special_ids.add(token_id)
            self._compile()
        return token_id


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, tokenizer_file: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = tokenizer_file
        try:
            self.tokenizer = RustTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise UserError(f"{tokenizer_file}: not a readable tokenizer.json ({e})") from None
        settings = _read_json(tokenizer_file.parent / "tokenizer_config.json")
        self.bos_id = self._setting_id(settings, "bos_token")
        self.eos_id = self._setting_id(settings, "eos_token")
        self.pad_id = self._setting_id(settings, "pad_token")

    def _setting_id(self, settings: dict, name: str) -> int | None:
        token = settings.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        return self.tokenizer.token_to_id(token) if isinstance(token, str) else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer.encode(text, add_special_tokens=False).offsets

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def add_special_token(self, token: str) -> int:
        from tokenizers import AddedToken

        token_id = self.token_to_id(token)
        if token_id is None:
            raise UserError(f"token {token!r} is not in the vocabulary of {self.path}")
        added = self.tokenizer.get_added_tokens_decoder().get(token_id)
        if added is None or added.content != token:
            self.tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        return token_id


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a `.model` file, a `tokenizer.json`, or a directory holding either
    (local or a URL)."""
    path = storage.local(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None


def _sp_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


# Kept with the tokenizer files: its stop ids (eos_token_id) are how a chat model ends a turn.
GENERATION_CONFIG = "generation_config.json"


SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_files(source: Path | None) -> dict[str, bytes]:
    """The tokenizer files of a directory, or of one tokenizer file (stored under its canonical
    name, with the side files beside it)."""
    if source is None:
        return {}
    if source.is_file():
        main = "tokenizer.json" if source.suffix == ".json" else "tokenizer.model"
        return {**_files_in(source.parent, SIDE_FILES), main: source.read_bytes()}
    return _files_in(source, (*TOKENIZER_FILES, GENERATION_CONFIG))


def _files_in(directory: Path, names: Sequence[str]) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in names if (directory / name).is_file()}


def copy_tokenizer(source: Path | None, target: Path) -> None:
    files = tokenizer_files(source)
    if files:
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)
