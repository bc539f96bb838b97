"""Building the CPU flash-attention kernel: once per machine, and a warning, not a failure, where
it cannot be built. (Its outputs are checked against the reference in test_attention.py.)"""

import logging
import sys

from jaxrm import cpu_attention


def test_the_kernel_is_compiled_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path))
    compiler = cpu_attention._compiler()
    assert compiler, "the tests need a C++ compiler"
    library = cpu_attention._build(compiler)
    assert library.parent == tmp_path and library.suffix == ".so"
    built_at = library.stat().st_mtime_ns
    assert cpu_attention._build(compiler) == library
    assert library.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no build leftovers


def test_without_a_compiler_attention_warns_and_goes_on(monkeypatch, caplog):
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
        assert cpu_attention.available.__wrapped__() is False
    assert "no C++ compiler (set CXX)" in caplog.text


def test_a_failing_compiler_is_named_in_one_warning_line(monkeypatch, tmp_path, caplog):
    failing = tmp_path / "cxx"
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('x.cc:1: error: no')\n")
    failing.chmod(0o755)
    monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(cpu_attention.COMPILER_ENV, str(failing))
    with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
        assert cpu_attention.available.__wrapped__() is False
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert f"{failing} exited 1: x.cc:1: error: no" in record.getMessage()
    assert not list((tmp_path / "cache").glob("*.so"))
