"""Where files live and how they are written: local paths and fsspec URLs (gs://...).

Every output jaxrm writes appears whole or not at all: it is filled under a temporary name beside
its destination and renamed into place when complete, so an interrupted command never leaves a
file or directory that looks finished.
"""

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError


@contextlib.contextmanager
def staged_directory(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to fill, renamed to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            path.rmdir()
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write, renamed to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def require_new_dir(path: str | Path, what: str) -> Path:
    """`path`, absolute, if nothing would be overwritten there."""
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; choose a new {what}")
    return path


def require_local(path: str | Path, what: str) -> None:
    """Refuses a remote path (gs://...) where jaxrm reads and writes through the local filesystem."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)):
        raise UserError(
            f"{what} {path}: remote paths work for data.train and data.eval only; use a directory "
            "every host sees at the same path (a shared disk, or the bucket mounted with gcsfuse)"
        )


def read_text_file(path: str | Path) -> str:
    """A local file's UTF-8 text; one-line errors name the file."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> Any:
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)[0]
    except ImportError as e:
        raise UserError(
            f"{path}: reading this needs an extra package ({e}); for gs:// run pip install gcsfs"
        ) from None


def glob_paths(pattern: str) -> list[str]:
    """The existing paths a local or remote path or glob names, sorted ("**" recurses)."""
    if not is_remote(pattern):
        return (
            sorted(glob.glob(pattern, recursive=True))
            if glob.has_magic(pattern)
            else ([pattern] if Path(pattern).exists() else [])
        )
    fs = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    found = fs.glob(pattern) if glob.has_magic(pattern) else [pattern] * fs.exists(pattern)
    return sorted(p if "://" in p else f"{protocol}://{p}" for p in found)


def is_dir(path: str) -> bool:
    return filesystem(path).isdir(path) if is_remote(path) else Path(path).is_dir()


def write_jsonl(rows: Iterable[dict[str, Any]], out: str | Path) -> None:
    """Writes `rows` to a new JSONL file at `out`, all at once or not at all.

    The rows go to a temporary file beside `out` that is renamed into place when complete, so an
    interrupted build never leaves a partial file that looks finished. An existing `out` is
    refused, not overwritten.
    """
    path = Path(out)
    refuse_existing(path)
    # A random name, not mkstemp: its files are private (0600), the output should not be.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "x", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        refuse_existing(path)
        os.replace(temporary, path)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        temporary.unlink(missing_ok=True)


def refuse_existing(out: str | Path) -> None:
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose a new --out file (nothing was written)")
