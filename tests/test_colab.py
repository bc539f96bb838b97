"""The Colab notebooks, executed top to bottom with nbclient on this machine's CPU.

The kernel imports this checkout's jaxrm (PYTHONPATH), sees a stated number of CPU devices (this
pytest process has 8 from conftest.py) and has the Hugging Face hub switched off. `!command`
lines fail their cell when the command fails, as a reader would notice in its output.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from data_helpers import polar_rows, train_sentencepiece, write_jsonl
from nbclient import NotebookClient
from test_hf import hf_model

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"

# Run first in the kernel: a failed shell command raises instead of printing and going on.
CHECKED_SHELL = """
_ip = get_ipython()
_shell = _ip.system


def _checked_shell(command):
    _shell(command)
    if _ip.user_ns["_exit_code"]:
        raise RuntimeError(f"!{command} exited with status {_ip.user_ns['_exit_code']}")


_ip.system = _checked_shell
"""


def load_notebook(name: str) -> nbformat.NotebookNode:
    """The notebook as saved, checked to be valid nbformat 4 without outputs."""
    notebook = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: saved with outputs"
    return notebook


def kernel_env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    python_path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ,
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(python_path),
        # `!jaxrm` finds the console script of this Python even where its venv is not activated.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }


def execute(notebook: nbformat.NotebookNode, cwd: Path, devices: int) -> str:
    """Runs every cell (a cell error fails the test); returns the text the cells printed."""
    notebook.cells.insert(0, nbformat.v4.new_code_cell(CHECKED_SHELL, id="checked-shell"))
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=kernel_env(devices))
    return "".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def has_image(notebook: nbformat.NotebookNode) -> bool:
    return any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def tagged(notebook: nbformat.NotebookNode, tag: str) -> int:
    """The index of the one cell tagged `tag`."""
    found = [i for i, c in enumerate(notebook.cells) if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"{len(found)} cells tagged {tag}"
    return found[0]


def number(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in the notebook's output"
    return [float(g) for g in match.groups()]


@pytest.mark.slow
def test_quickstart_trains_evaluates_exports_and_matches_transformers(tmp_path):
    notebook = load_notebook("quickstart.ipynb")
    text = execute(notebook, tmp_path, devices=1)  # a Colab CPU runtime has one device

    before, after = number(r"held-out accuracy: ([\d.]+) untrained -> ([\d.]+)", text)
    assert after >= before + 0.1, (before, after)
    (evaluated,) = number(r"accuracy ([\d.]+) on 100 held-out triples", text)
    assert abs(evaluated - after) <= 0.011  # jaxrm eval agrees with the run's last evaluation
    assert has_image(notebook)
    assert len(re.findall(r"jaxrm [-+][\d.]+   transformers [-+][\d.]+", text)) == 8
    (difference,) = number(r"largest difference: (\S+)", text)
    assert difference < 1e-4


def base_model_stand_in(directory: Path) -> Path:
    """A random Llama reward model with the `tiny` preset's shape and a tokenizer, in place of
    the hub's POLAR-1.8B-Base."""
    model = hf_model(
        "llama",
        "ForSequenceClassification",
        vocab_size=1024,
        intermediate_size=128,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    )
    model.save_pretrained(directory)
    train_sentencepiece(directory)
    return directory


@pytest.mark.slow
def test_tpu_finetune_notebook_runs_on_cpu_with_a_tiny_stand_in(tmp_path):
    notebook = load_notebook("polar_finetune_tpu.ipynb")
    model_dir = base_model_stand_in(tmp_path / "POLAR-stand-in")
    train = write_jsonl(tmp_path / "train.jsonl", polar_rows(32, seed=1))
    held_out = write_jsonl(tmp_path / "eval.jsonl", polar_rows(16, seed=2))
    parameters = dict(
        PRESET="tiny",
        REWARD_TOKEN_ID=5,  # the test tokenizer's <|score|>
        TRAIN_DATA=str(train),
        EVAL_DATA=str(held_out),
        STEPS=4,
        BATCH_SIZE=4,
        SEQ_LEN=256,
        LR=1e-4,
        DTYPE="float32",
        EXPORT_DTYPE="float32",
        PLATFORM="cpu",
    )
    injected = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(
        tagged(notebook, "parameters") + 1, nbformat.v4.new_code_cell(injected, id="injected")
    )
    notebook.cells[tagged(notebook, "hub-download")].source = f"MODEL_DIR = {str(model_dir)!r}"

    # Four devices, so that the mesh's fsdp=-1 really splits the model (a TPU has 4 or 8 chips).
    text = execute(notebook, tmp_path, devices=4)

    assert "CpuDevice(id=3)" in text
    assert re.search(r"step +4: held-out accuracy", text)
    run, exported = number(r"accuracy: run ([\d.]+), export ([\d.]+)", text)
    assert run == exported  # a float32 export scores exactly as the run
    config = json.loads((tmp_path / "polar-finetune" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForRewardModel"]
    assert config["reward_token_id"] == 5
    assert has_image(notebook)
