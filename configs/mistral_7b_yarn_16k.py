"""YaRN on Mistral 7B: s=8 over an 8k original window, 1000 steps at 16k, constant lr 1e-6, batch 64.

Slice: TPU v4-64 (32 chips): fsdp 8 x seq 4.

Memory (`longrope-jax compile`, libtpu): the paper's batch stays 64 sequences, taken as 2 micro-batches
(`train.grad_accum=2`). In one pass the layer inputs that full remat keeps are [32 layers, 8 rows, 4096
tokens, 4096] bf16 = 8 GiB per chip, and the PI step needed 30.0 GiB of v4's 32 GiB (94%); in two it needs
half the activations (see README's recipe table for the figure).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="mistral-7b", init_from="hf:checkpoints/Mistral-7B-v0.1",
                              seq_len=16384, steps=1000, lr=1e-6,
                              batch_size=64, mesh=dict(data=1, fsdp=8, seq=4, tensor=1))
    c.rope.update(type="yarn", factor=8.0, original_max_position_embeddings=8192, beta_fast=32.0, beta_slow=1.0)
    c.train.grad_accum = 2
    return c
