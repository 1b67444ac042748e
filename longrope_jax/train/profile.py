"""XProf traces of chosen training steps: `--config.profile.steps=N,M` traces steps N through M (1-based)
with `jax.profiler` into WORKDIR/profile, readable by TensorBoard's profile plugin or XProf."""

from __future__ import annotations

import jax


def parse_steps(text: str) -> tuple[int, int] | None:
    """(first, last) from "N,M" (or "N" for one step); None for ""."""
    text = str(text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last:
        raise ValueError(f"config.profile.steps {text!r}: expected 'N,M' with 1 <= N <= M (steps to trace), or ''")
    return first, last


class StepProfiler:
    """Starts a trace before step `first` runs and stops it once step `last` has finished."""

    def __init__(self, steps: tuple[int, int] | None, directory):
        self.steps, self.directory, self.active = steps, str(directory), False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)  # the trace must hold the step's device work, not just its dispatch
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
