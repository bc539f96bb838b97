"""The Grain pipeline: sources, validation, host sharding and exact resume."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import polar_rows, train_sentencepiece, write_jsonl

from jaxrm.config import load_config
from jaxrm.data.pipeline import eval_batches, train_batches
from jaxrm.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def numbered_rows(count, seed=0):
    rows = polar_rows(count, seed=seed)
    for i, row in enumerate(rows):
        row["margin"] = i  # identifies the row in packed batches
    return rows


def config(tokenizer, train, *overrides):
    return load_config(
        None,
        [
            f"data.train={json.dumps(str(train))}",
            f"data.tokenizer={tokenizer}",
            "data.reward_token=<|score|>",
            "data.seq_len=128",
            "train.batch_size=2",
            *overrides,
        ],
    )


def margins(batch):
    valid = batch["reward_index"][..., 0] >= 0
    return batch["margin"][valid].astype(int).tolist()


def test_restored_iterator_yields_the_same_batches(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(300))
    c = config(tokenizer, train)
    batches = train_batches(c)
    for _ in range(7):
        next(batches)
    state = batches.get_state()
    expected = [next(batches) for _ in range(40)]  # crosses window and epoch boundaries

    restored = train_batches(c)
    restored.set_state(json.loads(json.dumps(state)))  # the state survives JSON
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_hosts_see_disjoint_rows_that_cover_the_data(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(101))
    c = config(tokenizer, train)
    seen = []
    for host in range(2):
        batches = train_batches(c, num_epochs=1, process_index=host, process_count=2)
        seen.append([m for batch in batches for m in margins(batch)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(101))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_a_global_batch_is_the_same_on_any_number_of_hosts(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(150))
    c = config(tokenizer, train, "train.batch_size=4")
    one = train_batches(c, process_index=0, process_count=1)
    two = [train_batches(c, process_index=host, process_count=2) for host in range(2)]
    for _ in range(40):  # crosses windows and epochs
        whole, halves = next(one), [next(host) for host in two]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    evals = [eval_batches(c, str(train), process_index=h, process_count=2) for h in range(2)]
    assert len(evals[0]) == len(evals[1])  # hosts agree on the number of eval steps
    for whole, *halves in zip(eval_batches(c, str(train)), *evals, strict=True):
        np.testing.assert_array_equal(
            whole["tokens"], np.concatenate([h["tokens"] for h in halves])
        )


def test_every_epoch_covers_the_data_once(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(40))
    c = config(tokenizer, train, "train.batch_size=1")
    batches = train_batches(c, num_epochs=3, process_index=0, process_count=1)
    order = [m for batch in batches for m in margins(batch)]
    assert sorted(order) == sorted(list(range(40)) * 3)


def test_sources_agree(tokenizer, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    rows = numbered_rows(30)
    write_jsonl(tmp_path / "a.jsonl", rows[:10])
    pq.write_table(pa.Table.from_pylist(rows[10:20]), tmp_path / "b.parquet", row_group_size=3)
    writer = ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
    for row in rows[20:]:
        writer.write(json.dumps(row).encode())
    writer.close()
    c = config(tokenizer, tmp_path, "data.shuffle=false")
    got = sorted(m for batch in eval_batches(c, str(tmp_path)) for m in margins(batch))
    assert got == list(range(30))


def bad_file(tmp_path):
    rows = [json.dumps(r) for r in numbered_rows(6)]
    rows[1] = '{"prompt": "a", "reference": "b", "chosen": "c"'  # bad JSON
    rows[3] = json.dumps({"prompt": "a", "reference": "b", "chosen": "c"})  # no rejected
    rows[4] = json.dumps({"prompt": "a", "reference": "b", "chosen": "", "rejected": "d"})
    rows.append(json.dumps({"prompt": 3, "reference": "b", "chosen": "c", "rejected": "d"}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (2, "not valid JSON"),
        (4, "field 'rejected' is missing"),
        (5, "field 'chosen' is empty"),
        (7, "field 'prompt' must be a string or a non-empty list"),
    ],
)
def test_bad_rows_name_file_line_and_field(tokenizer, tmp_path, line, message):
    path = bad_file(tmp_path)
    lines = path.read_text().splitlines()
    good = [i for i in (1, 3, 6) if i != line]
    keep = [lines[i - 1] for i in good] + [lines[line - 1]]
    only = tmp_path / "only.jsonl"
    only.write_text("\n".join(keep) + "\n")
    c = config(tokenizer, only, "data.shuffle=false")
    with pytest.raises(UserError, match=f"only.jsonl:{len(keep)}: .*{message}"):
        eval_batches(c, str(only))


def ranked_rows(count, sizes):
    """Numbered rows whose responses are ranked lists of the given sizes, in turn."""
    rows = numbered_rows(count)
    extra = polar_rows(count, seed=1)
    for i, row in enumerate(rows):
        more = [extra[i][k] for k in ("chosen", "rejected", "reference")]
        row["ranked"] = [row.pop("chosen"), row.pop("rejected"), *more][: sizes[i % len(sizes)]]
    return rows


def test_ranked_rows_fill_reward_index_best_first(tokenizer, tmp_path):
    rows = ranked_rows(12, sizes=(2, 3, 4))
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    c = config(tokenizer, path, "data.seq_len=512", "data.max_candidates=4")
    batches = eval_batches(c, str(path))
    seen = {}
    for b in batches:
        assert b["reward_index"].shape == (2, 32, 4)
        valid = b["reward_index"][..., 0] >= 0
        for i, index in zip(b["margin"][valid].astype(int), b["reward_index"][valid], strict=True):
            seen[int(i)] = index
    assert sorted(seen) == list(range(12))
    for i, index in seen.items():
        size = len(rows[i]["ranked"])
        assert (index[:size] >= 0).all() and (index[size:] == -1).all()
        assert (np.diff(index[:size]) > 0).all()  # packed in rank order


def test_ranked_rows_above_max_candidates_are_skipped_when_asked(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(6, sizes=(2, 3)))
    c = config(tokenizer, path, "data.skip_bad_rows=true")
    batches = eval_batches(c, str(path))
    assert sum(int(b["bad_rows"].sum()) for b in batches) == 3
    assert sorted(m for b in batches for m in margins(b)) == [0, 2, 4]


@pytest.mark.parametrize("objective", ["polar", "pairwise", "codepmp"])
@pytest.mark.parametrize(
    ("responses", "message"),
    [
        ({"ranked": ["c", "d"], "chosen": "c"}, "field 'ranked' cannot go with 'chosen'"),
        ({"ranked": ["c", "d"], "rejected": "d"}, "field 'ranked' cannot go with 'rejected'"),
        ({}, "field 'ranked' is missing .*chosen and rejected, or ranked"),
        ({"ranked": ["c"]}, "field 'ranked' must be a list of 2 or more responses"),
        ({"ranked": "c d"}, "field 'ranked' must be a list of 2 or more responses"),
        ({"ranked": ["c", ""]}, r"field 'ranked\[1\]' is empty"),
        ({"ranked": ["c", "d", "e"]}, r"field 'ranked' holds 3 .*data\.max_candidates \(2\)"),
    ],
)
def test_bad_ranked_rows_name_file_line_and_field(
    tokenizer, tmp_path, objective, responses, message
):
    rows = numbered_rows(3)
    rows[1] = {"prompt": "a", "reference": "b", **responses}
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    c = config(tokenizer, path, "data.shuffle=false", f"objective={objective}")
    with pytest.raises(UserError, match=f"ranked.jsonl:2: {message}"):
        eval_batches(c, str(path))


def test_skipped_rows_are_counted(tokenizer, tmp_path):
    path = bad_file(tmp_path)
    c = config(tokenizer, path, "data.skip_bad_rows=true")
    batches = eval_batches(c, str(path))
    assert sum(int(b["bad_rows"].sum()) for b in batches) == 4
    assert sorted(m for b in batches for m in margins(b)) == [0, 2, 5]


def test_every_row_bad_stops_with_one_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join("nope\n" if i % 3 == 0 else '{"prompt": "p"}\n' for i in range(30)))
    c = config(tokenizer, path, "data.skip_bad_rows=true")
    message = (
        rf"^{path}: every row was bad \(30 rows: 20x field 'reference' is missing, "
        r"10x not valid JSON\); nothing to train on"
    )
    with pytest.raises(UserError, match=message):
        next(train_batches(c))
    with pytest.raises(UserError, match=message):
        eval_batches(c, str(path))


def test_one_good_row_among_bad_ones_is_trained_on(tokenizer, tmp_path):
    rows = ['{"prompt": "p"}'] * 60
    rows[17] = json.dumps(numbered_rows(18)[17])
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    c = config(tokenizer, path, "data.skip_bad_rows=true")
    batches = train_batches(c)
    assert {m for _ in range(3) for m in margins(next(batches))} == {17}


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_row_over_the_size_limit_is_a_bad_row(tokenizer, tmp_path, monkeypatch, suffix):
    from jaxrm.data import sources

    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 1 << 20)
    rows = numbered_rows(4)
    rows[2]["chosen"] = "word " * 300_000  # 1.5 MB
    path = tmp_path / f"rows.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    where = f"{path}:3" if suffix == "jsonl" else f"{path} row 2"
    c = config(tokenizer, path, "data.shuffle=false")
    with pytest.raises(
        UserError, match=rf"^{where}: row over the 1 MiB limit of one row \(1\.4 MiB\)"
    ):
        eval_batches(c, str(path))
    skipping = config(tokenizer, path, "data.skip_bad_rows=true")
    batches = eval_batches(skipping, str(path))
    assert sum(int(b["bad_rows"].sum()) for b in batches) == 1
    assert sorted(m for b in batches for m in margins(b)) == [0, 1, 3]


def test_worker_processes_give_the_batches_of_one_process_and_restore(tokenizer, tmp_path):
    rows = [json.dumps(r) for r in numbered_rows(120)]
    rows[7] = rows[40] = "not JSON"
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    # 3 workers share 4 streams unevenly (streams 0 and 3, 1, 2).
    c = config(tokenizer, train, "train.batch_size=4", "data.skip_bad_rows=true")
    with_workers = config(
        tokenizer, train, "train.batch_size=4", "data.skip_bad_rows=true", "data.num_workers=3"
    )
    alone, workers = train_batches(c), train_batches(with_workers)
    skipped = []
    for _ in range(2):
        assert_batches_equal(next(workers), next(alone))
        taken = alone.take_skipped()
        assert workers.take_skipped() == taken
        skipped += taken
    assert skipped and all("train.jsonl:8: " in m or "train.jsonl:41: " in m for m in skipped)
    restored = train_batches(with_workers)
    restored.set_state(workers.get_state())
    for _ in range(4):
        assert_batches_equal(next(restored), next(alone))
    assert restored.take_skipped() == alone.take_skipped()
    one_epoch = train_batches(with_workers, num_epochs=1)
    assert sorted(m for b in one_epoch for m in margins(b)) == sorted(set(range(120)) - {7, 40})


def assert_batches_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_remote_paths_go_through_fsspec(tokenizer, tmp_path):
    import fsspec

    rows = numbered_rows(12)
    fs = fsspec.filesystem("memory")
    for name, part in (("a.jsonl", rows[:5]), ("b.jsonl", rows[5:])):
        with fs.open(f"/bucket/{name}", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in part))
    c = config(tokenizer, "memory://bucket/*.jsonl", "data.shuffle=false")
    got = sorted(m for batch in eval_batches(c, "memory://bucket/*.jsonl") for m in margins(batch))
    assert got == list(range(12))


def test_tfds_rows_are_decoded(tokenizer, tmp_path, monkeypatch):
    # tfds.data_source returns feature dicts with bytes; building a real TFDS dataset needs
    # TensorFlow, so the reader is given what tfds.data_source returns.
    import tensorflow_datasets as tfds

    rows = numbered_rows(6)
    encoded = [{k: v.encode() if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    calls = []

    def data_source(name, split, data_dir):
        calls.append((name, split, data_dir))
        return encoded

    monkeypatch.setattr(tfds, "data_source", data_source)
    c = config(tokenizer, "tfds:prefs/v2:1.0.0:train", f"data.tfds_data_dir={tmp_path}")
    got = sorted(m for b in eval_batches(c, "tfds:prefs/v2:1.0.0:train") for m in margins(b))
    assert got == list(range(6))
    assert calls[0] == ("prefs/v2:1.0.0", "train", str(tmp_path))


def test_bad_row_in_a_worker_process_is_reported(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    c = config(tokenizer, path, "data.num_workers=1")
    with pytest.raises(Exception, match=r"bad\.jsonl:1: field 'reference' is missing"):
        next(train_batches(c))


@pytest.mark.parametrize("chunk", [7, 64, 1 << 24])
def test_jsonl_line_numbers_survive_chunked_scanning(tmp_path, monkeypatch, chunk):
    from jaxrm.data.sources import JsonlSource

    monkeypatch.setattr(JsonlSource, "CHUNK", chunk)
    text = "".join(
        json.dumps({"i": i}) + "\n" + ("\n  \n" if i % 13 == 0 else "") for i in range(100)
    )
    path = tmp_path / "rows.jsonl"
    path.write_text(text.rstrip("\n"))  # the last row has no newline
    source = JsonlSource(str(path))
    lines = text.split("\n")
    for i in range(100):
        where, row = source.read(i)
        assert row == {"i": i}
        assert json.loads(lines[int(where.rsplit(":", 1)[1]) - 1]) == {"i": i}
