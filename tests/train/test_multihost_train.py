"""The train CLI on 2 processes x 4 CPU devices (gloo) logs the losses of a 1-process 8-device run.

Both sides run the same command (`python -m longrope_jax train ...`) as subprocesses; only the process
layout differs (LONGROPE_* env vars and the per-process device count). The global batch is built from
`data.shards` deterministic loaders, so the batches, and with them the losses, must not depend on it.
Layouts: fsdp=8 (each process holds 4 rows of the batch) and seq=8 with ring attention (each process
holds half of every row; the ring crosses the hosts).
Also: both runs checkpoint step 4, and a 2-process run resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.processes import free_port, run_all, tail
from tests.tiny import REPO, TINY_CPU, TRAIN_MODEL

NUM_PROCESSES = 2
DEVICES = 8
TIMEOUT_S = 240  # a hung collective fails the test instead of hanging CI
# Exact equality does not hold: with the devices split between processes, the cross-device sums of
# the loss and gradients run (partly over gloo) in another order, so e.g. step 3 logs 5.436264 on
# 2 processes and 5.436265 on 1 (metrics.jsonl keeps 6 decimals). That is float32 rounding, ~2e-7
# relative; the meshes' own series differ from each other by ~1e-3, so 1e-5 still discriminates.
RTOL = 1e-5

# The tiny train tests' model (two layers x 64 wide, context 64): as small as the mesh splits allow
# (hidden % fsdp, seq_len % 2 x seq).
COMMON = {
    **{f"model.{k}": v for k, v in TRAIN_MODEL.items()}, "train.seq_len": 64, "train.batch_size": 8, "train.steps": 4,
    "checkpoint.every_steps": 2, "eval.every_steps": 2, "eval.batches": 1, "eval.batch_size": 8,
    "logging.every_steps": 1, "logging.progress": False, "logging.tensorboard": False,
}
MESHES = {
    # Rows split between the processes: process p loads rows 4p..4p+3 (loaders 4p..4p+3 of 8).
    "fsdp8": {"mesh.fsdp": 8},
    # The ring spans both processes: process p loads sequence chunk p (columns 32p..32p+31) of every
    # row and K/V blocks travel between the hosts over gloo. (fsdp=2 x seq=4 would not do this:
    # make_mesh keeps the inner 'seq' axis inside a host, so that ring never leaves a process.)
    "seq8_ring": {"mesh.fsdp": 1, "mesh.seq": 8, "model.attention": "ring"},
}


def _command(workdir: Path, data_dir: Path, overrides: dict) -> list[str]:
    flags = {**COMMON, **overrides, "data.data_dir": str(data_dir)}
    return [sys.executable, "-m", "longrope_jax", "train", "--config", str(TINY_CPU), "--workdir", str(workdir),
            *(f"--config.{k}={v}" for k, v in flags.items())]


def run_train(workdir: Path, data_dir: Path, overrides: dict, *, processes: int, cache_dir: Path) -> list[Path]:
    """Run the train CLI as `processes` local processes sharing 8 CPU devices; return their logs.

    Waits for all; kills the rest as soon as one fails or time runs out, and fails with the logs.
    `cache_dir` is a persistent compilation cache: a relaunch of the same layout (the resume) reuses
    the first launch's executables instead of compiling for ~10 s again.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LONGROPE_", "JAX_", "XLA_"))}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // processes}",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    coordinator = f"127.0.0.1:{free_port()}"
    cmd = _command(workdir, data_dir, overrides)
    jobs = []
    for i in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(LONGROPE_COORDINATOR=coordinator, LONGROPE_NUM_PROCESSES=str(processes),
                       LONGROPE_PROCESS_ID=str(i))
        jobs.append((cmd, env, workdir.parent / f"{workdir.name}.process{i}.log"))
    seconds = run_all(jobs, timeout_s=TIMEOUT_S, what=f"train with {processes} process(es): {' '.join(cmd)}", cwd=REPO)
    print(f"{workdir.name}: {processes} process(es) in {seconds:.1f} s")
    logs = [log for _, _, log in jobs]
    return logs


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def series(workdir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(workdir) if key in r}


