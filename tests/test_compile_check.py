"""`jaxrm compile-check`: TPU slice names, and ahead-of-time TPU compiles of the tiny preset
(libtpu describes the slice; no TPU is needed)."""

import contextlib
import io
import json
import os
import re

import pytest

from jaxrm import cli
from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.model.attention import INTERPRET_ENV
from jaxrm.sharding import make_mesh
from jaxrm.tpu import compile_check
from jaxrm.tpu.compile_check import (
    abstract_batch,
    full_row_attention_pairs,
    parse_topology,
    topology_devices,
    without_no_tpu_warnings,
)
from jaxrm.train.flops import train_flops
from jaxrm.train.trainer import Trainer

TINY = "configs/tiny_polar.yaml"
# 64 rows of 32768 tokens: the xla attention scores alone are hundreds of GiB per chip.
OVERSIZED = ["data.seq_len=32768", "train.batch_size=64"]


def needs_libtpu() -> None:
    pytest.importorskip("libtpu", reason="TPU compiles need libtpu (the test extra pins it)")


@pytest.mark.parametrize(
    ("name", "grid", "chips", "accelerator_type"),
    [
        ("v5p-8", "v5p:2x2x1", 4, "v5p-8"),
        ("v5p-32", "v5p:2x2x4", 16, "v5p-32"),
        ("v5p-64", "v5p:2x4x4", 32, "v5p-64"),
        ("v5p-128", "v5p:4x4x4", 64, "v5p-128"),
        ("v5p-256", "v5p:4x4x8", 128, "v5p-256"),
        ("v5p-1152", "v5p:4x12x12", 576, "v5p-1152"),
        ("v5p-10368", "v5p:12x12x36", 5184, "v5p-10368"),
        ("v5p-12288", "v5p:16x16x24", 6144, "v5p-12288"),
        ("v4-8", "v4:2x2x1", 4, "v4-8"),
        ("v4-512", "v4:4x8x8", 256, "v4-512"),
        ("v5e-1", "v5e:1x1", 1, "v5e-1"),
        ("v5e-256", "v5e:16x16", 256, "v5e-256"),
        ("v5litepod-16", "v5e:4x4", 16, "v5e-16"),
        ("v6e-16", "v6e:4x4", 16, "v6e-16"),
        ("v6e-128", "v6e:8x16", 128, "v6e-128"),
        ("v5p:2x2x1", "v5p:2x2x1", 4, "v5p-8"),
        ("v5p:4x4x2", "v5p:4x4x2", 32, "v5p-64"),
        ("v6e:4x8", "v6e:4x8", 32, "v6e-32"),
    ],
)
def test_topology_names(name, grid, chips, accelerator_type):
    chosen = parse_topology(name)
    assert (chosen.name, chosen.chips, chosen.accelerator_type) == (grid, chips, accelerator_type)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("v7-8", "unknown TPU topology"),
        ("tpu-v5p-8", "unknown TPU topology"),
        ("v5p", "unknown TPU topology"),
        ("v5p-7", "is not a v5p slice"),  # half a chip
        ("v5p-12", "is not a v5p slice"),  # 6 chips
        ("v5p-96", "is not a v5p slice"),  # 48 chips: neither small nor whole cubes
        ("v4-100", "is not a v4 slice"),
        ("v6e-2", "is not a v6e slice"),
        ("v5litepod-12", "is not a v5e slice"),
        ("v5p-16384", "at most 6144"),
        ("v6e:32x32", "at most 256"),
        ("v5p:2x2", "3 positive sizes"),
        ("v6e:2x2x2", "2 positive sizes"),
        ("v5p:0x2x2", "3 positive sizes"),
    ],
)
def test_impossible_topologies_are_one_line_errors(name, says):
    with pytest.raises(UserError, match=says) as error:
        parse_topology(name)
    message = str(error.value).replace(repr(name), "")
    assert "\n" not in message and repr(name) in str(error.value)
    examples = re.findall(r"v\d[a-z]*(?:-\d+|:\d+(?:x\d+)+)", message)
    assert examples and all(parse_topology(example) for example in examples)


def test_full_row_attention_pairs_respect_the_span():
    for seq_len, span in [(8, 8), (8, 20), (8, 3), (512, 100)]:
        expected = sum(min(p + 1, span) for p in range(seq_len))
        assert full_row_attention_pairs(seq_len, span) == expected


