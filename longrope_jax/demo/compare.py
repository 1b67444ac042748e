"""`longrope-jax demo --compare OTHER`: are two demo runs' numbers the same?

Walks every JSON file the two workdirs share (the stage records, eval results, search results, checks)
and lists each value that differs, by file and key path. Wall-clock values (stage seconds, rates) are
left out: they measure the machine, not the study; paths inside a run are compared relative to its
workdir. Files only one run has are listed too.
"""

from __future__ import annotations

import json
from pathlib import Path

# Keys whose values are timings, not results.
TIME_KEYS = ("seconds", "elapsed", "wall", "per_s", "compile_s", "time")


def _is_time(key: str) -> bool:
    return any(t in key for t in TIME_KEYS)


def _relative(x, workdir: Path):
    """`x` with the run's own workdir (as given and absolute) written as WORKDIR, in every string."""
    if isinstance(x, str):
        for d in (str(workdir.resolve()), str(workdir)):
            x = x.replace(d, "WORKDIR")
        return x
    if isinstance(x, dict):
        return {k: _relative(v, workdir) for k, v in x.items()}
    if isinstance(x, list):
        return [_relative(v, workdir) for v in x]
    return x


def _diff(a, b, path: str, out: list[str], rel: float) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if _is_time(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'the second' if k not in a else 'the first'} run")
            else:
                _diff(a[k], b[k], f"{path}.{k}", out, rel)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, rel)
    elif (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
          and not isinstance(b, bool)):
        if a != b and abs(a - b) > rel * max(abs(a), abs(b)):
            out.append(f"{path}: {a!r} vs {b!r}")
    elif a != b:
        out.append(f"{path}: {json.dumps(a)[:80]} vs {json.dumps(b)[:80]}")


def compare_runs(first, second, rel: float = 0.0) -> tuple[int, list[str]]:
    """(number of JSON files compared, differences) between two demo workdirs; `rel` tolerates relative
    differences up to that size (0: exact)."""
    first, second = Path(first), Path(second)
    for d in (first, second):
        if not (d / "stages.json").is_file():
            raise ValueError(f"demo --compare: {d} holds no demo run (no stages.json)")
    names_a = {p.relative_to(first) for p in first.rglob("*.json")}
    names_b = {p.relative_to(second) for p in second.rglob("*.json")}
    out = [f"{n}: only in {first if n in names_a else second}" for n in sorted(names_a ^ names_b)]
    for name in sorted(names_a & names_b):
        a, b = (_relative(json.loads((d / name).read_text()), d) for d in (first, second))
        _diff(a, b, str(name), out, rel)
    return len(names_a & names_b), out
