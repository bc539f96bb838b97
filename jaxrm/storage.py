"""Where files live and how they are opened: the one place that knows local paths from URLs.

A path is local (`runs/a`) or a URL of any fsspec filesystem: `gs://bucket/runs/a` (gcsfs, the
same bucket Orbax writes with tensorstore's GCS driver), `s3://`, `memory://`, ... Remote paths
are strings joined with `join`, never with string concatenation.

Every output jaxrm writes appears whole or not at all. Locally it is filled under a temporary
name beside its destination and renamed into place when complete. Object stores cannot rename a
directory at once, so a remote output is filled in a local temporary directory and uploaded with
the file readers look for (a manifest, config.json) last; a single object appears only when its
upload completes.
"""

import argparse
import contextlib
import functools
import glob
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
PathLike = str | Path


def is_remote(path: PathLike) -> bool:
    return bool(URL.match(str(path))) and not str(path).startswith("file://")


def join(base: PathLike, *names: str) -> PathLike:
    """`base/name/...`: a Path for a local base, a URL string for a remote one."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return Path(base, *names)


def absolute(path: PathLike) -> PathLike:
    """A local path made absolute (Path); a URL unchanged (str)."""
    return str(path).rstrip("/") if is_remote(path) else Path(path).absolute()


def name(path: PathLike) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_remote(path) else Path(path).name


def parent(path: PathLike) -> PathLike:
    return posixpath.dirname(str(path).rstrip("/")) if is_remote(path) else Path(path).parent


def filesystem(path: PathLike) -> Any:
    """The fsspec filesystem of a URL (gcsfs for gs://)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(path))[0]
    except ImportError as e:
        raise UserError(
            f"{path}: reading this needs an extra package ({e}); for gs:// run pip install gcsfs"
        ) from None


@contextlib.contextmanager
def remote_errors(path: PathLike, action: str) -> Iterator[None]:
    """Turns what a user can cause on a bucket (missing bucket, no credentials, no permission)
    into one line naming `path`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # gcsfs, google-auth and aiohttp raise many kinds
        reason = remote_reason(e)
        if reason is None:
            raise
        raise UserError(f"cannot {action} {path}: {reason}") from None


def remote_reason(error: BaseException) -> str | None:
    """A one-line reason for a storage error a user can fix, or None for anything else."""
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if any(w in lowered for w in ("anonymous caller", "unauthenticated", "credentials", " 401")):
        return (
            "no credentials (run gcloud auth application-default login, or use a VM service "
            "account)"
        )
    if isinstance(error, PermissionError) or any(
        w in lowered for w in ("403", "forbidden", "permission_denied", "does not have storage.")
    ):
        return "permission denied (the credentials may not write or read there)"
    if "bucket" in lowered and any(w in lowered for w in ("not found", "does not exist", "404")):
        return "the bucket does not exist"
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return f"storage unreachable ({text.splitlines()[0][:200]})"
    return None


def check_bucket(path: PathLike) -> None:
    """Stops with one line when a remote path's bucket does not exist or cannot be reached."""
    if not is_remote(path):
        return
    fs = filesystem(path)
    bucket = str(path).split("://", 1)[1].split("/", 1)[0]
    with remote_errors(path, "use"):
        if not fs.exists(bucket):
            raise UserError(f"cannot use {path}: the bucket {bucket} does not exist")


def check_writable(directory: PathLike) -> None:
    """Writes and removes a small file in `directory` (locally: in its nearest existing parent),
    so a read-only or denied place stops a run in one line before anything is saved there."""
    if not is_remote(directory):
        place = _nearest_existing(Path(directory))
        probe = place / f".jaxrm-write-check-{secrets.token_hex(6)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to {place}: {e.strerror or e}") from None
        return
    check_bucket(directory)
    probe = join(directory, f".jaxrm-write-check-{secrets.token_hex(6)}")
    fs = filesystem(directory)
    with remote_errors(directory, "write to"):
        fs.pipe_file(str(probe), b"")
        fs.rm_file(str(probe))


def free_bytes(directory: PathLike) -> int | None:
    """Free space on the disk that holds (or will hold) a local `directory`; None for a URL."""
    if is_remote(directory):
        return None
    return shutil.disk_usage(_nearest_existing(Path(directory))).free


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where it would be made)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def exists(path: PathLike) -> bool:
    return _ask(path, "exists") if is_remote(path) else Path(path).exists()


def is_dir(path: PathLike) -> bool:
    return _ask(path, "isdir") if is_remote(path) else Path(path).is_dir()


