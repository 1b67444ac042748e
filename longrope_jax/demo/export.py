"""The demo's export stage: the LongRoPE model as a HF directory, checked in `transformers` when present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

CHECK_FILE = "check.json"


def check_export(src: Path, out: Path, plan) -> dict:
    """Copy the fine-tuned model's HF export to `out/hf`, then compare its logits in `transformers` with
    ours on validation text both below and above original_max_position_embeddings (short and long factors)."""
    from longrope_jax.data.sources import open_source
    from longrope_jax.data.tokenizer import build_tokenizer
    from longrope_jax.io.hf import load_hf

    hf_dir = out / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, hf_dir)
    config, params = load_hf(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = build_tokenizer("byte")
    text = tokenizer.encode(open_source("kjv", "validation")[0])
    result = {"hf_dir": str(hf_dir), "rope_scaling": hf_config.get("rope_scaling") or hf_config.get("rope_parameters")}
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        result["transformers"] = "not installed: logits not checked"
        (out / CHECK_FILE).write_text(json.dumps(result, indent=1))
        return result

    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    checks = []
    for length in (plan.context - 16, plan.finetune_length):
        ids = np.asarray([[tokenizer.bos_id] + text[: length - 1]], np.int32)
        ours = _our_logits(config, params, ids)
        with torch.no_grad():
            theirs = hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        err = float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-9))
        checks.append({"length": length, "max_rel_error": err, "factors": "long" if length > plan.context else "short"})
    result["transformers"] = checks
    result["ok"] = all(c["max_rel_error"] < 1e-4 for c in checks)
    (out / CHECK_FILE).write_text(json.dumps(result, indent=1))
    if not result["ok"]:
        raise RuntimeError(f"demo export: transformers logits differ from ours: {checks}")
    return result


def _our_logits(config, params, ids):
    from longrope_jax.model import Llama

    return np.asarray(Llama(config).apply({"params": params}, ids))
