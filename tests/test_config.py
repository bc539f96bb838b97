import subprocess
import sys
from pathlib import Path

import pytest

from jaxrm.config import dump_config, load_config
from jaxrm.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_misspelled_key_names_the_key_the_file_and_the_nearest_valid_key(tmp_path):
    config = write(tmp_path / "run.yaml", "model:\n  presset: tiny\n")
    with pytest.raises(UserError) as error:
        load_config(config)
    message = str(error.value)
    assert "'model.presset'" in message and str(config) in message
    assert "did you mean 'model.preset'?" in message
    assert "\n" not in message


def test_misspelled_section_and_override_are_named(tmp_path):
    with pytest.raises(UserError, match=r"'trian.steps' \(the command line\).*'train.steps'"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(UserError, match=r"did you mean 'optimizer\.lr'"):
        load_config(None, ["optimizer.lrate=3"])


def test_cli_reports_a_misspelled_key_in_one_line_and_exits_nonzero(tmp_path):
    config = write(tmp_path / "run.yaml", "train:\n  stpes: 10\n")
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm", "config", str(config)], capture_output=True, text=True
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "train.stpes" in lines[0] and "did you mean 'train.steps'" in lines[0]


def test_base_chain_later_keys_win_and_overrides_win_last(tmp_path):
    write(tmp_path / "grand.yaml", "train:\n  steps: 1\n  batch_size: 4\nmodel:\n  num_layers: 3\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "parent.yaml", "base: ../grand.yaml\ntrain:\n  steps: 2\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: parent.yaml\noptimizer:\n  lr: 1e-4\n")
    config = load_config(child, ["train.seed=7"])
    assert (config.train.steps, config.train.batch_size, config.train.seed) == (2, 4, 7)
    assert config.optimizer.lr == 1e-4 and isinstance(config.optimizer.lr, float)
    assert config.model.num_layers == 3


def test_preset_fills_shape_and_explicit_keys_win():
    config = load_config(None, ["model.preset=qwen2-1.5b", "model.num_layers=2"])
    assert config.model.hidden_size == 1536 and config.model.qkv_bias
    assert config.model.num_layers == 2


def test_resolved_config_reloads_to_the_same_config(tmp_path):
    config = load_config(None, ["model.preset=llama3-8b", "mesh.tensor=2", "data.train=[a.jsonl]"])
    dumped = write(tmp_path / "resolved.yaml", dump_config(config))
    assert load_config(dumped) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=ten", "'train.steps' (the command line) must be an integer, got 'ten'"),
        ("objective=dpo", "one of 'polar', 'pairwise', 'codepmp'"),
        ("model.preset=qwen2-1.5", "did you mean 'qwen2-1.5b'"),
        ("model.num_kv_heads=3", "multiple of model.num_kv_heads"),
        ("mesh.rules.embd=fsdp", "did you mean 'mesh.rules.embed'"),
        ("mesh.rules.embed=model", "'model' is not a mesh axis"),
        ("mesh.fsdp=0", "mesh.fsdp must be a positive size or -1"),
        ("train", "not of the form key=value"),
        ("model=3", "'model' (the command line) must be a mapping"),
        ("model.rope_scaling={type: yarn}", "rope_scaling.type 'yarn' is not supported"),
        ("data.seq_len=100000", "exceeds model.max_position_embeddings"),
        ("model.num_kv_heads=0", "model.num_kv_heads must be at least 1, got 0"),
        ("model.hidden_size=-64", "model.hidden_size must be at least 1"),
        ("model.rope_theta=-1", "model.rope_theta must be a positive finite number"),
        ("optimizer.lr=.nan", "optimizer.lr must be a positive finite number, got nan"),
        ("optimizer.lr=.inf", "optimizer.lr must be a positive finite number, got inf"),
        ("optimizer.lr=-1", "optimizer.lr must be a positive finite number"),
        ("optimizer.b1=2", "optimizer.b1 must be in [0, 1), got 2"),
        ("optimizer.grad_clip=-1", "optimizer.grad_clip must be positive or null"),
        ("optimizer.weight_decay=-5", "optimizer.weight_decay must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be 0 or more"),
        ("data.pairs_per_row=0", "data.pairs_per_row must be at least 1"),
        ("train.eval_every=-5", "train.eval_every must be 0 (at the end) or more"),
        (
            "model.rope_scaling={type: linear, factor: abc}",
            "rope_scaling.factor must be a positive",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(UserError) as error:
        load_config(None, ["model.rope_scaling={type: dynamic, factor: 2.0}", override])
    assert message in str(error.value)


def test_base_cycle_and_missing_files_are_user_errors(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    write(tmp_path / "bad.yaml", "model: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    write(tmp_path / "twice.yaml", "train:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(UserError, match=r"key 'steps' appears twice \(line 3\)"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_config(tmp_path / "binary.yaml")


def test_mesh_rules_merge_over_defaults():
    config = load_config(None, ["mesh.rules={embed: null, mlp: [fsdp, tensor]}"])
    assert config.mesh.rules["embed"] is None
    assert config.mesh.rules["mlp"] == ["fsdp", "tensor"]
    assert config.mesh.rules["heads"] == "tensor"


def test_paths_in_a_config_file_are_relative_to_it_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = REPO / "configs" / "tiny_polar.yaml"
    config = load_config(shipped, ["data.eval=rows.jsonl"])
    assert config.data.train == str(REPO / "configs" / "toy" / "polar_train.jsonl")
    assert config.output_dir == str(REPO / "runs" / "tiny_polar")
    assert config.data.eval == str(tmp_path / "rows.jsonl")  # the command line: the cwd
    child = write(
        tmp_path / "exp" / "child.yaml", f"base: {shipped}\ndata:\n  train: [a.jsonl, gs://b/c]\n"
    )
    config = load_config(child)
    assert config.data.train == [str(tmp_path / "exp" / "a.jsonl"), "gs://b/c"]
    assert config.data.tokenizer == str(REPO / "configs" / "toy" / "tokenizer.model")
    assert load_config(write(tmp_path / "dumped.yaml", dump_config(config))) == config


@pytest.mark.slow
def test_a_shipped_config_trains_from_another_directory(tmp_path, monkeypatch):
    from jaxrm.cli import main

    monkeypatch.chdir(tmp_path)
    shipped = REPO / "configs" / "tiny_polar.yaml"
    assert main(["train", str(shipped), "train.steps=2", "output_dir=run"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