def logs_text(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name} ---\n{tail(p)}" for p in logs)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kjv_dir, cache_dir):
    """mesh name -> {processes: (workdir, logs)}; each run happens once per module."""
    cache = {}

    def get(mesh: str):
        if mesh not in cache:  # a failed launch caches nothing: the next test retries and reports it
            root = tmp_path_factory.mktemp(mesh)
            done = {}
            for processes in (1, NUM_PROCESSES):
                workdir = root / f"p{processes}"
                done[processes] = (workdir, run_train(workdir, kjv_dir, MESHES[mesh], processes=processes,
                                                      cache_dir=cache_dir))
            cache[mesh] = done
        return cache[mesh]

    return get


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_process_losses_match_one_process(runs, mesh):
    (one, one_logs), (two, two_logs) = runs(mesh)[1], runs(mesh)[NUM_PROCESSES]
    where = f"{mesh}\n{logs_text(one_logs + two_logs)}"
    for key, steps in (("loss", [1, 2, 3, 4]), ("eval_loss", [2, 4])):
        ref, got = series(one, key), series(two, key)
        assert sorted(ref) == steps and sorted(got) == steps, (
            f"{key} steps: 1 process {ref}, 2 processes {got}\n{where}")
        for step in steps:
            assert got[step] == pytest.approx(ref[step], rel=RTOL), (
                f"{key} at step {step}: 2 processes {got[step]!r}, 1 process {ref[step]!r} (rtol {RTOL})\n"
                f"1 process: {ref}\n2 processes: {got}\n{where}")
    # The runs actually trained: the losses move (a frozen or constant series would match trivially).
    assert len(set(series(one, "loss").values())) > 1, series(one, "loss")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_one_and_two_process_runs_checkpoint_step_4(runs, mesh):
    for processes, (workdir, logs) in runs(mesh).items():
        ckpts = workdir / "checkpoints"
        found = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
        assert (ckpts / "4").is_dir(), f"{mesh}, {processes} process(es): checkpoints {found}\n{logs_text(logs)}"
        assert (workdir / "DONE").read_text().strip() == "4"
        # Process 0 alone writes the metrics: one row per train step, not one per process.
        assert [r["step"] for r in metrics(workdir) if "loss" in r] == [1, 2, 3, 4]


def test_two_process_run_resumes_from_step_4(runs, kjv_dir, cache_dir, tmp_path):
    """Relaunching the finished 2-process job with more steps restores step 4 and trains on from it.

    Changing train.steps changes the cosine schedule, so the losses after the resume are not
    compared with anything; what must hold is where the run starts.
    """
    done, _ = runs("fsdp8")[NUM_PROCESSES]
    workdir = tmp_path / "resumed"
    shutil.copytree(done, workdir)
    logs = run_train(workdir, kjv_dir, {**MESHES["fsdp8"], "train.steps": 6}, processes=NUM_PROCESSES,
                     cache_dir=cache_dir)
    where = logs_text(logs)
    log0 = logs[0].read_text(errors="replace")
    assert "resumed from step 4" in log0, where
    summary = [json.loads(line) for line in log0.splitlines() if line.startswith('{"start_step"')]
    assert summary and summary[-1]["start_step"] == 4 and summary[-1]["stopped_at"] == 6, where
    # The first launch logged steps 1-4; the relaunch appends 5 and 6 only (nothing is retrained).
    assert [r["step"] for r in metrics(workdir) if "loss" in r] == [1, 2, 3, 4, 5, 6], where
    assert (workdir / "checkpoints" / "6").is_dir(), where
    assert (workdir / "DONE").read_text().strip() == "6", where
