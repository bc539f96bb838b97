"""`jaxrm data stats` and `jaxrm data prepare`."""

import json
import random

import numpy as np
import pytest
from data_helpers import sentence, train_sentencepiece, write_jsonl

from jaxrm.cli import main
from jaxrm.config import load_config
from jaxrm.data.pipeline import train_batches
from jaxrm.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def lognormal_rows(count, seed=0):
    """Prompt, reference and candidates drawn from one log-normal length distribution."""
    rng = random.Random(seed)
    words = lambda: max(1, min(200, int(rng.lognormvariate(3.0, 0.6))))  # noqa: E731
    return [
        {k: sentence(rng, words()) for k in ("prompt", "reference", "chosen", "rejected")}
        for _ in range(count)
    ]


def write_config(tmp_path, tokenizer, *lines):
    """A polar config; each of `lines` ("  key: value" under data:) replaces the default of its
    key (a key given twice is an error)."""
    data = {"tokenizer": f"{tokenizer}", "reward_token": "<|score|>", "seq_len": "4096"}
    data["max_length"] = "1024"
    for line in lines:
        key, _, value = line.strip().partition(":")
        data[key] = value.strip()
    path = tmp_path / "config.yaml"
    body = "".join(f"  {key}: {value}\n" for key, value in data.items())
    path.write_text(f"objective: polar\ndata:\n{body}")
    return path


def test_stats_reports_packing_efficiency_and_shared_prefix_savings(tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", lognormal_rows(400))
    config = write_config(tmp_path, tokenizer)
    assert main(["data", "stats", str(config), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 400 and report["sequences"] == 800
    assert report["unshared"]["packing_efficiency"] >= 0.95
    assert report["shared_prefix"]["packing_efficiency"] >= 0.95
    assert report["shared_prefix_savings"] >= 0.30
    assert sum(b["count"] for b in report["length_histogram"]) == 800

    assert main(["data", "stats", str(config), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "shared-prefix savings" in text and "packing efficiency" in text


def test_prepared_data_trains_on_the_same_batches(tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", lognormal_rows(120, seed=1))
    config_path = write_config(tmp_path, tokenizer, "  seq_len: 1024", "  max_length: 512")
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "data",
                "prepare",
                str(config_path),
                "--data",
                str(data),
                "--out",
                str(out),
                "--shard-size",
                "50",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["examples"] == 120 and len(manifest["shards"]) == 3

    overrides = ["data.seq_len=1024", "data.max_length=512", "train.batch_size=2"]
    raw = load_config(config_path, [f"data.train={data}", *overrides])
    prepared = load_config(config_path, [f"data.train={out}", *overrides])
    from_raw, from_prepared = train_batches(raw), train_batches(prepared)
    for _ in range(10):
        want, got = next(from_raw), next(from_prepared)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_ranked_rows_are_measured_prepared_and_trained_on(tokenizer, tmp_path, capsys):
    rows = lognormal_rows(60, seed=2)
    for row in rows[::3]:  # every third row ranks 3 responses
        row["ranked"] = [row.pop("chosen"), row.pop("rejected"), row["reference"]]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    settings = ["  seq_len: 2048", "  max_length: 512", "  max_candidates: 3"]
    config_path = write_config(tmp_path, tokenizer, *settings)
    assert main(["data", "stats", str(config_path), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 60 and report["sequences"] == 2 * 60 + 20

    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(config_path), "--data", str(data), "--out", str(out)]) == 0
    overrides = ["data.seq_len=2048", "data.max_length=512", "train.batch_size=2"]
    raw = load_config(config_path, [f"data.train={data}", *overrides])
    prepared = load_config(config_path, [f"data.train={out}", *overrides])
    from_raw, from_prepared = train_batches(raw), train_batches(prepared)
    for _ in range(5):
        want, got = next(from_raw), next(from_prepared)
        assert want["reward_index"].shape[-1] == 3
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    fewer = load_config(config_path, [f"data.train={out}", "data.max_candidates=2"])
    with pytest.raises(UserError, match=r"prepared with data\.max_candidates 3"):
        train_batches(fewer)


def test_prepared_data_refuses_other_template_settings(tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", lognormal_rows(5))
    config_path = write_config(tmp_path, tokenizer)
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(config_path), "--data", str(data), "--out", str(out)]) == 0
    config = load_config(config_path, [f"data.train={out}", "data.max_response_length=100"])
    with pytest.raises(UserError, match="max_response_length: 4096 there, 100 here"):
        train_batches(config)
    assert main(["data", "prepare", str(config_path), "--data", str(data), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
