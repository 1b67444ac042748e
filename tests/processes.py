"""Launch a group of local processes (a simulated multi-host job) and fail the test with their logs."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def run_all(jobs: list[tuple[list[str], dict, Path]], *, timeout_s: float, what: str, cwd=None) -> float:
    """Start every (command, env, log) at once and wait for all; returns the wall time.

    As soon as one fails, or time runs out, the rest are killed (a hung collective must fail the
    test, not hang CI) and the test fails with the failing processes' logs.
    """
    procs = []
    start = time.monotonic()
    try:
        for cmd, env, log_path in jobs:
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd))
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > start + timeout_s:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        timed_out = time.monotonic() > start + timeout_s
        report = "\n".join(f"--- process {i} (rc {procs[i].returncode}) ---\n{tail(jobs[i][2])}" for i in failed)
        pytest.fail(f"{what} failed{' (timed out)' if timed_out else ''}:\n{report}")
    return time.monotonic() - start