def is_file(path: PathLike) -> bool:
    return _ask(path, "isfile") if is_remote(path) else Path(path).is_file()


def _ask(path: PathLike, question: str) -> bool:
    """A yes/no question to a remote filesystem, never answered from a stale listing (another
    host may have written since)."""
    with remote_errors(path, "read"):
        fs = filesystem(path)
        fs.invalidate_cache()
        return getattr(fs, question)(str(path))


def list_names(directory: PathLike) -> list[str]:
    """The names of the entries of a directory, sorted; none when it does not exist."""
    if not is_remote(directory):
        directory = Path(directory)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    with remote_errors(directory, "list"):
        fs = filesystem(directory)
        fs.invalidate_cache()
        if not fs.isdir(str(directory)):
            return []
        return sorted(
            posixpath.basename(p.rstrip("/")) for p in fs.ls(str(directory), detail=False)
        )


def read_bytes(path: PathLike) -> bytes:
    """A file's bytes; one-line errors name the file."""
    try:
        if is_remote(path):
            with remote_errors(path, "read"):
                return filesystem(path).cat_file(str(path))
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_text_file(path: PathLike) -> str:
    """A file's UTF-8 text; one-line errors name the file."""
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None


def open_read(path: PathLike) -> Any:
    """A binary file object for reading a local or remote file."""
    if is_remote(path):
        with remote_errors(path, "read"):
            return filesystem(path).open(str(path), "rb")
    return open(path, "rb")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a whole file at once (a reader never sees part of it)."""
    with staged_file(path) as staging:
        staging.write_bytes(data)


def remove(path: PathLike) -> None:
    """Removes a file or a directory tree, local or remote; a missing one is no error."""
    if is_remote(path):
        fs = filesystem(path)
        with remote_errors(path, "remove"):
            if fs.exists(str(path)):
                fs.rm(str(path), recursive=True)
    elif Path(path).is_dir():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def move(source: PathLike, target: PathLike) -> None:
    """Moves a file or directory tree to `target` (same filesystem; a bucket copies, then
    deletes), making `target`'s parent if needed."""
    if is_remote(source):
        fs = filesystem(source)
        with remote_errors(source, "move"):
            fs.mv(str(source), str(target), recursive=True)
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)


def upload(local: Path, remote: PathLike, last: Sequence[str] = ()) -> None:
    """Copies a local file, or a directory's files, to `remote`; the files named in `last`
    (relative paths) go after all others, so a reader that looks for them finds the rest."""
    fs = filesystem(remote)
    with remote_errors(remote, "write to"):
        if local.is_file():
            fs.put_file(str(local), str(remote))
            return
        files = sorted(p for p in local.rglob("*") if p.is_file())
        relative = [p.relative_to(local).as_posix() for p in files]
        ordered = sorted(relative, key=lambda r: (r in last, last.index(r) if r in last else 0))
        for rel in ordered:
            fs.put_file(str(local / rel), str(join(remote, *rel.split("/"))))


def download(remote: PathLike, local: Path) -> None:
    """Copies a remote file, or a remote directory tree, to `local`."""
    fs = filesystem(remote)
    with remote_errors(remote, "read"):
        fs.invalidate_cache()
        if fs.isdir(str(remote)):
            base = fs._strip_protocol(str(remote)).rstrip("/")
            for found in fs.find(str(remote)):
                rel = fs._strip_protocol(found)[len(base) :].lstrip("/")
                target = local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(found, str(target))
        elif fs.isfile(str(remote)):
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(str(remote), str(local))
        else:
            raise UserError(f"{remote} does not exist")


@functools.cache
def _cache_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="jaxrm-remote-"))
    import atexit

    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def local(path: PathLike) -> Path:
    """A local path holding what `path` holds: itself when local; for a URL, a copy of the file
    or directory tree downloaded once per process (for small inputs: tokenizers, configs, an HF
    model to import)."""
    if not is_remote(path):
        return Path(path)
    url = str(path).rstrip("/")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = _cache_root() / key / posixpath.basename(url)
    if not target.exists():
        download(url, target)
    return target


