"""`jaxrm import` of malformed Hugging Face directories: one line naming the file and the key at
fault, a non-zero exit and nothing at OUT; a valid directory one step from them still imports.

Every bad directory is a valid tiny reward model (made once) with one thing broken."""

import json
import shutil
import struct

import numpy as np
import pytest
import safetensors.numpy
from data_helpers import hf_model

from jaxrm.checkpoint.loading import load_model
from jaxrm.cli import main
from jaxrm.hf.weight_files import ShardedWriter

pytest.importorskip("transformers")

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NORM = "model.norm.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny Llama reward model: hidden 64, 4 heads, 2 KV heads, 2 layers, a one-row score."""
    directory = tmp_path_factory.mktemp("hf") / "base"
    hf_model("llama", "ForSequenceClassification").save_pretrained(directory)
    return directory


def split_header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path, header, data, length=None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def edit_config(change):
    def mutate(directory):
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))

    return mutate


def edit_header(change):
    def mutate(directory):
        header, data = split_header(directory / WEIGHTS)
        change(header)
        write_safetensors(directory / WEIGHTS, header, data)

    return mutate


def edit_tensors(change):
    """Rewrites the weights (headers that tell the truth) after `change` to the tensors."""

    def mutate(directory):
        tensors = safetensors.numpy.load_file(directory / WEIGHTS)
        change(tensors)
        safetensors.numpy.save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})

    return mutate


def write(name, content):
    def mutate(directory):
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return mutate


def write_index(change):
    """An index mapping every tensor to model.safetensors, after `change` to its weight map."""

    def mutate(directory):
        header, _ = split_header(directory / WEIGHTS)
        weight_map = {name: WEIGHTS for name in header if name != "__metadata__"}
        index = {"metadata": {}, "weight_map": change(weight_map)}
        (directory / INDEX).write_text(json.dumps(index))

    return mutate


def huge_header_length(directory):
    header, data = split_header(directory / WEIGHTS)
    write_safetensors(directory / WEIGHTS, header, data, length=2**62)


def header_length_past_the_file(directory):
    header, data = split_header(directory / WEIGHTS)
    write_safetensors(directory / WEIGHTS, header, data, length=len(json.dumps(header)) + 10**7)


def tensor_of_four_tebibytes(header):
    begin = header[NORM]["data_offsets"][0]
    header[NORM].update(shape=[2**40], data_offsets=[begin, begin + 4 * 2**40])


def overlapping_offsets(header):
    header[NORM]["data_offsets"] = header["score.weight"]["data_offsets"]


def truncated(directory):
    raw = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(raw[:-100])


def bin_holding_a_number(directory):
    import torch

    (directory / WEIGHTS).unlink()
    torch.save({NORM: 3}, directory / "pytorch_model.bin")


def tensor_in_another_file(directory):
    safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, directory / "other.safetensors")
    write_index(lambda m: {**m, NORM: "other.safetensors", "x": "other.safetensors"})(directory)