LIBTPU_NOISE = (
    "Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
    "accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so "
    "may not properly initialize.\n"
    "WARNING: Logging before InitGoogle() is written to STDERR\n"
    "E0000 00:00:1795279937.329095   27783 common_lib.cc:860] INVALID_ARGUMENT: Error: unexpected "
    "worker hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from env "
    "var TPU_WORKER_HOSTNAMES.\n"
    "=== Source Location Trace: === \n"
    "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:370\n"
)


def test_no_tpu_warnings_are_dropped_and_everything_else_kept():
    real = "E0000 compiler.cc:12] INTERNAL: something real\n=== Source Location Trace: ===\n"
    assert without_no_tpu_warnings(LIBTPU_NOISE) == ""
    assert without_no_tpu_warnings(LIBTPU_NOISE + real + "a.cc:1\n") == real + "a.cc:1\n"


def test_warnings_written_to_fd_2_are_filtered_not_lost(capfd):
    with pytest.raises(ValueError), compile_check.libtpu_warnings_hidden():
        os.write(2, (LIBTPU_NOISE + "a real problem\n").encode())
        raise ValueError("still raised")
    assert capfd.readouterr().err == "a real problem\n"


def test_missing_libtpu_says_what_to_install(monkeypatch):
    def no_tpu_support(**kwargs):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See ...")

    monkeypatch.setattr(compile_check.topologies, "get_topology_desc", no_tpu_support)
    with pytest.raises(UserError, match=r"pip install libtpu==0\.0\.51"):
        topology_devices(parse_topology("v5p-8"))


def test_a_mesh_the_slice_cannot_hold_fails_before_compiling():
    config = load_config(TINY, ["mesh.fsdp=3"])
    with pytest.raises(UserError, match="4 are available"):
        compile_check.compile_check(config, parse_topology("v5p-8"))


