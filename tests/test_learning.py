"""The shipped tiny configs learn their toy data: held-out accuracy from chance to >= 90%."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


FUSED = ["optimizer.grad_clip=null"]  # the norms stay below 1: clipping would not act
LOMO = ["optimizer.name=lomo", "optimizer.lr=1.0", "train.steps=200", *FUSED]
ADALOMO = ["optimizer.name=adalomo", "optimizer.lr=0.1", "train.steps=150", *FUSED]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny_polar", []),
        ("tiny_codepmp", []),
        # The fused low-memory optimizers reach what AdamW reaches, in fewer steps here.
        ("tiny_polar", LOMO),
        ("tiny_polar", ADALOMO),
    ],
    ids=["tiny_polar", "tiny_codepmp", "tiny_polar-lomo", "tiny_polar-adalomo"],
)
def test_tiny_config_learns_the_toy_data(name, overrides, tmp_path):
    # As a user runs it: from the repository root, on this machine's one CPU device.
    command = ["train", f"configs/{name}.yaml", f"output_dir={tmp_path}", *overrides]
    done = subprocess.run(
        [sys.executable, "-m", "jaxrm", *command],
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    evals = [m["eval/accuracy"] for m in read_metrics(tmp_path) if "eval/accuracy" in m]
    if name == "tiny_polar":  # candidates' styles alone say nothing: untrained is chance
        assert 0.3 <= evals[0] <= 0.7, evals
    assert evals[-1] >= 0.9 and evals[-1] > evals[0], evals
