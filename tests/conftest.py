import os

# Eight fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
# LLVM -O1 rather than XLA:CPU's default -O2 for the code it generates (a flag given in XLA_FLAGS
# still wins): the suite is mostly compiles of tiny programs, which take about half as long, and
# the programs compute the same bits as at -O2 (-O0 would not: it gives other floating-point
# results). The processes the tests start get the flag too (data_helpers.child_xla_flags).
os.environ["XLA_FLAGS"] = " ".join(
    filter(
        None,
        [
            "--xla_backend_optimization_level=1",
            os.environ.get("XLA_FLAGS"),
            "--xla_force_host_platform_device_count=8",
        ],
    )
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent XLA cache unless a test asks for one: every test compiles what it runs, as
# the tests that count compiles expect.
os.environ["JAXRM_COMPILE_CACHE"] = ""

# As the `jaxrm` command does: XLA:CPU's per-step temporaries are reused instead of page-faulted in
# again each call (jaxrm/host_memory.py); must run before JAX starts its CPU backend.
from jaxrm.train.host_memory import keep_freed_memory

keep_freed_memory()

# Nothing the tests run may reach past 127.0.0.1: this process and every Python process it starts
# (PYTHONPATH below) load tests/netguard/sitecustomize.py, which refuses such connections and
# lookups and logs them; pytest_sessionfinish fails the run if any were tried.
import importlib.util  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

NETGUARD = Path(__file__).resolve().parent / "netguard"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(NETGUARD), os.environ.get("PYTHONPATH", "")) if p
)
os.environ.setdefault(
    "JAXRM_NETGUARD_LOG", tempfile.mkstemp(prefix="jaxrm-netguard-", suffix=".log")[1]
)
_spec = importlib.util.spec_from_file_location("netguard", NETGUARD / "sitecustomize.py")
netguard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netguard)


def pytest_sessionfinish(session, exitstatus):
    attempts = Path(os.environ["JAXRM_NETGUARD_LOG"]).read_text()
    if attempts:
        print(f"\nconnections past 127.0.0.1 were tried and refused:\n{attempts}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A Cloud Storage emulator on 127.0.0.1, with every GCS client of this process and of the
    processes it starts pointed at it (tests/gcs_emulator.py)."""
    from gcs_emulator import Emulator

    emulator = Emulator(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
    os.environ.update(emulator.env())
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """(directory, tokenizer) of the training tests: a SentencePiece tokenizer trained on
    generated text, train.jsonl (120 POLAR rows) and eval.jsonl (16) in the directory."""
    from data_helpers import polar_rows, train_sentencepiece, write_jsonl

    directory = tmp_path_factory.mktemp("train_data")
    tokenizer = train_sentencepiece(directory)
    write_jsonl(directory / "train.jsonl", polar_rows(120, seed=1))
    write_jsonl(directory / "eval.jsonl", polar_rows(16, seed=2))
    return directory, tokenizer