@contextlib.contextmanager
def staged_directory(path: PathLike, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local temporary directory to fill that becomes `path` only if the block succeeds:
    renamed into place locally, uploaded (`last` files last) to a URL."""
    if is_remote(path):
        staging = Path(tempfile.mkdtemp(prefix="jaxrm-staging-"))
        try:
            yield staging
            upload(staging, path, last)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    path = Path(path)
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
def staged_file(path: PathLike) -> Iterator[Path]:
    """A local temporary file to write that becomes `path` only if the block succeeds."""
    if is_remote(path):
        handle, staging = tempfile.mkstemp(prefix="jaxrm-staging-")
        os.close(handle)
        try:
            yield Path(staging)
            upload(Path(staging), path)
        finally:
            Path(staging).unlink(missing_ok=True)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name, not mkstemp: its files are private (0600), outputs should not be.
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield staging
        os.replace(staging, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        staging.unlink(missing_ok=True)


def require_new_dir(path: PathLike, what: str) -> PathLike:
    """`path`, absolute, if nothing would be overwritten there."""
    path = absolute(path)
    check_bucket(path)
    if is_file(path) or list_names(path):
        raise UserError(f"{path} already exists and is not empty; choose a new {what}")
    return path


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
    with remote_errors(pattern, "list"):
        fs.invalidate_cache()
        found = fs.glob(pattern) if glob.has_magic(pattern) else [pattern] * fs.exists(pattern)
    return sorted(p if "://" in p else f"{protocol}://{p}" for p in found)


def write_jsonl(rows: Iterable[dict[str, Any]], out: PathLike) -> None:
    """Writes `rows` to a new JSONL file at `out`, all at once or not at all; an existing `out`
    is refused, not overwritten."""
    refuse_existing(out)
    with staged_file(out) as staging:
        with open(staging, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        refuse_existing(out)


def refuse_existing(out: PathLike) -> None:
    if exists(out):
        raise UserError(f"{out} already exists; choose a new --out file (nothing was written)")


class RemoteAppend:
    """An append-only output at a URL, worked on in a local copy.

    Object storage cannot append, so lines appended to `local` are uploaded in parts,
    `OUT.parts/part-000000.jsonl`, ... (complete lines only). A rerun downloads `OUT` itself when
    a run finished it, or else its parts in order, and goes on from their end; `finish` uploads
    the whole file as `OUT` and removes the parts. `side_files` (names beside OUT) are
    downloaded with it and uploaded by `upload_side`.
    """

    def __init__(self, out: PathLike, side_files: Sequence[str] = ()):
        self.out = str(out)
        self.parts = self.out + ".parts"
        self.work = Path(tempfile.mkdtemp(prefix="jaxrm-append-"))
        self.local = self.work / name(out)
        for side in side_files:
            remote_side = join(parent(out), side)
            if is_file(remote_side):
                download(remote_side, self.work / side)
        part_names = [n for n in list_names(self.parts) if n.startswith("part-")]
        if is_file(self.out):
            download(self.out, self.local)
        elif part_names:
            with open(self.local, "wb") as f:
                for part in part_names:
                    f.write(read_bytes(join(self.parts, part)))
        self.part = len(part_names)
        self.uploaded = self.local.stat().st_size if self.local.exists() else 0

    def flush(self, every_seconds: float = 0.0) -> None:
        """Uploads the complete lines appended since the last part (at most every
        `every_seconds`)."""
        now = time.monotonic()
        if every_seconds and now - getattr(self, "_flushed", 0.0) < every_seconds:
            return
        self._flushed = now
        data = self.local.read_bytes()
        end = data.rfind(b"\n") + 1
        if end > self.uploaded:
            upload_bytes(data[self.uploaded : end], join(self.parts, f"part-{self.part:06d}.jsonl"))
            self.part += 1
            self.uploaded = end

    def upload_side(self, side: str) -> None:
        upload(self.work / side, join(parent(self.out), side))

    def finish(self) -> None:
        """`OUT` complete in the bucket, its parts gone."""
        self.flush()
        upload(self.local, self.out)
        remove(self.parts)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def upload_bytes(data: bytes, remote: PathLike) -> None:
    with remote_errors(remote, "write to"):
        filesystem(remote).pipe_file(str(remote), data)


COMPILE_CACHE_ENV = "JAXRM_COMPILE_CACHE"


def add_compile_cache_option(parser: argparse.ArgumentParser) -> None:
    """`--compile-cache DIR` for a command that compiles XLA programs (train, serve, generate)."""
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get(COMPILE_CACHE_ENV, str(Path.home() / ".cache/jaxrm/xla")),
        metavar="DIR",
        help="persistent XLA compilation cache, local or gs://, so a restart (a preempted host, "
        f"a resumed run) skips its compiles (default ${COMPILE_CACHE_ENV} or "
        f"~/.cache/jaxrm/xla; '' here or in ${COMPILE_CACHE_ENV} turns it off)",
    )


def use_compile_cache(directory: str) -> None:
    """XLA programs go to (and come from) `directory` (none: '')."""
    if not directory:
        return
    import jax

    if not is_remote(directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
