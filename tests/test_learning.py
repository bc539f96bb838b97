"""The shipped tiny configs learn their toy data: held-out accuracy from chance to >= 90%."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_polar", "tiny_codepmp"])
def test_tiny_config_learns_the_toy_data(name, tmp_path):
    # As a user runs it: from the repository root, on this machine's one CPU device.
    done = subprocess.run(
        [sys.executable, "-m", "jaxrm", "train", f"configs/{name}.yaml", f"output_dir={tmp_path}"],
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
