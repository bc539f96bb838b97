"""Rows from the files people keep data in, with random access for a global shuffle.

    source = open_source("data/*.jsonl")         # JSONL, Parquet, ArrayRecord or tfds:...
    where, row = source.read(17)                 # ("data/a.jsonl:18", {...}), parsed

Paths may be local or remote (`gs://...`, through fsspec; install `gcsfs`). ArrayRecord files
hold one JSON row per record. `tfds:NAME[/CONFIG][:VERSION]:SPLIT` reads a prepared TFDS dataset
through `tfds.data_source` (no TensorFlow); its text features become strings. `data/rows.py`
checks what a row holds.

A row over MAX_ROW_BYTES is a bad row, refused before it is parsed (a JSONL line before it is
even read): parsing and tokenising a row take many times its size.
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

# The most one row may take, encoded (a JSONL line, a Parquet row, an ArrayRecord record, a TFDS
# example's features); README.md, "Data".
MAX_ROW_BYTES = 8 << 20
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
    the file in chunks (memory stays bounded however large the file or one line is)."""

    CHUNK = 1 << 24

    def __init__(self, path: str):
        self.path = path
        lines: list[tuple[int, int, int]] = []  # (start, end, line number) of non-blank lines
        # Of a line that runs past the chunk, only where it starts and whether it holds text so
        # far are carried to the next chunk, never its bytes.
        number, line_start, has_text, offset = 0, 0, False, 0
        with _open(path) as f:
            while chunk := f.read(self.CHUNK):
                start = 0
                for newline in np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10):
                    number += 1
                    if has_text or chunk[start:newline].strip():
                        lines.append((line_start, offset + newline + 1, number))
                    start = int(newline) + 1
                    line_start, has_text = offset + start, False
                has_text = has_text or bool(chunk[start:].strip())
                offset += len(chunk)
        if has_text:
            lines.append((line_start, offset, number + 1))
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
        size = int(self.ends[index]) - offset
        _check_size(where, size)
        raw = self._read_bytes(offset, size)
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
        self._group: tuple[int, Any] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.group_starts[-1]

    def read(self, index: int) -> tuple[str, Any]:
        group = bisect.bisect_right(self.group_starts, index) - 1
        with self._lock:  # Grain reads from several threads
            if self._group is None or self._group[0] != group:
                self._group = (group, self.file.read_row_group(group))
            table = self._group[1]
        where = f"{self.path} row {index}"
        row = table.slice(index - self.group_starts[group], 1)  # no copy
        _check_size(where, row.nbytes)
        return where, row.to_pylist()[0]

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
        record = self.records[index]
        _check_size(where, len(record))
        try:
            return where, json.loads(record)
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
        where = f"{self.spec} example {index}"
        example = self.records[index]
        _check_size(where, _size(example))
        return where, _decode_bytes(example)


def _size(value: Any) -> int:
    """Bytes of the texts and arrays in a decoded TFDS example."""
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, dict):
        return sum(map(_size, value.values()))
    if isinstance(value, list | tuple):
        return sum(map(_size, value))
    if isinstance(value, np.ndarray):
        return _size(value.tolist()) if value.dtype == object else value.nbytes
    return 8  # a number


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


def _check_size(where: str, size: int) -> None:
    if size > MAX_ROW_BYTES:
        raise BadRow(
            f"{where}: row over the {MAX_ROW_BYTES >> 20} MiB limit of one row "
            f"({size / (1 << 20):.1f} MiB)"
        )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_rows(spec: str | Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of `spec` (files, globs, tfds:...) in order."""
    source = open_source(spec)
    for index in range(len(source)):
        yield source.read(index)
