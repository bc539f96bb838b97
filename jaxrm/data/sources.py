"""Rows from the files people keep data in, with random access for a global shuffle.

    source = open_source("data/*.jsonl")         # JSONL, Parquet, ArrayRecord or tfds:...
    where, row = source.read(17)                 # ("data/a.jsonl:18", {...}), parsed

Paths may be local or remote (`gs://...`, through fsspec; install `gcsfs`). ArrayRecord files
hold one JSON row per record. `tfds:NAME[/CONFIG][:VERSION]:SPLIT` reads a prepared TFDS dataset
through `tfds.data_source` (no TensorFlow); its text features become strings. `data/rows.py`
checks what a row holds.
"""

import abc
import bisect
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrm.data.rows import BadRow
from jaxrm.errors import UserError
from jaxrm.storage import glob_paths, is_dir, join, open_read

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".array_record": "array_record",
}


class Source(abc.ABC):
    """Random access to the rows of one file: `read(i)` -> (where, parsed row)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, index: int) -> tuple[str, Any]: ...


class JsonlSource(Source):
    """A JSONL file; blank lines are not rows. Line offsets are found once, up front, reading
    the file in chunks (memory stays bounded however large it is)."""

    CHUNK = 1 << 24

    def __init__(self, path: str):
        self.path = path
        lines: list[tuple[int, int, int]] = []  # (start, end, line number) of non-blank lines
        number, carry, carry_start = 0, b"", 0
        with _open(path) as f:
            while chunk := f.read(self.CHUNK):
                buffer = carry + chunk
                start = 0
                for newline in np.flatnonzero(np.frombuffer(buffer, np.uint8) == 10):
                    number += 1
                    if buffer[start:newline].strip():
                        lines.append((carry_start + start, carry_start + newline + 1, number))
                    start = int(newline) + 1
                carry, carry_start = buffer[start:], carry_start + start
        if carry.strip():
            lines.append((carry_start, carry_start + len(carry), number + 1))
        self.offsets = np.asarray([s for s, _, _ in lines], np.int64)
        self.ends = np.asarray([e for _, e, _ in lines], np.int64)
        self.line_numbers = np.asarray([n for _, _, n in lines], np.int64)
        self._file = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.offsets)

    def _read_bytes(self, offset: int, size: int) -> bytes:
        # Grain reads from several threads: one seek + read at a time on a shared file.
        with self._lock:
            if self._file is None:
                self._file = _open(self.path)
            self._file.seek(offset)
            return self._file.read(size)

    def read(self, index: int) -> tuple[str, Any]:
        where = f"{self.path}:{self.line_numbers[index]}"
        offset = int(self.offsets[index])
        raw = self._read_bytes(offset, int(self.ends[index]) - offset)
        try:
            return where, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRow(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _file=None, _lock=threading.Lock())


class ParquetSource(Source):
    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self.file = pq.ParquetFile(_open(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self._group: tuple[int, list[dict]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.group_starts[-1]

    def read(self, index: int) -> tuple[str, Any]:
        group = bisect.bisect_right(self.group_starts, index) - 1
        with self._lock:  # Grain reads from several threads
            if self._group is None or self._group[0] != group:
                self._group = (group, self.file.read_row_group(group).to_pylist())
            rows = self._group[1]
        return f"{self.path} row {index}", rows[index - self.group_starts[group]]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class ArrayRecordSource(Source):
    def __init__(self, path: str):
        from grain.sources import ArrayRecordDataSource

        self.path = path
        try:
            self.records = ArrayRecordDataSource([path])
        except Exception as e:
            raise UserError(f"{path}: not a readable ArrayRecord file ({e})") from None

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[str, Any]:
        where = f"{self.path} record {index}"
        try:
            return where, json.loads(self.records[index])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRow(f"{where}: not a JSON row ({e})") from None


class TfdsSource(Source):
    def __init__(self, spec: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        self.spec = spec
        name, _, split = spec.removeprefix("tfds:").rpartition(":")
        if not name or not split:
            raise UserError(f"{spec}: a TFDS source is written tfds:NAME[/CONFIG][:VERSION]:SPLIT")
        try:
            self.records = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:
            where = f" in {data_dir}" if data_dir else " (set data.tfds_data_dir)"
            raise UserError(
                f"{spec}: cannot open this TFDS dataset{where}: {_first_line(e)}"
            ) from None

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[str, Any]:
        return f"{self.spec} example {index}", _decode_bytes(self.records[index])


def _decode_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_decode_bytes(v) for v in value]
    if isinstance(value, np.ndarray):
        return _decode_bytes(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


class ConcatSource(Source):
    """Several sources read as one, in the order given."""

    def __init__(self, sources: Sequence[Source]):
        self.sources = list(sources)
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, index: int) -> tuple[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        which = bisect.bisect_right(self.starts, index) - 1
        return self.sources[which].read(index - self.starts[which])


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Paths, globs and directories -> the data files they name, sorted within each entry."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for entry in specs:
        if entry.startswith("tfds:"):
            paths.append(entry)
            continue
        matches = glob_paths(entry)
        if not matches:
            raise UserError(f"no data files match {entry}")
        for match in matches:
            if is_dir(match):
                inside = [p for p in glob_paths(str(join(match, "*"))) if _format(p)]
                if not inside:
                    raise UserError(f"{match}: no .jsonl, .parquet or .array_record files inside")
                paths += inside
            elif _format(match) is None:
                raise UserError(
                    f"{match}: unknown data format (use .jsonl, .parquet, .array_record or tfds:)"
                )
            else:
                paths.append(match)
    return paths


def open_source(spec: str | Sequence[str], tfds_data_dir: str | None = None) -> ConcatSource:
    sources = []
    for path in expand_paths(spec):
        kind = "tfds" if path.startswith("tfds:") else _format(path)
        if kind == "tfds":
            sources.append(TfdsSource(path, tfds_data_dir))
        elif kind == "parquet":
            sources.append(ParquetSource(path))
        elif kind == "array_record":
            sources.append(ArrayRecordSource(path))
        else:
            sources.append(JsonlSource(path))
    return ConcatSource(sources)


def _format(path: str) -> str | None:
    return FORMATS.get(Path(path).suffix)


def _open(path: str) -> Any:
    try:
        return open_read(path)
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_rows(spec: str | Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of `spec` (files, globs, tfds:...) in order."""
    source = open_source(spec)
    for index in range(len(source)):
        yield source.read(index)
