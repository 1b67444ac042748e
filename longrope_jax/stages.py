"""The resumable stage runner used by `extend` and `demo`: runs named stages in order, records
their wall time in WORKDIR/stages.json, and skips the finished ones when re-run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from longrope_jax.io.files import write_atomic

STAGES_FILE = "stages.json"


class Stages:
    """Runs stages in order, records their wall time in WORKDIR/stages.json and skips finished ones."""

    def __init__(self, workdir: Path, expected_s: dict | None = None, out=None, name: str = "stages"):
        """`expected_s`: planned seconds per stage, for the ETA (none: no ETA); `name` prefixes progress lines."""
        self.workdir, self.expected, self.out, self.name = workdir, expected_s or {}, out, name
        self.path = workdir / STAGES_FILE
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, stages: list[tuple[str, callable]]) -> dict:
        names = [n for n, _ in stages]
        start = time.perf_counter()
        for i, (name, fn) in enumerate(stages):
            if name in self.done:
                self._say(f"[{i + 1}/{len(stages)}] {name}: done ({self.done[name]['seconds']:.0f} s), skipped")
                continue
            self._say(f"[{i + 1}/{len(stages)}] {name}: running; {self._eta(names[i:], start)}")
            t0 = time.perf_counter()
            info = fn() or {}
            self.done[name] = {"seconds": round(time.perf_counter() - t0, 1), **info}
            write_atomic(self.path, json.dumps(self.done, indent=1))
        return self.done

    def _eta(self, remaining: list[str], start: float) -> str:
        # Scale the planned times by how fast this machine ran the stages measured so far.
        exp = self.expected
        if not exp:
            return f"elapsed {clock(time.perf_counter() - start)}"
        # Stages planned under 30 s (preparing data, writing the report) say little about speed.
        measured = [n for n in self.done if exp.get(n, 0) >= 30 and "seconds" in self.done[n]]
        speed = (sum(self.done[n]["seconds"] for n in measured) / max(sum(exp[n] for n in measured), 1e-9)
                 if measured else 1.0)
        left = speed * sum(exp.get(n, 0) for n in remaining)
        elapsed = time.perf_counter() - start
        return f"elapsed {clock(elapsed)}, ETA {clock(left)}"

    def _say(self, msg: str) -> None:
        print(f"{self.name} {msg}", file=self.out or sys.stderr, flush=True)  # looked up now: capture may replace it


def clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"