# case -> (how the valid directory is broken, what the one-line error must name)
BAD = {
    "config-not-json": (write("config.json", "{not json"), ["config.json", "not valid UTF-8 JSON"]),
    "config-not-utf8": (write("config.json", b'{"a": "\xff\xfe"}'), ["config.json", "JSON"]),
    "config-a-list": (write("config.json", "[1, 2]"), ["config.json", "JSON object"]),
    "config-lacks-heads": (
        edit_config(lambda c: c.pop("num_attention_heads")),
        ["config.json", "num_attention_heads"],
    ),
    "zero-hidden-size": (
        edit_config(lambda c: c.update(hidden_size=0)),
        ["config.json", "hidden_size"],
    ),
    "negative-layers": (
        edit_config(lambda c: c.update(num_hidden_layers=-2)),
        ["config.json", "num_hidden_layers"],
    ),
    "vocab-a-string": (
        edit_config(lambda c: c.update(vocab_size="256")),
        ["config.json", "vocab_size"],
    ),
    "heads-a-bool": (
        edit_config(lambda c: c.update(num_attention_heads=True)),
        ["config.json", "num_attention_heads"],
    ),
    "kv-heads-do-not-divide-heads": (
        edit_config(lambda c: c.update(num_key_value_heads=3)),
        ["config.json", "num_key_value_heads"],
    ),
    "heads-do-not-divide-hidden": (
        edit_config(lambda c: (c.pop("head_dim"), c.update(num_attention_heads=6))),
        ["config.json", "hidden_size", "num_attention_heads"],
    ),
    "rope-parameters-a-list": (
        edit_config(lambda c: c.update(rope_parameters=[10000.0])),
        ["config.json", "rope_parameters"],
    ),
    "rms-norm-eps-a-string": (
        edit_config(lambda c: c.update(rms_norm_eps="1e-6")),
        ["config.json", "rms_norm_eps"],
    ),
    "two-labels": (
        edit_config(lambda c: c.update(id2label={"0": "bad", "1": "good"})),
        ["config.json", "id2label"],
    ),
    "head-dim-odd": (
        edit_config(lambda c: c.update(head_dim=15)),
        ["config.json", "head_dim"],
    ),
    "jaxrm-block-a-list": (edit_config(lambda c: c.update(jaxrm=[1])), ["config.json", "jaxrm"]),
    "weights-too-short": (write(WEIGHTS, b"\x01\x02"), [WEIGHTS, "too short"]),
    "huge-header-length": (huge_header_length, [WEIGHTS, "header length"]),
    "header-length-past-the-file": (header_length_past_the_file, [WEIGHTS, "header length"]),
    "header-not-json": (
        write(WEIGHTS, struct.pack("<Q", 5) + b"{nope"),
        [WEIGHTS, "not UTF-8 JSON"],
    ),
    "header-a-list": (write(WEIGHTS, struct.pack("<Q", 2) + b"[]"), [WEIGHTS, "JSON object"]),
    "entry-not-an-object": (edit_header(lambda h: h.update({NORM: 5})), [WEIGHTS, NORM]),
    "unknown-dtype": (edit_header(lambda h: h[NORM].update(dtype="F33")), [WEIGHTS, NORM, "F33"]),
    "negative-shape": (edit_header(lambda h: h[NORM].update(shape=[-64])), [WEIGHTS, NORM]),
    "string-shape": (edit_header(lambda h: h[NORM].update(shape=["64"])), [WEIGHTS, NORM]),
    "shape-disagrees-with-offsets": (
        edit_header(lambda h: h[NORM].update(shape=[32])),
        [WEIGHTS, NORM, "data_offsets"],
    ),
    "offsets-not-a-pair": (
        edit_header(lambda h: h[NORM].update(data_offsets=[0])),
        [WEIGHTS, NORM, "data_offsets"],
    ),
    "four-tebibyte-tensor": (edit_header(tensor_of_four_tebibytes), [WEIGHTS, NORM]),
    "overlapping-offsets": (edit_header(overlapping_offsets), [WEIGHTS, "overlapping"]),
    "truncated-weights": (truncated, [WEIGHTS, "truncated"]),
    "score-with-two-rows": (
        edit_tensors(lambda t: t.update({"score.weight": np.zeros((2, 64), np.float32)})),
        [WEIGHTS, "score.weight", "[2, 64]", "[1, 64]"],
    ),
    "transposed-tensor": (
        edit_tensors(lambda t: t.update({DOWN: t[DOWN].T.copy()})),
        [WEIGHTS, DOWN, "[96, 64]"],
    ),
    "missing-tensor": (
        edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        ["model.layers.1.mlp.up_proj.weight"],
    ),
    "index-names-missing-file": (
        write_index(lambda m: {**m, NORM: "model-00002-of-00002.safetensors"}),
        [INDEX, "model-00002-of-00002.safetensors"],
    ),
    "index-weight-map-a-list": (write_index(lambda m: list(m)), [INDEX, "weight_map"]),
    "index-not-json": (write(INDEX, "{"), [INDEX]),
    "index-places-tensor-in-wrong-file": (tensor_in_another_file, [INDEX, NORM]),
    "stray-bytes-after-data": (
        lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes() + b"junk"),
        [WEIGHTS, "stray bytes"],
    ),
    "bin-holding-a-number": (bin_holding_a_number, ["pytorch_model.bin", NORM]),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_hf_directory_is_one_line_error(base, tmp_path, capsys, case):
    mutate, named = BAD[case]
    directory = tmp_path / "hf"
    shutil.copytree(base, directory)
    mutate(directory)
    out = tmp_path / "ckpt"
    assert main(["import", str(directory), str(out)]) != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxrm: error: "), err
    assert all(name in lines[0] for name in named), lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_sharded_float16_model_without_head_dim_still_imports(base, tmp_path, capsys):
    """Several shards with their index, float16 tensors, and head_dim left for jaxrm to derive
    from hidden_size / num_attention_heads."""
    directory = tmp_path / "hf"
    shutil.copytree(base, directory)
    tensors = safetensors.numpy.load_file(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    writer = ShardedWriter(directory, max_shard_bytes=50_000)
    for name, tensor in tensors.items():
        writer.add(name, tensor.astype(np.float16))
    writer.close()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    edit_config(lambda c: c.pop("head_dim"))(directory)
    out = tmp_path / "ckpt"
    assert main(["import", str(directory), str(out)]) == 0, capsys.readouterr().err
    imported = np.asarray(load_model(out).model.score[...], np.float32)[:, 0]
    np.testing.assert_array_equal(imported, tensors["score.weight"][0].astype(np.float16))
