"""Progressive LongRoPE extension of the demo model: 256 -> 1024 (search, fine-tune) -> 2048 (search),
then short factors at 256. Run after `make demo` (it starts from the demo's pretrained model):

    longrope-jax extend --config configs/extend_tiny.py --workdir runs/extend
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "hf:runs/demo/pretrain/hf"
    c.stage1_length = 1024
    c.stage2_length = 2048
    c.data = {"source": "kjv", "split": "train"}  # fitness on training books; validation stays held out
    c.search = {"population": 16, "mutations": 8, "crossovers": 8, "parents": 8, "iterations": 6}
    c.short = {"enabled": True, "iterations": 4}
    c.finetune = {"config": "configs/tiny_cpu.py", "overrides": {
        "train": {"steps": 80, "batch_size": 4}, "optimizer": {"lr": 1e-3, "warmup_steps": 8},
        "data": {"passkey_fraction": 0.2, "pack": "fit"}, "eval": {"every_steps": 80, "batch_size": 4},
        "checkpoint": {"every_steps": 40}}}
    c.eval = {"lengths": [256, 512, 1024, 2048], "stride": 0, "docs": 5, "passkey_lengths": [1024, 2048],
              "passkey_depths": 5, "passkey_trials": 10}
    return c
