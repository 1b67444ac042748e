"""Every shipped recipe compiled for its slice by libtpu (`longrope-jax compile`), no TPU needed.

    python benchmarks/recipes.py [--programs train] [--recipes llama2_7b_pi_32k,...]

Prints one JSON object per recipe and program: per-chip HBM, FLOPs, projected tokens/s per chip at
40% MFU and the compile time here. The slice each recipe names is in its docstring ("Slice: TPU v4-128").
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("llama2_7b_pi_32k", "llama2_7b_yarn_64k", "llama2_7b_longrope_128k", "llama3_8b_longrope_128k",
           "llama3_8b_longrope2_128k", "mistral_7b_yarn_16k")


def slice_of(recipe: str) -> str:
    doc = (ROOT / "configs" / f"{recipe}.py").read_text()
    m = re.search(r"Slice: TPU (v\d+[a-z]?-\d+)", doc)
    if not m:
        raise SystemExit(f"configs/{recipe}.py: no 'Slice: TPU vX-N' line in its docstring")
    return m.group(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", default="train")
    p.add_argument("--recipes", default=",".join(RECIPES))
    a = p.parse_args()
    for recipe in a.recipes.split(","):
        topology = slice_of(recipe)
        cmd = [sys.executable, "-m", "longrope_jax", "compile", "--config", f"configs/{recipe}.py",
               "--topology", topology, "--programs", a.programs]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for row in rows:
            print(json.dumps({"recipe": recipe, **row}), flush=True)
        if not rows:
            print(json.dumps({"recipe": recipe, "topology": topology, "error": proc.stderr.strip()[-600:]}), flush=True)


if __name__ == "__main__":
    main()
