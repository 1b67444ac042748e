"""Run logging: WORKDIR/metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow) and a progress bar.

Only process 0 writes; the others keep the same calls as no-ops so the training loop stays the same.
Object stores cannot append, so for a gs:// workdir metrics.jsonl is rewritten whole, at most every
30 s and on close (TensorBoard's gs:// writer needs google-cloud-storage, in the [tpu] extra).
"""

from __future__ import annotations

import json
import time

import jax
from etils import epath
from tqdm import tqdm

_REMOTE_FLUSH_S = 30.0


class MetricsWriter:
    def __init__(self, workdir, *, tensorboard: bool = True, progress: bool = True, total_steps: int = 0,
                 start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = "://" in str(workdir)
        self._rows: list[str] = []
        self._flushed = 0.0
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if self.remote:
            self._rows = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        else:
            self._file = open(self.path, "a")

    def write(self, step: int, values: dict, *, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3), **{prefix + k: _plain(v) for k, v in values.items()}}
        line = json.dumps(row) + "\n"
        if self.remote:
            self._rows.append(line)
            if time.time() - self._flushed > _REMOTE_FLUSH_S:
                self._flush_remote()
        else:
            self._file.write(line)
            self._file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, int(step))

    def progress(self, step: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.n = int(step)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
            self.bar.refresh()

    def _flush_remote(self) -> None:
        self.path.write_text("".join(self._rows))
        self._flushed = time.time()

    def message(self, text: str) -> None:
        if self.enabled:
            (tqdm.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            self._flush_remote()
        else:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _plain(v):
    try:
        v = v.item()
    except AttributeError:
        pass
    return round(v, 6) if isinstance(v, float) else v