@pytest.fixture(scope="module")
def tiny_report() -> dict:
    """`jaxrm compile-check configs/tiny_polar.yaml --topology v5p-8 --json`, run once."""
    needs_libtpu()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["compile-check", TINY, "--topology", "v5p-8", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_tiny_preset_compiles_for_v5p_and_fits(tiny_report):
    assert (tiny_report["chip_grid"], tiny_report["chips"]) == ("v5p:2x2x1", 4)
    assert tiny_report["device_kind"] == "TPU v5"
    assert tiny_report["mesh"] == {"stage": 1, "data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    memory = tiny_report["memory_per_chip"]
    for key in ("arguments", "outputs", "aliased", "temporaries", "generated_code"):
        assert memory[key] > 0, key
    # The donated TrainState comes back as the new one in place: counted once.
    assert memory["aliased"] <= min(memory["arguments"], memory["outputs"])
    parts = memory["arguments"] + memory["outputs"] + memory["temporaries"]
    assert memory["total"] == parts - memory["aliased"] + memory["generated_code"]
    assert memory["fits"] and 0 < memory["total"] < memory["hbm"] == 95 * 1024**3
    assert tiny_report["compile_seconds"] > 0


def test_tiny_estimate_counts_full_rows(tiny_report):
    config = load_config(TINY)
    estimate = tiny_report["estimate"]
    span = config.data.max_length * config.data.max_candidates  # shared prefixes
    pairs = 8 * full_row_attention_pairs(512, span)
    assert (estimate["tokens"], estimate["attention_pairs"]) == (8 * 512, pairs)
    assert estimate["model_flops"] == pytest.approx(
        train_flops(config.model, 8 * 512, pairs, False)
    )
    assert estimate["compute_seconds"] == pytest.approx(estimate["model_flops"] / (4 * 459e12))
    received = estimate["collective_bytes_per_chip"]
    assert received["fsdp_gather"] == 2 * received["fsdp_reduce_scatter"] > 0
    assert received["tensor_all_reduce"] == received["data_all_reduce"] == 0
    assert 0 < estimate["mfu"] < 1


def test_split_rows_with_splash_compile_for_tpu():
    """Context parallelism lowers for a real TPU: the splash kernel with its mask split into
    query shards, inside shard_map, with the shared prefixes of the tiny POLAR config."""
    needs_libtpu()
    config = load_config(
        TINY, ["model.attention=splash", "mesh.fsdp=2", "mesh.context=2", "data.shared_prefix=true"]
    )
    report = compile_check.compile_check(config, compile_check.parse_topology("v5p-8"))
    assert report["mesh"] == {"stage": 1, "data": 1, "fsdp": 2, "context": 2, "tensor": 1}
    assert report["memory_per_chip"]["fits"]
    received = report["estimate"]["collective_bytes_per_chip"]
    assert received["context_kv_gather"] > 0


def test_fused_optimizers_compile_for_tpu_and_keep_less_state(tiny_report):
    """LOMO's fused walk lowers for a TPU under FSDP; with no moments and no whole gradient its
    arguments (the TrainState) are about a third of AdamW's. Clipping walks twice."""
    needs_libtpu()
    config = load_config(TINY, ["optimizer.name=lomo"])
    report = compile_check.compile_check(config, compile_check.parse_topology("v5p-8"))
    adamw = tiny_report["memory_per_chip"]
    assert report["memory_per_chip"]["arguments"] < 0.4 * adamw["arguments"]
    assert report["optimizer"] == "lomo" and tiny_report["optimizer"] == "adamw"
    forward = tiny_report["estimate"]["model_flops"] / 3  # no LM head in tiny_polar
    assert report["estimate"]["recomputed_flops"] == pytest.approx(4 * forward)
    received = report["estimate"]["collective_bytes_per_chip"]
    assert (
        received["fsdp_reduce_scatter"]
        == 2 * tiny_report["estimate"]["collective_bytes_per_chip"]["fsdp_reduce_scatter"]
    )


def test_pipeline_stages_compile_for_tpu():
    """Two stages of two layers each over v5p-8: the stage-to-stage shifts lower to collective
    permutes, and the estimate counts the bubble."""
    needs_libtpu()
    config = load_config(TINY, ["model.num_layers=4", "mesh.stage=2", "train.micro_batches=4"])
    report = compile_check.compile_check(config, compile_check.parse_topology("v5p-8"))
    assert report["mesh"] == {"stage": 2, "data": 1, "fsdp": 2, "context": 1, "tensor": 1}
    assert report["memory_per_chip"]["fits"]
    assert report["estimate"]["pipeline_bubble"] == pytest.approx(5 / 4)


def test_text_report_shows_the_figures(tiny_report):
    text = compile_check.format_report(tiny_report, TINY)
    memory = tiny_report["memory_per_chip"]
    assert compile_check._bytes(memory["total"]) in text
    assert "fits" in text and "95.00 GiB HBM" in text and "ESTIMATE" in text and "MFU" in text


def test_splash_attention_compiles_the_pallas_kernel_for_tpu(tiny_report, monkeypatch):
    """Splash lowers its Mosaic kernel only where `sharding.target_platform()` says tpu (else it
    stops with a UserError): the activation-sharding context of the TPU mesh is active."""
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    config = load_config(TINY, ["model.attention=splash"])
    mesh = make_mesh(1, -1, 1, topology_devices(parse_topology("v5p-8")))
    trainer = Trainer(config, mesh)
    compiled = trainer.compile(trainer.abstract, abstract_batch(config, mesh))
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert 0 < temporaries < 1024**3
    assert temporaries != tiny_report["memory_per_chip"]["temporaries"]  # not the xla program


def test_an_oversized_config_does_not_fit_and_exits_non_zero(capsys):
    needs_libtpu()
    code = cli.main(["compile-check", TINY, *OVERSIZED, "--topology", "v5e-4"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "DOES NOT FIT" in out and "15.75 GiB HBM" in out and "MFU" in out
    error_lines = [line for line in err.splitlines() if line.startswith("jaxrm: error:")]
    assert len(error_lines) == 1
    assert "does not fit v5e-4" in error_lines[0] and "GiB more than the 15.75 GiB" in err
    assert "TPU_WORKER_HOSTNAMES" not in err


def test_a_mesh_that_does_not_map_onto_the_torus_is_one_line(capsys):
    needs_libtpu()
    code = cli.main(
        ["compile-check", TINY, "mesh.fsdp=16", "mesh.tensor=2", "--topology", "v6e-32"]
    )
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        "jaxrm: error: mesh data=1 x fsdp=16 x context=1 x tensor=2 does not map onto"
    )
    assert "\n" not in error


def test_unknown_topology_on_the_command_line(capsys):
    assert cli.main(["compile-check", TINY, "--topology", "v5p-7"]) == 1
    assert "is not a v5p slice" in capsys.readouterr().err
