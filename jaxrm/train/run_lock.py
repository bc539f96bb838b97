"""One run per run directory: `RUN_DIR/lock`, taken by process 0 for all hosts of its run.

Two trainers writing one run directory would interleave their metrics and race for each
checkpoint step, so the second is refused in one line naming the holder.

- A local run directory (also one on a shared filesystem) is locked with `flock`: the kernel
  drops the lock when its holder exits or is killed, so a preempted run never blocks its restart.
- A bucket has no locks; there the lock is a lease, an object naming its holder that the holder
  renews every `RENEW_SECONDS`. A lease not renewed for `LEASE_SECONDS` (a killed holder) is
  taken over. Object storage cannot make two first writes exclusive, so two starts within the
  same second may both see the lease free; the loser sees the winner's lease when it reads it
  back and stops. The holder reads the lease before each renewal; should another run have
  taken it over (the holder was cut off for longer than the lease), the holder's next save stops
  the run instead of writing into a directory it no longer owns.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from jaxrm import storage
from jaxrm.errors import UserError
from jaxrm.train.distributed import process_0_says

LOCK_FILE = "lock"
RENEW_SECONDS = 20.0
LEASE_SECONDS = 90.0


class Held:
    """A held lock; `check()` stops the run where the lock was lost (a lapsed lease)."""

    def __init__(self, path: storage.PathLike):
        self.path = path
        self.lost: dict[str, Any] | None = None

    def check(self) -> None:
        """Called by every process (process 0 holds the lock and tells the others)."""
        if process_0_says(self.lost is not None):
            raise UserError(
                f"{storage.parent(self.path)} was taken over by "
                f"{_describe(self.lost or {})} after this run's lease lapsed; this run stops "
                "without saving"
            )


@contextlib.contextmanager
def run_lock(run_dir: storage.PathLike) -> Iterator[Held]:
    """Holds `run_dir`'s lock for the whole run (every process enters; process 0 locks)."""
    refusal = None
    held = Held(storage.join(run_dir, LOCK_FILE))
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                lock = _lease if storage.is_remote(run_dir) else _flock
                stack.enter_context(lock(held))
            except UserError as e:
                refusal = e
        if process_0_says(refusal is not None) and refusal is None:
            raise UserError(f"{run_dir} is in use by another run (process 0 says why)")
        if refusal is not None:
            raise refusal
        yield held


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid')} on {holder.get('host')}, started {started}"


@contextlib.contextmanager
def _flock(held: Held) -> Iterator[None]:
    path = Path(held.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            raise UserError(
                f"{path.parent} is in use by another run ({_describe(_parse(file.read()))}); "
                "wait for it to end or choose another output_dir"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps(_holder()))
        file.flush()
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


@contextlib.contextmanager
def _lease(held: Held) -> Iterator[None]:
    path = str(held.path)
    other = _read_lease(path)
    age = time.time() - other.get("renewed", 0) if other else None
    if age is not None and age < LEASE_SECONDS:
        raise UserError(
            f"{storage.parent(path)} is in use by another run ({_describe(other)}, lease renewed "
            f"{age:.0f} s ago; it lapses {LEASE_SECONDS:.0f} s after its last renewal); wait "
            "for it to end or choose another output_dir"
        )
    if other:
        print(
            f"jaxrm: taking over the lapsed lease of {_describe(other)} on {storage.parent(path)}",
            file=sys.stderr,
        )
    mine = {**_holder(), "token": os.urandom(8).hex()}
    _write_lease(path, mine)
    time.sleep(1.0)  # a rival that wrote in the same moment has written by now
    if _read_lease(path).get("token") != mine["token"]:
        raise UserError(f"{storage.parent(path)} was just taken by another run; choose one")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            with contextlib.suppress(Exception):  # a missed renewal is retried at the next one
                current = _read_lease(path)
                if current.get("token", mine["token"]) != mine["token"]:
                    held.lost = current
                    return
                _write_lease(path, mine)

    renewer = threading.Thread(target=renew, name="jaxrm-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if _read_lease(path).get("token") == mine["token"]:
            storage.remove(path)


def _write_lease(path: str, lease: dict[str, Any]) -> None:
    lease["renewed"] = time.time()
    storage.write_bytes(path, json.dumps(lease).encode())


def _read_lease(path: str) -> dict[str, Any]:
    if not storage.is_file(path):
        return {}
    return _parse(storage.read_text_file(path))


def _parse(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
