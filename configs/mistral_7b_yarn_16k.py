"""YaRN on Mistral 7B: s=8 over an 8k original window, 1000 steps at 16k, constant lr 1e-6, batch 64.

Slice: TPU v4-64 (32 chips): fsdp 8 x seq 4.

Memory: the paper's 64 sequences per step are taken as 2 micro-batches (train.grad_accum=2): 8 rows of
4096 tokens per chip and a wider MLP than LLaMA-2's; in two, 18.7 GiB of 32 (see long_context_finetune
for where it goes).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="mistral-7b", init_from="hf:checkpoints/Mistral-7B-v0.1",
                              seq_len=16384, steps=1000, lr=1e-6,
                              batch_size=64, mesh=dict(data=1, fsdp=8, seq=4, tensor=1))
    c.rope.update(type="yarn", factor=8.0, original_max_position_embeddings=8192, beta_fast=32.0, beta_slow=1.0)
    c.train.grad_accum = 2
    return c
