"""The train benchmark end to end on a tiny model: both sides run (transformers in its own process)
and train the same model, so their first rewards agree. Its timings are not judged here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_TRAIN = Path(__file__).parent.parent / "benchmarks" / "bench_train.py"
TINY = "--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 300"
QUICK = "--warmup 1 --repeats 2 --steps 1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, unit",
    [
        ("--pairs 2 --length 48", "pairs"),
        ("--polar --pairs 2 --prompt 12 --response 20", "triples"),
    ],
)
def test_bench_train_runs_both_sides_on_the_same_model(
    tmp_path: Path, shape: str, unit: str
) -> None:
    out = tmp_path / "bench.json"
    flags = [*TINY.split(), *shape.split(), *QUICK.split(), "--json", str(out)]
    command = [sys.executable, str(BENCH_TRAIN), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["max_reward_difference"] < 1e-4
    assert results["machine"]["transformers_process"] == "separate"
    for side in ("jaxrm", "transformers"):
        assert results[side]["seconds_per_step"] > 0
        assert 0 < results[side]["mfu"] < 1
    ratio = results["jaxrm"]["examples_per_sec"] / results["transformers"]["examples_per_sec"]
    assert results[f"ratio_{unit}_per_sec"] == pytest.approx(ratio)
    assert "jaxrm / transformers:" in done.stdout
