"""Position Interpolation (Chen et al. 2023): LLaMA-2 7B 4k -> 32k, factor 8, 1000 steps at lr 2e-5.

Slice: TPU v4-128 (64 chips): fsdp 8 x seq 8; 32k tokens are 4k per ring device.
    longrope-jax train --config configs/llama2_7b_pi_32k.py --workdir gs://BUCKET/pi32k \
        --config.init_from=hf:/path/to/Llama-2-7b-hf

Memory: the paper's 64 sequences per step are taken as 2 micro-batches (train.grad_accum=2): in one pass
the step needed 30.0 GiB of the chip's 32 (94%, `longrope-jax compile`); in two, 15.2 GiB (see
long_context_finetune for where it goes).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="llama2-7b", init_from="hf:checkpoints/Llama-2-7b-hf",
                              seq_len=32768, steps=1000, lr=2e-5,
                              batch_size=64, mesh=dict(data=1, fsdp=8, seq=8, tensor=1))
    c.rope.update(type="linear", factor=8.0)
    c.train.grad_accum = 2
    return c
