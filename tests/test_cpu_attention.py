"""Building the CPU flash-attention kernel: once per machine, and a warning, not a failure, where
it cannot be built. (Its outputs are checked against the reference in test_attention.py.)"""

import logging
import subprocess
import sys

from jaxrm.model import cpu_attention


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


def run_in_a_fresh_process(code: str, cache) -> str:
    """`code` after `from jaxrm.model import cpu_attention`, in a process that has not registered the
    kernel yet (XLA refuses a second library under the same target names)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cache), "JAX_PLATFORMS": "cpu"}
    env[cpu_attention.CACHE_ENV] = str(cache)
    script = f"from jaxrm.model import cpu_attention\n{code}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_torn_cached_library_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path))
    library = cpu_attention._build(cpu_attention._compiler())
    library.write_bytes(b"not a shared library")
    out = run_in_a_fresh_process("print(cpu_attention.available())", tmp_path)
    assert out.split()[-1] == "True"
    assert library.read_bytes().startswith(b"\x7fELF")


def test_loading_the_kernel_leaves_subnormal_numbers_alone(tmp_path):
    # -ffast-math in the link would flush them to zero process-wide (crtfastmath.o).
    check = (
        "import numpy as np\n"
        "assert cpu_attention.available()\n"
        "print(float(np.float32(1e-39) * np.float32(1)))\n"
    )
    assert float(run_in_a_fresh_process(check, tmp_path).split()[-1]) > 0


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
