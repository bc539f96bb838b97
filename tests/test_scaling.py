"""Power-law fits, the N / C / L of a run and `jaxrm scaling fit` over synthetic run directories."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from jaxrm import cli
from jaxrm.config import config_from_dict, dump_config
from jaxrm.errors import UserError
from jaxrm.train.flops import train_flops_per_token
from jaxrm.train.scaling import PowerLaw, add_command, fit_power_law, run_point

SEQ_LEN = 128
# (hidden_size, intermediate_size, num_layers) of five models around the tiny preset.
SHAPES = [(32, 64, 1), (48, 96, 2), (64, 128, 2), (96, 192, 3), (128, 256, 4)]


def model_keys(shape: tuple[int, int, int]) -> dict:
    hidden, intermediate, layers = shape
    return {
        "preset": "tiny",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_layers": layers,
    }


def non_embedding_params(shape: tuple[int, int, int]) -> int:
    """By hand for the tiny preset's 4 heads, 2 kv heads of 16: q, k, v, o kernels, SwiGLU and
    two norms per layer, then the final norm and the reward head."""
    hidden, intermediate, layers = shape
    attention = hidden * 4 * 16 * 2 + hidden * 2 * 16 * 2
    return layers * (attention + 3 * hidden * intermediate + 2 * hidden) + 2 * hidden


def flops(shape: tuple[int, int, int], tokens: int) -> float:
    model = config_from_dict({"model": model_keys(shape)}).model
    return train_flops_per_token(model, SEQ_LEN, lm_head=False) * tokens


def metrics_lines(loss: float, tokens: int, shape: tuple[int, int, int]) -> list[dict]:
    """Train lines every 10 steps to 110 whose cumulative tokens reach `tokens` at step 100 (and
    FLOPs those of a `shape` model), and eval lines at steps 50 and 100, the last with `loss`."""
    train = [
        {
            "step": s,
            "loss": 1.0,
            "tokens": tokens * s // 100,
            "flops": flops(shape, tokens * s // 100),
        }
        for s in range(10, 120, 10)
    ]
    evals = [{"step": 50, "eval/loss": 9.0}, {"step": 100, "eval/loss": loss}]
    return [*train[:5], evals[0], *train[5:10], evals[1], train[10]]


def write_run(
    run_dir: Path, shape: tuple[int, int, int], lines: list[dict], **config: object
) -> Path:
    model = {**model_keys(shape), **config.pop("model", {})}  # type: ignore[dict-item]
    raw = {"model": model, "data": {"seq_len": SEQ_LEN}, **config}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config_from_dict(raw)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def jaxrm_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`jaxrm.cli.main` (its error handling included) over a parser with only `scaling`."""
    parser = argparse.ArgumentParser(prog="jaxrm")
    add_command(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    return cli.main(argv)


def test_fit_recovers_an_exact_power_law() -> None:
    x = np.geomspace(1e6, 1e12, 7)
    fit = fit_power_law(x, 0.9 * x**-0.0425)
    assert fit.a == pytest.approx(0.9, abs=1e-9)
    assert fit.b == pytest.approx(-0.0425, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.n == 7
    assert str(fit) == "L = 0.9000 · X^-0.0425  (R² 1.000, 7 runs)"
    assert fit.equation("C") == "L = 0.9000 · C^-0.0425  (R² 1.000, 7 runs)"


def test_fit_with_noise_is_close_and_its_r2_falls_as_noise_grows() -> None:
    x = np.geomspace(1e6, 1e12, 20)
    noise = np.random.default_rng(0).normal(size=x.size)
    quiet = fit_power_law(x, 0.9 * x**-0.0425 * np.exp(0.002 * noise))
    loud = fit_power_law(x, 0.9 * x**-0.0425 * np.exp(0.1 * noise))
    assert quiet.a == pytest.approx(0.9, rel=0.02)
    assert quiet.b == pytest.approx(-0.0425, abs=1e-3)
    assert 0.99 < quiet.r2 < 1.0
    assert loud.r2 < 0.9


def test_fit_needs_two_distinct_x() -> None:
    with pytest.raises(UserError, match="at least 2 runs with distinct N; got 3 run"):
        fit_power_law([5.0, 5.0, 5.0], [1.0, 2.0, 3.0], "N")


def test_run_point_takes_the_last_eval_loss_and_the_tokens_trained_by_then(
    tmp_path: Path,
) -> None:
    shape = SHAPES[1]
    point = run_point(write_run(tmp_path / "run", shape, metrics_lines(2.5, 40_000, shape)))
    assert (point.step, point.value, point.metric) == (100, 2.5, "eval/loss")
    assert point.params == non_embedding_params(shape)
    assert point.flops == pytest.approx(flops(shape, 40_000))  # not the 44,000 of step 110
    train_loss = run_point(tmp_path / "run", "loss")
    assert (train_loss.step, train_loss.value) == (110, 1.0)


@pytest.mark.parametrize(
    "config",
    [
        {"objective": "codepmp", "model": {"lm_head": True}},
        {"objective": "codepmp", "model": {"lm_head": True, "tie_embeddings": True}},
        {"model": {"tie_embeddings": True}},
        {"model": {"lora_rank": 4}},
    ],
)
def test_params_leave_out_embeddings_lm_head_and_adapters(tmp_path: Path, config: dict) -> None:
    point = run_point(
        write_run(tmp_path / "run", SHAPES[2], metrics_lines(2.0, 1000, SHAPES[2]), **config)
    )
    assert point.params == non_embedding_params(SHAPES[2])


def test_fit_command_recovers_a_law_in_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    runs = [
        write_run(tmp_path / f"n{i}", shape, metrics_lines(2.4 * n**-0.076, 50_000, shape))
        for i, shape in enumerate(SHAPES)
        for n in [non_embedding_params(shape)]
    ]
    out = tmp_path / "plots" / "scaling.png"
    assert jaxrm_main(["scaling", "fit", *map(str, runs), "--out", str(out)], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "L = 2.400 · N^-0.0760  (R² 1.000, 5 runs)" in printed
    assert str(runs[0]) in printed and f"plot: {out}" in printed
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 1000


def test_fit_command_recovers_a_law_in_compute_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tokens = [10_000 * 3**i for i in range(len(SHAPES))]
    runs = [
        write_run(
            tmp_path / f"c{i}", shape, metrics_lines(1.7 * flops(shape, t) ** -0.05, t, shape)
        )
        for i, (shape, t) in enumerate(zip(SHAPES, tokens, strict=True))
    ]
    monkeypatch.chdir(tmp_path)
    assert jaxrm_main(["scaling", "fit", *map(str, runs), "--json"], monkeypatch) == 0
    report = json.loads(capsys.readouterr().out)
    fit = PowerLaw(**report["fits"]["C"])
    assert fit.a == pytest.approx(1.7, rel=1e-9)
    assert fit.b == pytest.approx(-0.05, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.n == 5
    assert [r["run"] for r in report["runs"]] == [str(r) for r in runs]
    assert report["plot"] == "scaling.png" and (tmp_path / "scaling.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"{bad} is not a directory"),
        ("no metrics", r"{bad}/metrics.jsonl does not exist"),
        ("no eval", r"{bad}: no line of metrics.jsonl has eval/loss"),
        ("no flops", r"{bad}: metrics.jsonl has no train line with `flops` at or before"),
        ("single", r"fitting L against C needs at least 2 runs with distinct C; got 1 run"),
    ],
)
def test_fit_command_errors_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    case: str,
    message: str,
) -> None:
    good = write_run(tmp_path / "good", SHAPES[0], metrics_lines(2.0, 1000, SHAPES[0]))
    bad = tmp_path / "bad"
    if case == "no metrics":
        write_run(bad, SHAPES[1], []).joinpath("metrics.jsonl").unlink()
    elif case == "no eval":
        write_run(bad, SHAPES[1], [{"step": 10, "loss": 1.0, "flops": 1e9}])
    elif case == "no flops":
        write_run(bad, SHAPES[1], [{"step": 10, "loss": 1.0}, {"step": 10, "eval/loss": 2.0}])
    runs = [good] if case == "single" else [good, bad]
    argv = ["scaling", "fit", *map(str, runs), "--out", str(tmp_path / "s.png")]
    assert jaxrm_main(argv, monkeypatch) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("jaxrm: error: ")
    assert message.format(bad=bad) in captured.err
    assert not (tmp_path / "s.png").exists()


def test_a_compute_sweep_of_one_model_size_fits_compute_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tokens = [10_000 * 2**i for i in range(4)]
    runs = [
        write_run(
            tmp_path / f"t{i}",
            SHAPES[0],
            metrics_lines(2.4 * flops(SHAPES[0], t) ** -0.03, t, SHAPES[0]),
        )
        for i, t in enumerate(tokens)
    ]
    monkeypatch.chdir(tmp_path)
    assert jaxrm_main(["scaling", "fit", *map(str, runs)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "L = 2.400 · C^-0.0300  (R² 1.000, 4 runs)" in out
    assert "N: one value in all runs; not fitted" in out
