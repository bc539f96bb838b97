"""jaxrm/storage.py on an fsspec URL (memory://, the same code as gs://) and on local paths."""

import uuid
from pathlib import Path

import pytest

from jaxrm import storage
from jaxrm.errors import UserError


@pytest.fixture
def remote():
    return f"memory://jaxrm-{uuid.uuid4().hex[:8]}"


def test_paths_join_and_split_the_same_way_local_and_remote(tmp_path):
    assert storage.join("gs://b/run/", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.join(tmp_path, "checkpoints", "3") == tmp_path / "checkpoints" / "3"
    assert storage.name("gs://b/run/") == "run" and storage.parent("gs://b/run/x") == "gs://b/run"
    assert storage.absolute("gs://b/run/") == "gs://b/run"
    assert storage.absolute("runs/a") == Path("runs/a").absolute()
    assert not storage.is_remote("file:///tmp/x") and storage.is_remote("s3://b/x")


def test_a_staged_remote_directory_appears_only_when_complete(remote, tmp_path):
    with pytest.raises(RuntimeError), storage.staged_directory(f"{remote}/failed") as staging:
        (staging / "shard").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not storage.exists(f"{remote}/failed")

    with storage.staged_directory(f"{remote}/done", last=("manifest.json",)) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "shard").write_bytes(b"x")
        (staging / "manifest.json").write_text("{}")
    assert storage.list_names(f"{remote}/done") == ["manifest.json", "sub"]
    assert storage.read_bytes(f"{remote}/done/sub/shard") == b"x"
    assert storage.local(f"{remote}/done").joinpath("sub", "shard").read_bytes() == b"x"


def test_write_jsonl_never_replaces_a_remote_file(remote):
    storage.write_jsonl([{"a": 1}], f"{remote}/rows.jsonl")
    with pytest.raises(UserError, match="already exists"):
        storage.write_jsonl([{"a": 2}], f"{remote}/rows.jsonl")
    assert storage.read_text_file(f"{remote}/rows.jsonl") == '{"a": 1}\n'


def test_a_remote_append_goes_on_from_its_uploaded_parts(remote):
    out = f"{remote}/gen/rows.jsonl"
    first = storage.RemoteAppend(out)
    assert not first.local.exists()
    first.local.write_text("1\n2\n3")  # "3" is a line not yet finished: it stays local
    first.flush()
    first.local.write_text("1\n2\n3\n")
    first.flush()
    first.close()
    assert storage.list_names(f"{out}.parts") == ["part-000000.jsonl", "part-000001.jsonl"]

    second = storage.RemoteAppend(out)
    assert second.local.read_text() == "1\n2\n3\n"
    with open(second.local, "a") as f:
        f.write("4\n")
    second.finish()
    second.close()
    assert storage.read_text_file(out) == "1\n2\n3\n4\n"
    assert not storage.exists(f"{out}.parts")
    third = storage.RemoteAppend(out)  # a finished file is taken whole
    assert third.local.read_text() == "1\n2\n3\n4\n"
    third.close()


def test_a_storage_error_a_user_can_fix_is_one_line():
    assert storage.remote_reason(PermissionError("Forbidden")).startswith("permission denied")
    assert storage.remote_reason(FileNotFoundError("bucket x not found")) == (
        "the bucket does not exist"
    )
    assert storage.remote_reason(ValueError("a bug")) is None
    denied = pytest.raises(UserError, match=r"^cannot write to gs://b/x: permission denied")
    with denied, storage.remote_errors("gs://b/x", "write to"):
        raise PermissionError("403 Forbidden")


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_moved_directory_is_whole_at_its_new_place_only(remote, tmp_path, where):
    base = remote if where == "remote" else tmp_path
    source, target = storage.join(base, "checkpoints", "4"), storage.join(base, "damaged", "4")
    storage.write_bytes(storage.join(source, "params", "a"), b"a")
    storage.write_bytes(storage.join(source, "b"), b"b")
    storage.move(source, target)
    assert not storage.exists(source)
    assert storage.read_bytes(storage.join(target, "params", "a")) == b"a"
    assert storage.list_names(target) == ["b", "params"]
